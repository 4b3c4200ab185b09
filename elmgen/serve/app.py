"""The Gradio app of `elmgen serve`: pure functions (settings -> SampleConfig or a message, the equivalent CLI
command) and the page over them. Sampling is elmgen's own (`elmgen.sampling`); the runs are loaded by the
caller (the command's `load_lm`), so the page samples exactly what `elmgen sample` would."""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import shlex
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elmgen.analysis import sequence_heatmaps
from elmgen.data import BadImage, DataConfig, image_array, pick_images, to_float, to_uint8
from elmgen.errors import ElmgenError
from elmgen.evaluation import psnr
from elmgen.models import Transformer
from elmgen.models.cost import count_params
from elmgen.plots import image_grid, save_png
from elmgen.sampling import (
    OnStep,
    SampleConfig,
    class_balanced,
    decode_images,
    generate,
    grey_cells,
    image_seeds,
    inpaint_images,
    outpaint_grid,
    outpaint_images,
    rectangle_hole,
    sample_images,
    write_samples,
)
from elmgen.schedules import GUIDANCE_SCHEDULES
from elmgen.tokenizers import Autoencoder

INSTALL = "pip install elmgen[demo]"
CANVAS = ("height", "width", "stride")  # an outpainting canvas, in cells
CSS = "#codes textarea { font-family: monospace; }"  # the cell codes in columns
AR_FRAMES = 16  # an AR decode is shown about this often while the raster fills in; MaskGIT shows every step
EDITOR_SCALE = 8  # the Edit tab shows the image this many times larger, for a brush finer than a cell
PAINTED_SHARE = 0.25  # a cell is regenerated once this share of it is painted: a stroke's edge grazing it is not


@dataclass
class Run:
    """A loaded LM run: what the page samples from."""

    path: str
    model: Transformer
    tokenizer: Autoencoder
    tok_meta: dict

    @property
    def class_names(self) -> list[str]:
        names = self.tok_meta.get("class_names") or []
        return list(names) or [str(c) for c in range(self.model.cfg.num_classes)]


def model_label(run: Run) -> str:
    """What the model picker shows: name, kind, vocabulary, size."""
    cfg = run.model.cfg
    return f"{Path(run.path).name} · {cfg.kind.upper()} · vocab {cfg.vocab} · {count_params(cfg) / 1e6:.2f}M params"


def sample_settings(defaults: SampleConfig, vocab_size: int, **values) -> SampleConfig:
    """The page's values over the command's defaults, checked as `elmgen sample` checks them (ElmgenError)."""
    missing = [name for name, v in values.items() if v is None]
    if missing:
        raise ElmgenError(f"set {', '.join(missing)}")
    for name in ("top_k", "seed", "steps"):
        if name in values:
            if float(values[name]) != int(values[name]):
                raise ElmgenError(f"--{name.replace('_', '-')} must be an integer, not {values[name]}")
            values[name] = int(values[name])
    cfg = dataclasses.replace(defaults, **values)
    cfg.validate(vocab_size)
    return cfg


def sample_command_line(run: Run, class_id: int, num: int, cfg: SampleConfig, extra: tuple[str, ...] = ()) -> str:
    """The `elmgen sample` command that writes the same images (the same per-image seeds)."""
    args = ["elmgen", "sample", "--model", run.path, *extra, "--out", "samples", "--classes", class_id]
    args += ["--num-per-class", num, "--seed", cfg.seed, "--guidance-scale", cfg.guidance_scale]
    args += ["--guidance-schedule", cfg.guidance_schedule, "--temperature", cfg.temperature]
    args += ["--top-k", cfg.top_k, "--top-p", cfg.top_p]
    shown = {"seed", "guidance_scale", "guidance_schedule", "temperature", "top_k", "top_p", "steps"}
    if run.model.cfg.kind == "mlm":
        args += ["--steps", cfg.steps]
    default = SampleConfig()
    for f in dataclasses.fields(cfg):  # what the server was started with beyond the page's fields
        value = getattr(cfg, f.name)
        if f.name not in shown and value != getattr(default, f.name):
            args.append(f"sample.{f.name}={'null' if value is None else value}".replace(" ", ""))
    return shlex.join(str(a) for a in args)


def class_seeds(run: Run, class_name: str, num: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Labels and per-image seeds of `num` images of one class, as `--classes c --num-per-class num` gives."""
    names = run.class_names
    if class_name not in names:
        raise ElmgenError(f"class {class_name!r} is not one of the model's classes ({', '.join(names)})")
    labels, index_in_class = class_balanced([names.index(class_name)], int(num))
    return labels, image_seeds(seed, labels, index_in_class)


def generate_images(
    run: Run, class_name: str, num: int, cfg: SampleConfig, out_dir: Path, on_step: OnStep | None = None
):
    """Images of one class, as `elmgen sample --classes c --num-per-class num` makes them: the PNG grid, the
    ADM .npz and the per-image seeds."""
    labels, seeds = class_seeds(run, class_name, num, cfg.seed)
    images = sample_images(run.model, run.tokenizer, labels, seeds, cfg, progress=False, on_step=on_step)
    png, npz = write_samples(images, labels, seeds, out_dir, ncols=int(num))
    return png, npz, seeds


def partial_images(run: Run, sub_BLn: torch.Tensor, done_BL: torch.Tensor) -> torch.Tensor:
    """The images of a decode in progress: its final cells decoded, the others grey (uint8, B C H W)."""
    final_BLn = sub_BLn.where(done_BL[..., None], 0)  # a masked cell's index is no code: decode a fixed one
    return grey_cells(decode_images(run.model, run.tokenizer, final_BLn), ~done_BL)


def stream_steps(work: Callable[[OnStep], object], every: int) -> Iterator[tuple[str, object]]:
    """Run `work(on_step)` in a thread; yield ("step", (t, sub_BLn, done_BL)) for every `every`-th step, the
    latest one only when the page falls behind, then ("done", what `work` returned). Its errors raise here."""
    events: queue.Queue = queue.Queue()

    def on_step(t, sub_BLn, done_BL):
        if t % every == every - 1:
            events.put(("step", (t, sub_BLn.clone(), done_BL.clone())))

    def target():
        try:
            events.put(("done", work(on_step)))
        except BaseException as e:  # handed to the page's thread, which raises it
            events.put(("error", e))

    threading.Thread(target=target, daemon=True).start()
    while True:
        kind, value = events.get()
        while kind == "step" and not events.empty():  # skip to the newest step
            kind, value = events.get()
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


def generate_progressively(run: Run, class_name: str, num: int, cfg: SampleConfig, out_dir: Path):
    """`generate_images`, yielding ("step", (grid image of the decode so far, "cell t/L" or "MaskGIT step t/S")) as the
    images form, then ("done", (png, npz, seeds))."""
    mlm = run.model.cfg.kind == "mlm"
    total = cfg.steps if mlm else run.model.cfg.num_cells
    every = 1 if mlm else max(1, total // AR_FRAMES)
    for kind, value in stream_steps(functools.partial(generate_images, run, class_name, num, cfg, out_dir), every):
        if kind == "step":
            t, sub_BLn, done_BL = value
            grid = image_grid(partial_images(run, sub_BLn, done_BL), ncols=num, scale=2)
            yield kind, (grid, f"{'MaskGIT step' if mlm else 'cell'} {t + 1}/{total}")
        else:
            yield kind, value


def test_image(run: Run, index: int) -> tuple[torch.Tensor, int]:
    """Image `index` of the tokenizer's test split (uint8, C H W) and its label."""
    meta = run.tok_meta
    if not meta.get("data"):
        raise ElmgenError("this model's tokenizer was trained on no data set elmgen has (an import): upload an image")
    data = DataConfig(
        source=meta["data"]["source"], split="test", image_size=meta["image_size"], channels=meta["channels"]
    )
    images, labels = pick_images(data, [index])
    return images[0], int(labels[0])


def uploaded_image(run: Run, path: str) -> torch.Tensor:
    """An uploaded image as the tokenizer sees its data: its channels, centre-cropped to its size (uint8, C H W)."""
    try:
        arr = image_array(path, run.tok_meta["channels"], run.tok_meta["image_size"])
    except BadImage as e:
        raise ElmgenError(f"the uploaded file is not an image: {e}") from None
    return torch.from_numpy(arr.copy())  # writable: torch refuses to share a read-only buffer


def image_source(run: Run, index: int | None, upload: str | None) -> tuple[torch.Tensor, int | None, str]:
    """The uploaded image, else test image `index`: (uint8 C H W, its label if known, what it is)."""
    if upload:
        return uploaded_image(run, upload), None, "the uploaded image"
    if index is None:
        raise ElmgenError("set the test image index or upload an image")
    image, label = test_image(run, int(index))
    return image, label, f"test image {int(index)}"


def editor_picture(image_CHW: torch.Tensor, grid: int) -> np.ndarray:
    """An image as the Edit tab's canvas shows it: RGB, EDITOR_SCALE times larger, with the lines between the
    grid's cells drawn halfway to grey so the user sees what a stroke covers (uint8, H W 3)."""
    rgb_HWC = image_CHW.expand(3, -1, -1).permute(1, 2, 0).numpy()
    big_HWC = rgb_HWC.repeat(EDITOR_SCALE, 0).repeat(EDITOR_SCALE, 1)
    step = big_HWC.shape[0] // grid
    lines = np.zeros(big_HWC.shape[:2], dtype=bool)
    lines[::step, :] = lines[:, ::step] = True
    big_HWC[lines] = (big_HWC[lines].astype(np.uint16) + 128) // 2  # halfway to grey: seen on dark and light
    return big_HWC


def painted_cells(layers_HW4: list[np.ndarray], grid: int) -> torch.Tensor | None:
    """The cells of a `grid` x `grid` grid that the user painted over in the editor's layers (RGBA, any size
    that the grid divides or not): a (grid, grid) bool mask of the cells at least PAINTED_SHARE covered, None
    when nothing is painted."""
    painted_HW = np.any([layer[..., 3] > 0 for layer in layers_HW4], axis=0) if layers_HW4 else None
    if painted_HW is None or not painted_HW.any():
        return None
    H, W = painted_HW.shape
    cell_HW = (np.arange(H) * grid // H)[:, None] * grid + np.arange(W) * grid // W
    covered = np.bincount(cell_HW.ravel(), painted_HW.ravel(), grid * grid) / np.bincount(cell_HW.ravel())
    return torch.from_numpy(covered >= PAINTED_SHARE).view(grid, grid)


def inpaint_image(
    run: Run, image_CHW: torch.Tensor, label: int, hole_hw: torch.Tensor, cfg: SampleConfig, out: Path
) -> Path:
    """The marked cells of one image regenerated by the MLM, as `elmgen inpaint` does: a PNG of the original,
    the masked input and the result."""
    images, labels = image_CHW[None], torch.tensor([label])
    seeds = image_seeds(cfg.seed, labels, torch.arange(1))
    result, blanked = inpaint_images(run.model, run.tokenizer, images, labels, hole_hw, cfg, seeds)
    out.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(torch.cat([images, blanked, result]), ncols=3, scale=4), out / "inpaint.png")
    return out / "inpaint.png"


def outpaint_image(
    run: Run, class_name: str, num: int, cfg: SampleConfig, canvas: tuple[int, int, int], out: Path
) -> Path:
    """`num` images of one class on a canvas of (height, width, stride) cells, as `elmgen outpaint` draws them."""
    labels, seeds = class_seeds(run, class_name, num, cfg.seed)
    images = outpaint_images(run.model, run.tokenizer, labels, seeds, cfg, *canvas)
    return write_samples(images, labels, seeds, out, ncols=1, name="outpaint")[0]


def inspect_attention(
    run: Run, class_name: str, num: int, index: int, cfg: SampleConfig, cell: tuple[int, int], out: Path
) -> tuple[Path, Path]:
    """Image `index` (from 1) of `generate_images`' grid, made again alone (its own seed), and the heat-maps of
    the model's attention from `cell` over it, layer by layer (`elmgen analyze attention`'s figures)."""
    if not 1 <= index <= num:
        raise ElmgenError(f"the image must be one of the grid's 1..{num}, not {index}")
    labels, seeds = class_seeds(run, class_name, num, cfg.seed)
    label, seed = labels[index - 1 : index], seeds[index - 1]
    sub_1Ln = generate(run.model, label.to(next(run.model.parameters()).device), cfg, [seed])
    out.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(decode_images(run.model, run.tokenizer, sub_1Ln), ncols=1, scale=8), out / "image.png")
    title = f"{Path(run.path).name}: image {index} of {class_name}"
    sequence_heatmaps(run.model, int(label), sub_1Ln, cell, out / "attention.png", title)
    return out / "image.png", out / "attention.png"


def reconstruct_image(run: Run, image_CHW: torch.Tensor, out: Path) -> tuple[Path, str, float]:
    """The tokenizer's reconstruction of an image from its deterministic codes: a PNG of the image and the
    reconstruction, the grid of cell codes as text (a row of cells a line) and the PSNR (dB)."""
    tok, g = run.tokenizer, run.model.cfg.grid_size
    x_1CHW = to_float(image_CHW[None]).to(next(tok.parameters()).device)
    with torch.no_grad():
        cells_1L = tok.encode_cells(x_1CHW)
        recon_1CHW = tok.decode_cells(cells_1L, g).clamp(-1, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(torch.cat([image_CHW[None], to_uint8(recon_1CHW).cpu()]), ncols=2, scale=4), out / "recon.png")
    width = len(str(tok.num_codes - 1))
    codes = "\n".join(" ".join(f"{c:>{width}}" for c in row) for row in cells_1L.view(g, g).tolist())
    return out / "recon.png", codes, float(psnr(recon_1CHW, x_1CHW))


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ElmgenError(f"the browser demo needs gradio: {INSTALL}") from None
    return gr


def build_app(runs: list[Run], defaults: SampleConfig, extra: tuple[str, ...] = (), max_images: int = 64):
    """The page over `runs`: Generate, Edit (in- and outpainting) and Inspect (attention, the tokenizer) tabs.
    Errors the user can fix go to the tab's status box, never to the server."""
    gr = import_gradio()
    by_label = {model_label(r): r for r in runs}
    first = runs[0]
    work = Path(tempfile.mkdtemp(prefix="elmgen-serve-"))

    def check_count(num):
        if num is None or not 1 <= num <= max_images:
            raise ElmgenError(f"number of images must be between 1 and {max_images}, not {num}")

    def image_inputs(prefix: str, model_text: str):
        """A model picker and an image: a test image's index, or an upload (elem_ids prefix-model, -index, -upload)."""
        picker = gr.Dropdown(list(by_label), value=model_label(first), label=model_text, elem_id=f"{prefix}-model")
        index = gr.Number(0, precision=0, label="test image index", elem_id=f"{prefix}-index")
        upload = gr.Image(label="or upload an image", type="filepath", sources=["upload"], elem_id=f"{prefix}-upload")
        return picker, index, upload

    def on_model(label):
        run = by_label[label]
        names = run.class_names
        return gr.update(choices=names, value=names[0]), gr.update(visible=run.model.cfg.kind == "mlm")

    def generate_tab(label, num, seed, scale, schedule, temperature, top_k, top_p, steps):
        """The Generate tab's run and sampling options, checked."""
        run = by_label[label]
        check_count(num)
        values = dict(guidance_schedule=schedule, temperature=temperature, top_k=top_k, top_p=top_p, steps=steps)
        return run, sample_settings(defaults, run.model.vocab_size, seed=seed, guidance_scale=scale, **values)

    def on_generate(label, class_name, num, seed, scale, schedule, temperature, top_k, top_p, steps):
        try:
            run, cfg = generate_tab(label, num, seed, scale, schedule, temperature, top_k, top_p, steps)
            out = Path(tempfile.mkdtemp(dir=work))
            for kind, value in generate_progressively(run, class_name, int(num), cfg, out):
                if kind == "step":
                    grid_so_far, where = value
                    yield grid_so_far, gr.update(), gr.update(), gr.update(), f"generating: {where}"
            png, npz, seeds = value
        except ElmgenError as e:
            yield gr.update(), gr.update(), gr.update(), gr.update(), f"error: {e}"
            return
        command = sample_command_line(run, run.class_names.index(class_name), int(num), cfg, extra)
        seeds_text = ", ".join(str(s) for s in seeds)
        yield str(png), seeds_text, command, [str(png), str(npz)], f"ok: {len(seeds)} images of {class_name}"

    with gr.Blocks(title="elmgen") as demo:
        gr.Markdown("# elmgen: images from a language model")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    model = gr.Dropdown(list(by_label), value=model_label(first), label="model", elem_id="model")
                    names = first.class_names
                    class_name = gr.Dropdown(names, value=names[0], label="class", elem_id="class")
                    num = gr.Number(
                        4, precision=0, label="number of images", minimum=1, maximum=max_images, elem_id="num"
                    )
                    with gr.Row():
                        seed = gr.Number(defaults.seed, precision=0, label="seed", elem_id="seed")
                        new_seed = gr.Button("new seed", elem_id="new-seed")
                    scale = gr.Number(defaults.guidance_scale, label="guidance scale")
                    schedule = gr.Dropdown(
                        list(GUIDANCE_SCHEDULES), value=defaults.guidance_schedule, label="guidance schedule"
                    )
                    temperature = gr.Number(defaults.temperature, label="temperature")
                    top_k = gr.Number(defaults.top_k, precision=0, label="top-k (0: all)")
                    top_p = gr.Number(defaults.top_p, label="top-p", elem_id="top-p")
                    steps = gr.Number(
                        defaults.steps, precision=0, label="MaskGIT steps", visible=first.model.cfg.kind == "mlm"
                    )
                    go = gr.Button("generate", variant="primary", elem_id="generate")
                with gr.Column():
                    status = gr.Textbox(label="status", interactive=False, elem_id="status")
                    grid = gr.Image(label="samples", type="filepath", interactive=False, elem_id="grid")
                    seeds = gr.Textbox(label="per-image seeds", interactive=False, elem_id="seeds")
                    command = gr.Textbox(label="the same with the CLI", interactive=False, elem_id="command")
                    files = gr.File(label="downloads: PNG grid, ADM .npz", file_count="multiple", elem_id="files")
        model.change(on_model, model, [class_name, steps])
        new_seed.click(lambda: int(torch.randint(0, 2**31 - 1, ()).item()), None, seed)
        inputs = [model, class_name, num, seed, scale, schedule, temperature, top_k, top_p, steps]
        go.click(on_generate, inputs, [grid, seeds, command, files, status])

        with gr.Tab("Edit"):
            gr.Markdown(
                "A masked (MLM) model regenerates the grid cells you paint over (or a rectangle of cells) of a test "
                "image or an upload, given all the others."
            )
            with gr.Row():
                with gr.Column():
                    edit_model, index, upload = image_inputs("edit", "model")
                    edit_class = gr.Dropdown(
                        first.class_names, value=first.class_names[0], label="class of the uploaded image"
                    )
                    with gr.Row():  # used when nothing is painted
                        region = [
                            gr.Number(v, precision=0, label=name, elem_id=f"edit-{name}")
                            for name, v in (("top", 0), ("left", 0), ("height", 2), ("width", 2))
                        ]
                    edit_seed = gr.Number(defaults.seed, precision=0, label="seed")
                    edit_go = gr.Button("inpaint", variant="primary", elem_id="inpaint")
                with gr.Column():
                    canvas_side = EDITOR_SCALE * first.tok_meta["image_size"]
                    cell_side = canvas_side // first.model.cfg.grid_size
                    editor = gr.ImageEditor(
                        label="paint the cells to regenerate (nothing painted: the rectangle of cells)",
                        type="numpy",
                        sources=(),
                        transforms=(),
                        layers=False,
                        brush=gr.Brush(default_size=cell_side // 2, colors=["#ff3030"], color_mode="fixed"),  # a radius
                        canvas_size=(canvas_side, canvas_side),
                        elem_id="edit-canvas",
                    )
                    edit_status = gr.Textbox(label="status", interactive=False, elem_id="edit-status")
                    edited = gr.Image(
                        label="original, masked, result", type="filepath", interactive=False, elem_id="edited"
                    )
            gr.Markdown(
                "An autoregressive (AR) model widens its images: a window of the trained grid slides over a larger "
                "canvas of cells (`stride` cells at a time), each new cell drawn given those already in its window."
            )
            with gr.Row():
                with gr.Column():
                    wide_model = gr.Dropdown(
                        list(by_label), value=model_label(first), label="model", elem_id="outpaint-model"
                    )
                    wide_class = gr.Dropdown(names, value=names[0], label="class", elem_id="outpaint-class")
                    wide_num = gr.Number(2, precision=0, label="number of images", minimum=1, maximum=max_images)
                    with gr.Row():
                        canvas = [
                            gr.Number(v, precision=0, label=f"{name} (cells)", elem_id=f"outpaint-{name}")
                            for name, v in zip(CANVAS, outpaint_grid(first.model.cfg.grid_size), strict=True)
                        ]
                    wide_seed = gr.Number(defaults.seed, precision=0, label="seed")
                    wide_go = gr.Button("outpaint", variant="primary", elem_id="outpaint")
                with gr.Column():
                    wide_status = gr.Textbox(label="status", interactive=False, elem_id="outpaint-status")
                    widened = gr.Image(label="outpainted", type="filepath", interactive=False, elem_id="outpainted")

        def on_outpaint(label, class_name, num, height, width, stride, seed):
            try:
                run = by_label[label]
                cfg = sample_settings(defaults, run.model.vocab_size, seed=seed)
                check_count(num)
                if None in (height, width, stride):
                    raise ElmgenError("set the canvas: height, width and stride, in cells")
                cells = (int(height), int(width), int(stride))
                png = outpaint_image(run, class_name, int(num), cfg, cells, Path(tempfile.mkdtemp(dir=work)))
            except ElmgenError as e:
                return gr.update(), f"error: {e}"
            return str(png), f"ok: {int(num)} images of {class_name} on {cells[0]}x{cells[1]} cells"

        def on_wide_model(label):
            grid_cells = outpaint_grid(by_label[label].model.cfg.grid_size)
            return on_model(label)[0], *(gr.update(value=v) for v in grid_cells)

        wide_model.change(on_wide_model, wide_model, [wide_class, *canvas])
        wide_inputs = [wide_model, wide_class, wide_num, *canvas, wide_seed]
        wide_go.click(on_outpaint, wide_inputs, [widened, wide_status])

        with gr.Tab("Inspect"):
            gr.Markdown(
                "Where the model looks: for an image of the Generate tab's grid (its model, class and settings), "
                "the attention from one cell to every cell, per layer (mean over heads), as "
                "`elmgen analyze attention` computes it; the red box is the cell."
            )
            with gr.Row():
                with gr.Column():
                    pick = gr.Number(1, precision=0, label="image of the grid (1: the first)", elem_id="inspect-image")
                    with gr.Row():
                        query = [
                            gr.Number(v, precision=0, label=f"cell {name}", elem_id=f"inspect-{name}")
                            for name, v in (("row", first.model.cfg.grid_size // 2), ("col", 0))
                        ]
                    look = gr.Button("show attention", variant="primary", elem_id="attention")
                    inspect_status = gr.Textbox(label="status", interactive=False, elem_id="inspect-status")
                    picked = gr.Image(label="the image", type="filepath", interactive=False, elem_id="picked")
                with gr.Column():
                    heatmap = gr.Image(label="attention", type="filepath", interactive=False, elem_id="heatmap")
            gr.Markdown("The tokenizer's reconstruction of an image from its codes, and the codes (one cell each).")
            with gr.Row():
                with gr.Column():
                    tok_model, tok_index, tok_upload = image_inputs("tok", "model (its tokenizer)")
                    tok_go = gr.Button("reconstruct", variant="primary", elem_id="reconstruct")
                with gr.Column():
                    tok_status = gr.Textbox(label="status", interactive=False, elem_id="tok-status")
                    recon = gr.Image(label="image, reconstruction", type="filepath", interactive=False, elem_id="recon")
                    codes = gr.Textbox(label="cell codes, row by row", interactive=False, elem_id="codes")

        def on_attention(label, class_name, num, seed, scale, schedule, temperature, top_k, top_p, steps, i, r, c):
            try:
                run, cfg = generate_tab(label, num, seed, scale, schedule, temperature, top_k, top_p, steps)
                if None in (i, r, c):
                    raise ElmgenError("set the image and the cell (row, col)")
                out = Path(tempfile.mkdtemp(dir=work))
                image, attention = inspect_attention(run, class_name, int(num), int(i), cfg, (int(r), int(c)), out)
            except ElmgenError as e:
                return gr.update(), gr.update(), f"error: {e}"
            return str(image), str(attention), f"ok: image {int(i)}, attention from cell ({int(r)}, {int(c)})"

        def on_reconstruct(label, index, upload):
            try:
                run = by_label[label]
                image, _, source = image_source(run, index, upload)
                png, cell_codes, db = reconstruct_image(run, image, Path(tempfile.mkdtemp(dir=work)))
            except ElmgenError as e:
                return gr.update(), gr.update(), f"error: {e}"
            return str(png), cell_codes, f"ok: {source}, PSNR {db:.2f} dB"

        look.click(on_attention, [*inputs, pick, *query], [picked, heatmap, inspect_status])
        tok_go.click(on_reconstruct, [tok_model, tok_index, tok_upload], [recon, codes, tok_status])

        def on_edit_image(label, index, upload):
            """The chosen image on the canvas, nothing painted."""
            try:
                run = by_label[label]
                image, _, source = image_source(run, index, upload)
            except ElmgenError as e:
                return gr.update(), f"error: {e}"
            picture = editor_picture(image, run.model.cfg.grid_size)
            return {"background": picture, "layers": [], "composite": picture}, f"{source}: paint the cells to redo"

        def on_inpaint(label, index, upload, class_name, top, left, height, width, seed, drawn):
            try:
                run = by_label[label]
                cfg = sample_settings(defaults, run.model.vocab_size, seed=seed)
                hole_hw = painted_cells((drawn or {}).get("layers") or [], run.model.cfg.grid_size)
                if hole_hw is not None:
                    what = f"{int(hole_hw.sum())} painted cells"
                elif None in (top, left, height, width):
                    raise ElmgenError("paint the cells to regenerate or set the region (top left height width)")
                else:
                    cells = (int(top), int(left), int(height), int(width))
                    hole_hw, what = rectangle_hole(cells, run.model.cfg.grid_size), f"cells {cells}"
                image, c, source = image_source(run, index, upload)
                c = run.class_names.index(class_name) if c is None else c
                png = inpaint_image(run, image, c, hole_hw, cfg, Path(tempfile.mkdtemp(dir=work)))
            except ElmgenError as e:
                return gr.update(), f"error: {e}"
            return str(png), f"ok: {source}, {what} regenerated"

        edit_model.change(lambda label: on_model(label)[0], edit_model, edit_class)
        for source_changed in (edit_model.change, index.change, upload.change, demo.load):
            source_changed(on_edit_image, [edit_model, index, upload], [editor, edit_status])
        edit_inputs = [edit_model, index, upload, edit_class, *region, edit_seed, editor]
        edit_go.click(on_inpaint, edit_inputs, [edited, edit_status])
    demo.queue(default_concurrency_limit=1)
    return demo


def serve(runs: list[Run], defaults: SampleConfig, host: str, port: int, extra: tuple[str, ...] = ()) -> None:
    demo = build_app(runs, defaults, extra)
    print(f"elmgen serve: http://{host}:{port}", flush=True)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, css=CSS)

"""`elmgen serve`: the page's pure functions, and the page itself in a real (headless) browser."""

import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import test_cli
import torch
from PIL import Image

from elmgen.errors import ElmgenError
from elmgen.models import ModelConfig, Transformer, preset
from elmgen.sampling import SampleConfig, grey_cells, outpaint_grid
from elmgen.serve import Run, sample_command_line, sample_settings
from elmgen.serve.app import (
    editor_picture,
    generate_images,
    generate_progressively,
    image_source,
    inpaint_image,
    inspect_attention,
    outpaint_image,
    painted_cells,
    reconstruct_image,
)
from elmgen.tokenizers import Autoencoder, TokenizerConfig

pipeline = test_cli.pipeline  # the tiny tokenizer -> codes -> LM run of the CLI tests
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_settings_are_checked_as_the_cli_checks_them():
    cfg = sample_settings(SampleConfig(), 16, top_p=0.9, top_k=4.0, seed=7, guidance_scale=2)
    assert (cfg.top_p, cfg.top_k, cfg.seed, cfg.guidance_scale, cfg.steps) == (0.9, 4, 7, 2, 10)
    assert isinstance(cfg.top_k, int)
    with pytest.raises(ElmgenError, match=r"--top-p \(sample.top_p\) must be in \(0, 1\], not 0"):
        sample_settings(SampleConfig(), 16, top_p=0)
    with pytest.raises(ElmgenError, match="sub-code vocabulary size 16"):
        sample_settings(SampleConfig(), 16, top_k=17)
    with pytest.raises(ElmgenError, match="set seed"):
        sample_settings(SampleConfig(), 16, seed=None)
    with pytest.raises(ElmgenError, match="integer"):
        sample_settings(SampleConfig(), 16, seed=1.5)


def test_the_cli_command_names_every_setting():
    run = SimpleNamespace(path="runs/my lm", model=SimpleNamespace(cfg=SimpleNamespace(kind="mlm")))
    cfg = SampleConfig(seed=5, top_k=3, top_p=0.5, guidance_scale=2.0, steps=8)
    line = sample_command_line(run, 2, 4, cfg, ("--no-ema",))
    assert line == (
        "elmgen sample --model 'runs/my lm' --no-ema --out samples --classes 2 --num-per-class 4 --seed 5 "
        "--guidance-scale 2.0 --guidance-schedule linear --temperature 1.0 --top-k 3 --top-p 0.5 --steps 8"
    )
    run.model.cfg.kind = "ar"
    assert "--steps" not in sample_command_line(run, 2, 4, cfg)
    started = SampleConfig(mask_noise=2.0, guidance_interval=[0.2, 1.0], kv_cache=False)  # serve sample.*=...
    assert sample_command_line(run, 2, 4, started).endswith(
        "--top-p 1.0 'sample.guidance_interval=[0.2,1.0]' sample.kv_cache=False sample.mask_noise=2.0"
    )


def tiny_run(kind: str) -> Run:
    """An untrained 4x4-cell model over an untrained 8-bit tokenizer of 8 px images: enough to sample from."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**preset("micro"), vocab="2-4", grid_size=4, num_classes=2, kind=kind))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    tokenizer = Autoencoder(TokenizerConfig(base_width=8, channel_mult=[1, 2], latent_dim=8, num_bits=8))
    return Run(f"runs/{kind}", model.eval(), tokenizer.eval(), {"class_names": ["a", "b"]})


@pytest.mark.parametrize(
    "kind, shown",
    [("ar", [f"cell {t}/16" for t in range(1, 17)]), ("mlm", [f"MaskGIT step {t}/4" for t in range(1, 5)])],
)
def test_images_appear_progressively_and_end_as_generated_at_once(tmp_path, kind, shown):
    run, cfg = tiny_run(kind), SampleConfig(steps=4, seed=3)
    events = list(generate_progressively(run, "b", 3, cfg, tmp_path / "progressive"))
    assert [k for k, _ in events] == ["step"] * (len(events) - 1) + ["done"] and len(events) >= 2
    where = [shown.index(text) for _, (_, text) in events[:-1]]  # in order; steps the page missed are skipped
    assert where == sorted(set(where))
    png, npz, seeds = events[-1][1]
    at_once = generate_images(run, "b", 3, cfg, tmp_path / "at-once")
    assert seeds == at_once[2]
    assert np.array_equal(np.load(npz)["arr_0"], np.load(at_once[1])["arr_0"])
    first_grid, _ = events[0][1]
    assert first_grid.size == Image.open(png).size and first_grid.tobytes() != Image.open(png).tobytes()


def test_outpainting_widens_the_images_of_a_class(tmp_path):
    canvas = outpaint_grid(4)
    assert canvas == (4, 8, 2)  # the trained grid high, twice as wide, half a grid a step
    png = outpaint_image(tiny_run("ar"), "b", 2, SampleConfig(seed=3), canvas, tmp_path)
    assert Image.open(png).size == ((16 + 4) * 2, (2 * 10 + 2) * 2)  # two 8x16 px images, one a row, 2x
    with pytest.raises(ElmgenError, match="needs an autoregressive model"):
        outpaint_image(tiny_run("mlm"), "b", 2, SampleConfig(), canvas, tmp_path)
    with pytest.raises(ElmgenError, match="at least 4x4"):
        outpaint_image(tiny_run("ar"), "a", 1, SampleConfig(), (4, 3, 2), tmp_path)


@pytest.mark.parametrize("kind", ["ar", "mlm"])
def test_inspect_shows_the_attention_of_one_image_of_the_grid(tmp_path, kind, monkeypatch):
    import elmgen.analysis.attention as attention

    run, cfg = tiny_run(kind), SampleConfig(seed=3, steps=4)
    seen = {}
    plot = attention.plot_heatmaps
    monkeypatch.setattr(attention, "plot_heatmaps", lambda maps, *a: seen.update(maps=maps) or plot(maps, *a))
    image, heatmap = inspect_attention(run, "b", 3, 2, cfg, (1, 2), tmp_path)
    grid = Image.open(generate_images(run, "b", 3, cfg, tmp_path / "grid")[0])
    assert Image.open(image).size == (12 * 8, 12 * 8) and Image.open(heatmap).size[0] > 0
    in_grid = np.asarray(grid)[4:20:2, 24:40:2]  # image 2 of the grid (2 px padding, shown 2x)
    assert np.array_equal(np.asarray(Image.open(image))[16:80:8, 16:80:8], in_grid)  # the same image, alone
    assert len(seen["maps"]) == run.model.cfg.n_layer
    row_S = seen["maps"][0].mean(0)[1 * 4 + 2 + 1]  # the query cell's position: after the class token
    assert float(row_S.sum()) == pytest.approx(1, abs=1e-5)
    if kind == "ar":  # causal: nothing on the cells after the query's own
        assert float(row_S[1 * 4 + 2 + 2 :].sum()) == 0
        with pytest.raises(ElmgenError, match="never reads its last cell"):
            inspect_attention(run, "b", 3, 2, cfg, (3, 3), tmp_path)
    with pytest.raises(ElmgenError, match="not a \\(row, col\\) cell of the 4x4 grid"):
        inspect_attention(run, "b", 3, 2, cfg, (4, 0), tmp_path)
    with pytest.raises(ElmgenError, match="one of the grid's 1..3"):
        inspect_attention(run, "b", 3, 4, cfg, (0, 0), tmp_path)


def test_the_tokenizers_reconstruction_and_codes(tmp_path):
    run = tiny_run("ar")
    image = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    png, codes, db = reconstruct_image(run, image, tmp_path)
    assert Image.open(png).size == ((2 * 10 + 2) * 4, (10 + 2) * 4) and np.isfinite(db)
    cells = [[int(c) for c in line.split()] for line in codes.splitlines()]
    assert len(cells) == 4 and all(len(row) == 4 for row in cells)
    expected = run.tokenizer.encode_cells(image[None].float() / 127.5 - 1)
    assert torch.equal(torch.tensor(cells).flatten(), expected[0])


def test_painted_cells_are_the_cells_a_stroke_covers():
    layer = np.zeros((64, 64, 4), np.uint8)  # a 4x4 grid of 16 px cells
    layer[16:32, 0:40, 3] = 255  # row 1: cells 0 and 1 whole, cell 2 half
    layer[60:64, 48:64, 3] = 255  # a quarter of cell (3, 3): just enough
    layer[0:3, 0:3, 3] = 255  # a graze of cell (0, 0): 9 of its 256 pixels
    hole = painted_cells([np.zeros_like(layer), layer], 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, :3] = expected[3, 3] = True
    assert torch.equal(hole, expected)
    assert painted_cells([np.zeros((64, 64, 4), np.uint8)], 4) is None and painted_cells([], 4) is None
    odd = np.zeros((50, 50, 4), np.uint8)  # a canvas the grid does not divide
    odd[:25, :, 3] = 255
    assert painted_cells([odd], 4)[:2].all() and not painted_cells([odd], 4)[2:].any()


def test_the_canvas_shows_the_image_larger_with_its_cell_lines():
    image = torch.randint(1, 256, (1, 8, 8), dtype=torch.uint8)
    picture = editor_picture(image, 4)  # 4x4 cells of 2 px, shown 8x: lines every 16 px
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[1::8, 1::8], image[0, :, :, None].expand(8, 8, 3).numpy())
    assert np.array_equal(picture[16, 5], (image[0, 2, 0].repeat(3).numpy().astype(int) + 128) // 2)


def test_inpainting_regenerates_exactly_the_marked_cells(tmp_path):
    run, image = tiny_run("mlm"), torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    hole = torch.zeros(4, 4, dtype=torch.bool)
    hole[0, 1] = hole[1, 1] = hole[1, 2] = hole[3, 0] = True  # no rectangle
    png = inpaint_image(run, image, 1, hole, SampleConfig(seed=2, steps=4), tmp_path)
    shown = np.asarray(Image.open(png))[2 * 4 : 10 * 4 : 4, 12 * 4 : 20 * 4 : 4]  # the masked input, at 1x
    assert np.array_equal(shown, grey_cells(image[None], hole.view(1, 16))[0, 0].numpy())
    with pytest.raises(ElmgenError, match="mark at least one cell"):
        inpaint_image(run, image, 1, torch.zeros(4, 4, dtype=torch.bool), SampleConfig(), tmp_path)
    with pytest.raises(ElmgenError, match="needs a masked model"):
        inpaint_image(tiny_run("ar"), image, 1, hole, SampleConfig(), tmp_path)


def test_an_imported_model_has_no_test_images_and_says_so():
    run = SimpleNamespace(tok_meta={"channels": 3, "image_size": 8})  # an imported tokenizer: no data set
    with pytest.raises(ElmgenError, match="upload an image"):
        image_source(run, 0, None)


def test_serve_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    code = test_cli.main(["serve", "--model", "nowhere"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "elmgen: error: the browser demo needs gradio: pip install elmgen[demo]"


# Every status text the Generate tab shows, in order (polled: Gradio sets the value, no event fires).
RECORD_STATUS = """() => { window.statuses = []; setInterval(() => {
    const text = document.querySelector('#status textarea').value;
    if (text !== window.statuses.at(-1)) window.statuses.push(text); }, 2); }"""


def browser():
    """Playwright's chromium on Debian's binary, or a loud skip saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TEST NOT RUN: playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"BROWSER TEST NOT RUN: no chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.skip("BROWSER TEST NOT RUN: gradio is not installed (pip install elmgen[demo])")
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float = 60) -> None:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        assert server.poll() is None, server.stdout.read()
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


def start_server(models: list) -> tuple[subprocess.Popen, str]:
    """`elmgen serve` of this checkout over `models` on a free local port, once it answers: the process, its URL."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "elmgen.cli", "serve", "--port", str(port), "--device", "cpu"]
    argv += [a for m in models for a in ("--model", str(m))]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base, server)
    except BaseException:
        server.terminate()
        raise
    return server, base


def open_page(playwright, base: str, height: int):
    """Headless chromium (Debian's) on the page at `base`: the browser and the page."""
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = chromium.new_page(viewport={"width": 1200, "height": height})
    page.goto(base)
    return chromium, page


def pick(page, dropdown: str, option: str) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option).click()


def grid_of(page, base: str, where: str = "#grid") -> Image.Image:
    src = page.locator(f"{where} img").get_attribute("src")
    return Image.open(io.BytesIO(urllib.request.urlopen(src if "://" in src else base + src).read()))


@pytest.mark.slow
def test_the_page_in_a_browser(pipeline, tmp_path, capsys):
    sync_playwright = browser()
    _, codes, lm = pipeline
    mlm = tmp_path / "mlm"
    train = ["train", "--codes", codes, "--out", mlm, "--preset", "micro", "--kind", "mlm", "train.steps=2"]
    assert test_cli.run(capsys, *train, "train.batch_size=4")[0] == 0
    server, base = start_server([lm, mlm])
    try:
        with sync_playwright() as p:
            chromium, page = open_page(p, base, 1100)
            pick(page, "#class", "Trouser")
            page.evaluate(RECORD_STATUS)
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#status textarea').value.startsWith('ok')")
            assert page.locator("#status textarea").input_value() == "ok: 4 images of Trouser"
            shown = page.evaluate("window.statuses")  # the raster filled in on the page before the grid came
            assert any(re.fullmatch(r"generating: cell \d+/64", text) for text in shown), shown
            first = grid_of(page, base)
            # 4 images of 32 px in a row, 2 px padding, shown twice as large: what samples.png holds
            assert first.size == ((4 * 34 + 2) * 2, 36 * 2)
            command = page.locator("#command textarea").input_value()
            assert command.startswith(f"elmgen sample --model {lm}") and "--classes 1 " in command
            seeds = page.locator("#seeds textarea").input_value()
            assert len(seeds.split(", ")) == 4
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
            # the downloads are what the shown command writes: the same images, labels and seeds
            links = [page.locator("#files a").nth(i).get_attribute("href") for i in range(2)]
            npz = next(link for link in links if link.split("?")[0].endswith(".npz"))
            served = np.load(io.BytesIO(urllib.request.urlopen(npz if "://" in npz else base + npz).read()))
            argv = shlex.split(command)[2:]
            argv[argv.index("--out") + 1] = str(tmp_path / "cli")
            assert test_cli.run(capsys, "sample", *argv, "--device", "cpu")[0] == 0
            written = np.load(tmp_path / "cli" / "samples.npz")
            assert served["arr_0"].shape == (4, 32, 32, 1) and served["arr_1"].tolist() == [1] * 4
            for key in ("arr_0", "arr_1", "seeds"):
                assert np.array_equal(served[key], written[key]), key

            other = chromium.new_page(viewport={"width": 1200, "height": 1100})  # a second user at the same time
            other.goto(base)
            other.locator("#generate").click()
            page.locator("#seed input").fill("1")
            page.locator("#generate").click()
            page.wait_for_function(f"document.querySelector('#seeds textarea').value != '{seeds}'")
            second = grid_of(page, base)
            assert second.size == first.size and second.tobytes() != first.tobytes()
            other.wait_for_function("document.querySelector('#status textarea').value.startsWith('ok')")
            assert grid_of(other, base).size == first.size  # queued behind or ahead of the first user, not lost
            other.close()

            page.locator("#top-p input").fill("0")
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#status textarea').value.startsWith('error')")
            message = page.locator("#status textarea").input_value()
            assert message == "error: --top-p (sample.top_p) must be in (0, 1], not 0"

            page.get_by_role("tab", name="Edit").click()
            page.locator("#inpaint").click()  # the first model is AR: it cannot inpaint
            page.wait_for_function("document.querySelector('#edit-status textarea').value.startsWith('error')")
            assert "needs a masked model" in page.locator("#edit-status textarea").input_value()
            page.locator("#edit-model input").click()
            page.get_by_role("option", name=re.compile("^mlm · MLM")).click()
            page.locator("#edit-top input").fill("9")  # outside the 8x8 grid
            page.locator("#inpaint").click()
            page.wait_for_function("document.querySelector('#edit-status textarea').value.includes('must fit')")
            page.locator("#edit-top input").fill("2")
            page.locator("#inpaint").click()
            page.wait_for_function("document.querySelector('#edit-status textarea').value.startsWith('ok')")
            edited = grid_of(page, base, "#edited")
            assert edited.size == ((3 * 34 + 2) * 4, 36 * 4)  # original, masked input, result; 4x
            box = page.locator("#edit-canvas .pixi-target canvas").bounding_box()  # the image, centred
            x, y = box["x"] + box["width"] / 2 - 60, box["y"] + box["height"] / 2 - 20
            page.mouse.move(x, y)  # a stroke across the upper middle of the image: one row of cells
            page.mouse.down()
            for step in range(13):
                page.mouse.move(x + 10 * step, y)
            page.mouse.up()
            page.locator("#inpaint").click()
            page.wait_for_function("document.querySelector('#edit-status textarea').value.includes('painted')")
            status = page.locator("#edit-status textarea").input_value()
            painted = int(re.fullmatch(r"ok: test image 0, (\d+) painted cells regenerated", status).group(1))
            blanked = np.asarray(grid_of(page, base, "#edited").convert("L"))[8:136:4, 144:272:4]  # at 1x
            grey_rc = (blanked.reshape(8, 4, 8, 4) == 128).all(axis=(1, 3))  # the cells shown grey
            rows, cols = np.nonzero(grey_rc)
            assert 2 <= painted <= 8 and len(rows) == painted and set(rows) <= {2, 3, 4} and len(set(rows)) == 1
            assert cols.max() - cols.min() == painted - 1  # one unbroken run of cells, as the stroke was
            page.screenshot(path=str(tmp_path / "serve-edit.png"), full_page=True)
            photo = tmp_path / "upload.png"
            Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1))).convert("RGB").save(photo)
            page.locator("#edit-upload input[type=file]").set_input_files(str(photo))
            page.locator("#edit-upload img").wait_for()
            page.locator("#inpaint").click()
            page.wait_for_function("document.querySelector('#edit-status textarea').value.includes('uploaded')")
            assert grid_of(page, base, "#edited").size == edited.size

            page.locator("#outpaint-width input").fill("3")  # narrower than the trained 8x8 grid
            page.locator("#outpaint").click()
            page.wait_for_function("document.querySelector('#outpaint-status textarea').value.startsWith('error')")
            assert "at least 8x8" in page.locator("#outpaint-status textarea").input_value()
            page.locator("#outpaint-width input").fill("16")
            page.locator("#outpaint").click()
            page.wait_for_function("document.querySelector('#outpaint-status textarea').value.startsWith('ok')")
            assert grid_of(page, base, "#outpainted").size == ((64 + 4) * 2, (2 * 34 + 2) * 2)  # 2 images, 8x16 cells

            page.get_by_role("tab", name="Inspect").click()
            page.locator("#attention").click()  # the Generate tab's top-p is still 0
            page.wait_for_function("document.querySelector('#inspect-status textarea').value.startsWith('error')")
            assert "--top-p" in page.locator("#inspect-status textarea").input_value()
            page.get_by_role("tab", name="Generate").click()
            page.locator("#top-p input").fill("1")
            page.get_by_role("tab", name="Inspect").click()
            page.locator("#attention").click()
            page.wait_for_function("document.querySelector('#inspect-status textarea').value.startsWith('ok')")
            assert grid_of(page, base, "#picked").size == (36 * 8, 36 * 8)
            assert grid_of(page, base, "#heatmap").size[0] > 0
            page.locator("#tok-index input").fill("100000")
            page.locator("#reconstruct").click()
            page.wait_for_function("document.querySelector('#tok-status textarea').value.startsWith('error')")
            page.locator("#tok-index input").fill("3")
            page.locator("#reconstruct").click()
            page.wait_for_function("document.querySelector('#tok-status textarea').value.startsWith('ok')")
            assert re.fullmatch(
                r"ok: test image 3, PSNR \d+\.\d\d dB", page.locator("#tok-status textarea").input_value()
            )
            assert len(page.locator("#codes textarea").input_value().splitlines()) == 8
            assert grid_of(page, base, "#recon").size == ((2 * 34 + 2) * 4, 36 * 4)
            chromium.close()
        assert server.poll() is None
        urllib.request.urlopen(base, timeout=5)  # still serving after the bad setting
    finally:
        server.terminate()
        server.wait(10)


def test_an_upload_is_shaped_as_the_tokenizer_sees_its_data(tmp_path):
    from elmgen.serve.app import uploaded_image

    run = SimpleNamespace(tok_meta={"channels": 1, "image_size": 32})
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "a.png")
    image = uploaded_image(run, str(tmp_path / "a.png"))
    assert image.shape == (1, 32, 32) and image.dtype.is_floating_point is False and int(image[0, 5, 5]) == 200
    (tmp_path / "b.png").write_text("not an image")
    with pytest.raises(ElmgenError, match="not an image"):
        uploaded_image(run, str(tmp_path / "b.png"))


def test_grey_cells_paint_exactly_the_marked_cells():
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    cells = torch.zeros(2, 4, dtype=torch.bool)
    cells[1, 3] = True  # image 1, the bottom-right cell of a 2x2 grid
    out = grey_cells(images, cells)
    assert out[0].eq(0).all() and out[1, 0, 4:, 4:].eq(128).all() and out[1, 0, :4].eq(0).all()
    assert out[1, 0, 4:, :4].eq(0).all() and images.eq(0).all()  # the input is not changed

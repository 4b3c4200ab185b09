"""Pre-tokenized code folders: a dataset encoded once, with augmentation, so LM training never runs the encoder.

A code folder holds
- `shard_00000.npy`, ...: cell codes (R, N, L), memory-mapped when read: R draws of every one of N rows (one
  for deterministic codes), L = grid * grid cells in raster order;
- `labels.npy`: the class of every row, shards in order;
- `meta.json`: the tokenizer (path, weights fingerprint, kind), K, the grid, the default vocabulary
  split, the augmentation and the shard files.

A row is one view of one image: the image itself, one of five fixed crops (four corners and the centre;
with `flip`, LlamaGen's ten-crop), a random crop or a shift crop (the image moved, its edge pixels repeated), each
optionally mirrored. Shard s holds the views of
images [s * shard_size, (s + 1) * shard_size), view by view: all its images' view 0, then view 1, ...
The split into sub-codes happens at load time, so one folder serves every vocabulary with n dividing K.

Shards are written one at a time, each atomically (fsynced, then renamed), into `.<name>.partial/`, which
is renamed into place when complete; a re-run with the same settings keeps the finished shards. Random
crops and draws are seeded per (seed, image, view), so a resumed run writes the same files as an
uninterrupted one. Under torchrun the processes deal out the missing shards in turn: the main process prepares
the work folder first and writes labels and meta last, so the folder is byte for byte a one-process run's, and a
killed run resumes with any number of processes. elmgen never deletes what it did not write: `tokenize` refuses an
output folder that is not empty and not a code folder with the same settings, and one inside the tokenizer folder;
from a work folder left by a run with other settings it deletes only the files it writes there.
"""

from __future__ import annotations

import contextlib
import json
import reprlib
from collections.abc import Iterator
from fnmatch import fnmatch
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from elmgen.data import ImageDataset, to_float
from elmgen.data.loader import decoded, default_workers, micro_batches
from elmgen.data.transforms import CROPS, crop_source_size, crop_views, max_shift
from elmgen.errors import ElmgenError
from elmgen.io import TMP_PREFIX, atomic_save_npy, atomic_write_text, publish_folder, read_json
from elmgen.rng import item_seed, uniforms_for
from elmgen.tokenizers import Autoencoder
from elmgen.vocab import Vocab, cells_to_subcodes

OWN_FILES = ("plan.json", "meta.json", "labels.npy", "shard_[0-9][0-9][0-9][0-9][0-9].npy")  # all a run writes
DERIVED = ("views", "count", "shards")  # meta entries that follow from the settings
META_TYPES = {
    "shards": list,
    "grid": int,
    "bits": int,
    "num_classes": int,
    "images": int,
    "views": int,
    "count": int,
    "draws": int,
    "shard_size": int,
    "vocab": str,
    "kind": str,
}


def code_dtype(bits: int) -> np.dtype:
    return np.dtype(np.uint16 if bits <= 16 else np.uint32 if bits <= 32 else np.int64)


@torch.no_grad()
def tokenize(
    tokenizer: Autoencoder,
    tokenizer_meta: dict,
    dataset: ImageDataset,
    out_dir,
    vocab: Vocab,
    flip: bool = False,
    crops: str = "none",
    num_crops: int = 1,
    crop_range: float = 1.0,
    draws: int = 0,
    seed: int = 0,
    batch_size: int = 256,
    shard_size: int = 8192,
    rank: int = 0,
    world: int = 1,
    workers: int | None = None,
) -> dict:
    """Encode `dataset` into a code folder; returns its meta.

    flip: also encode the mirror image of every crop. crops: "none" (the image), "five" (corners and
    centre) or "random" (`num_crops` per image); crops are taken from images loaded at
    `crop_source_size(image_size, crop_range)`, which `dataset` must have. draws: 0 stores the
    deterministic codes; N > 0 (binary autoencoder only) stores N Bernoulli draws of every view.
    rank, world: this process among `world` of a joined process group (`train.distributed.distributed`);
    every process calls `tokenize` with the same arguments and encodes its share of the shards.
    workers: processes decoding images ahead of the encoder (None: `default_workers`); the codes do not depend
    on it.
    """
    K = tokenizer.code_bits
    _check_settings(tokenizer_meta, dataset, vocab, K, crops, num_crops, crop_range, draws, batch_size, shard_size)
    augmentation = dict(flip=flip, crops=crops, num_crops=num_crops, crop_range=crop_range, draws=draws, seed=seed)
    plan = _plan(tokenizer, tokenizer_meta, dataset, vocab, augmentation, shard_size)
    out_dir = Path(out_dir).resolve()
    work = _shared_work_folder(out_dir, Path(tokenizer_meta["path"]).resolve(), plan, rank, world, tokenizer)
    if work is None:
        return plan
    # The missing shards, dealt out in turn: processes of a resumed run get equal shares, so none waits long.
    # Listed before the barrier, while no process of this run has written one: every process sees the same list
    todo = [(s, name) for s, name in enumerate(plan["shards"]) if not (work / name).is_file()][rank::world]
    if rank == 0:
        atomic_write_text(work / "plan.json", json.dumps(plan, indent=2))
    _wait_for_all(world)  # plan.json first: a kill from here on leaves a folder that resumes
    device = next(tokenizer.parameters()).device
    batches = ((s, ids) for s, _ in todo for ids in _shard_batches(plan, s, batch_size))
    workers = default_workers(dataset.in_memory) if workers is None else workers
    images = micro_batches(partial(decoded, dataset), workers, seed, batches, device)
    with contextlib.closing(images):  # closing the generator stops the workers
        for s, name in tqdm(todo, desc="tokenize", unit="shard", disable=rank != 0):
            atomic_save_npy(work / name, _encode_shard(tokenizer, plan, s, batch_size, images))
    _wait_for_all(world)
    if rank == 0:
        _finish(work, out_dir, dataset, plan)
    _wait_for_all(world)  # every process returns once the folder is in place
    return plan


def _finish(work: Path, out_dir: Path, dataset: ImageDataset, plan: dict) -> None:
    """With every shard written: labels, then meta.json, then the folder renamed into place."""
    missing = [name for name in plan["shards"] if not (work / name).is_file()]
    if missing:  # another process's write not visible here (a network file system): nothing lost
        raise ElmgenError(f"{work} lacks {missing[0]} after all processes finished; re-run to resume")
    shard_size = plan["shard_size"]
    labels = np.concatenate(
        [
            np.tile(dataset.labels[s * shard_size : (s + 1) * shard_size], plan["views"])
            for s in range(len(plan["shards"]))
        ]
    ).astype(np.int64)
    atomic_save_npy(work / "labels.npy", labels)
    atomic_write_text(work / "meta.json", json.dumps(plan, indent=2))
    (work / "plan.json").unlink()
    try:
        publish_folder(work, out_dir)  # out_dir is absent or empty
    except OSError as e:
        raise ElmgenError(
            f"cannot move the finished codes {work} to {out_dir}: {e.strerror or e}; "
            "make sure it is absent or empty and re-run"
        ) from None


def _wait_for_all(world: int) -> None:
    if world > 1:
        dist.barrier()


def _shared_work_folder(
    out_dir: Path, tokenizer_dir: Path, plan: dict, rank: int, world: int, tokenizer: Autoencoder
) -> Path | None:
    """`_work_folder`, prepared by the main process alone; the others learn its outcome (a tensor broadcast,
    on the tokenizer's device as NCCL needs): a refusal ends every process with the main one's message."""
    work, problem = None, None
    if rank == 0:
        try:
            work = _work_folder(out_dir, tokenizer_dir, plan)
        except OSError as e:
            problem = ElmgenError(f"cannot use --out {out_dir}: {e.strerror or e}; pass a writable folder")
        except ElmgenError as e:
            problem = e
    if world > 1:
        outcome = torch.tensor([0 if problem else 2 if work else 1], device=next(tokenizer.parameters()).device)
        dist.broadcast(outcome, src=0)
        if rank != 0 and outcome.item() == 0:
            raise ElmgenError(f"the main process refused --out {out_dir} (its message says why); fix that and re-run")
        if rank != 0 and outcome.item() == 2:
            work = _partial(out_dir)
    if problem:
        raise problem from None
    return work


def _partial(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def _plan(
    tokenizer: Autoencoder,
    tokenizer_meta: dict,
    dataset: ImageDataset,
    vocab: Vocab,
    augmentation: dict,
    shard_size: int,
) -> dict:
    """A code folder's meta.json: the tokenizer and data it encodes, how (`augmentation`), and its shards."""
    n = len(dataset)
    views = (5 if augmentation["crops"] == "five" else augmentation["num_crops"]) * (2 if augmentation["flip"] else 1)
    return {
        "tokenizer": tokenizer_meta["path"],
        "tokenizer_fingerprint": tokenizer_meta["fingerprint"],
        "kind": tokenizer_meta["kind"],
        "bits": tokenizer.code_bits,
        "num_codes": tokenizer.num_codes,
        "grid": tokenizer_meta["grid"],
        "image_size": tokenizer_meta["image_size"],
        "vocab": str(vocab),
        "num_classes": dataset.num_classes,
        "class_names": dataset.class_names,
        "dataset": dataset.name,
        "images": n,
        **augmentation,
        "views": views,
        "count": n * views,
        "shard_size": shard_size,
        "shards": [f"shard_{s:05d}.npy" for s in range(-(-n // shard_size))],
    }


def _check_settings(
    tokenizer_meta: dict,
    dataset: ImageDataset,
    vocab: Vocab,
    K: int,
    crops: str,
    num_crops: int,
    crop_range: float,
    draws: int,
    batch_size: int,
    shard_size: int,
) -> None:
    """Refuse, before any work, settings `tokenize` cannot honour."""
    size = tokenizer_meta["image_size"]
    Vocab.for_bits(str(vocab), K)
    if crops not in CROPS:
        raise ElmgenError(f"crops must be one of {', '.join(CROPS)}, not {crops!r}")
    source = crop_source_size(size, crop_range, crops)
    if crops == "none" and crop_range != 1.0 or crops != "none" and crop_source_size(size, crop_range) <= size:
        raise ElmgenError(
            f"crops need a crop_range that enlarges {size} px images (LlamaGen: 1.1) and no crops "
            f"need 1; got crops={crops}, crop_range={crop_range}"
        )
    if crops == "shift" and max_shift(size, crop_range) < 1:
        raise ElmgenError(
            f"shift crops at crop_range={crop_range} move {size} px images by less than a pixel; "
            f"pass a crop_range of at least {(size + 2) / size:.3g}"
        )
    if num_crops < 1 or draws < 0 or batch_size < 1 or shard_size < 1:
        raise ElmgenError("num_crops, batch_size and shard_size must be >= 1 and draws >= 0")
    if num_crops != 1 and crops not in ("random", "shift"):
        raise ElmgenError("num_crops applies to random and shift crops only (crops=random or crops=shift)")
    if draws and tokenizer_meta["kind"] != "bae":
        raise ElmgenError(f"Bernoulli draws need the binary autoencoder; this tokenizer is {tokenizer_meta['kind']}")
    if len(dataset) == 0:
        raise ElmgenError(f"the data set {dataset.name} holds no images; pass a data set with images")
    if dataset.images([0]).shape[-1] != source:
        raise ElmgenError(
            f"tokenize needs the images at {source} px (image size {size}, {crops} crops, crop range {crop_range})"
        )


def _shard_images(plan: dict, shard: int) -> np.ndarray:
    return np.arange(shard * plan["shard_size"], min(plan["images"], (shard + 1) * plan["shard_size"]))


def _shard_batches(plan: dict, shard: int, batch_size: int) -> list[np.ndarray]:
    """The image indices of each encoder call of one shard, in order."""
    images = _shard_images(plan, shard)
    return [images[start : start + batch_size] for start in range(0, len(images), batch_size)]


def _encode_shard(
    tokenizer: Autoencoder, plan: dict, shard: int, batch_size: int, images: Iterator[torch.Tensor]
) -> np.ndarray:
    """The codes (R, N, L) of one shard: every view of its images, view by view (see the module docstring);
    `images` yields the shard's decoded batches (`_shard_batches`) in order."""
    device = next(tokenizer.parameters()).device
    K, grid, size, seed, draws = plan["bits"], plan["grid"], plan["image_size"], plan["seed"], plan["draws"]
    n = len(_shard_images(plan, shard))
    codes_RNL = np.empty((max(1, draws), plan["views"] * n, grid * grid), dtype=code_dtype(K))
    for ids in _shard_batches(plan, shard, batch_size):
        start = int(ids[0]) - shard * plan["shard_size"]
        x = to_float(next(images)).to(device)
        cut = crop_views(x, size, plan["crops"], plan["num_crops"], ids, seed, plan["crop_range"])
        for v, view in enumerate(cut + [c.flip(-1) for c in cut] if plan["flip"] else cut):
            rows = v * n + start + np.arange(len(ids))
            if draws:
                uniforms = uniforms_for([item_seed(seed, i, v) for i in ids], (draws, K, grid, grid)).to(device)
                codes_RNL[:, rows] = tokenizer.draw_cells(view, uniforms).transpose(0, 1).cpu().numpy()
            else:
                codes_RNL[0, rows] = tokenizer.encode_cells(view).cpu().numpy()
    return codes_RNL


def _work_folder(out_dir: Path, tokenizer_dir: Path, plan: dict) -> Path | None:
    """The work folder in which to write `out_dir`, or None when `out_dir` already holds these codes.

    Refuses every `out_dir` that elmgen would have to delete or write into something not its own."""
    if out_dir == tokenizer_dir or tokenizer_dir in out_dir.parents:
        raise ElmgenError(f"--out {out_dir} is inside the tokenizer folder {tokenizer_dir}; pass a folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ElmgenError(f"--out {out_dir} is a file; pass an empty or new folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        done = read_json(out_dir / "meta.json")
        if not isinstance(done, dict) or "shards" not in done:
            raise ElmgenError(
                f"--out {out_dir} is not empty and not an elmgen code folder; pass an empty or new folder"
            )
        differ = [k for k in plan if k not in DERIVED and done.get(k) != plan[k]]
        if differ:
            what = ", ".join(f"{k} {reprlib.repr(done.get(k))} there, {reprlib.repr(plan[k])} now" for k in differ[:3])
            raise ElmgenError(f"{out_dir} holds codes made with other settings ({what}); pass another --out")
        CodeDataset(out_dir)  # finished: only check that it reads
        return None
    work = _partial(out_dir)
    if work.is_dir():
        # The same settings resume (meta.json without plan.json: killed just before the final rename).
        resume = plan in (read_json(work / "plan.json"), read_json(work / "meta.json"))
        for f in work.iterdir():
            own = any(fnmatch(f.name, p) for p in OWN_FILES)
            if f.is_file() and (own and not resume or any(fnmatch(f.name, f"{TMP_PREFIX}{p}.*") for p in OWN_FILES)):
                f.unlink()  # temporaries of a killed write, or the files of a run with other settings
        if not resume and any(work.iterdir()):
            raise ElmgenError(
                f"{work} holds {next(work.iterdir()).name}, which elmgen did not write; move it away and re-run"
            )
    work.mkdir(parents=True, exist_ok=True)
    return work


def _damaged(file: Path, problem: str) -> ElmgenError:
    return ElmgenError(f"{file} is damaged: {problem}; re-run `elmgen tokenize` into a new folder")


def _meta_problem(meta) -> str | None:
    """What makes a code folder's meta unusable, if anything."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in META_TYPES.items():
        value, low = meta.get(key), 0 if key == "draws" else 1
        if not isinstance(value, kind) or isinstance(value, bool) or kind is int and value < low:
            wanted = f"an integer >= {low}" if kind is int else f"a {kind.__name__}"
            return f"{key} is {reprlib.repr(value)}, not {wanted}"
    if meta["shards"] != [f"shard_{s:05d}.npy" for s in range(-(-meta["images"] // meta["shard_size"]))]:
        return f"shards {reprlib.repr(meta['shards'])} do not match {meta['images']} images of {meta['shard_size']}"
    if meta["count"] != meta["images"] * meta["views"]:
        return f"count {meta['count']} is not {meta['images']} images x {meta['views']} views"
    return None


def _load_npy(file: Path) -> np.ndarray:
    """A memory-mapped array; never unpickles."""
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise _damaged(file, f"cannot be read as an array ({e})") from None
    if not isinstance(array, np.ndarray):
        raise _damaged(file, "is not a .npy array")
    return array


class ShardedRows:
    """One draw of the codes of all shards, indexed like one (N, L) array by row indices or a slice."""

    def __init__(self, shards: list[np.ndarray], draw: int):
        self.parts = [shard[draw] for shard in shards]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.starts[-1]), self.parts[0].shape[1])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        flat = idx.reshape(-1)
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((flat.size, self.shape[1]), dtype=self.dtype)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.parts[s][flat[sel] - self.starts[s]]
        return out.reshape(*idx.shape, self.shape[1])


class CodeDataset:
    """A code folder; `batch(idx, vocab)` gives sub-codes (B, L, n) and labels (B,).

    `codes` reads the first draw as an (N, L) array; `draws[d]` the d-th of `num_draws`.
    """

    def __init__(self, path):
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ElmgenError(f"{path} is not a code folder (no meta.json); create one with 'elmgen tokenize'")
        self.path = path
        self.meta = meta = read_json(path / "meta.json")
        if isinstance(meta, dict) and "shards" not in meta:
            raise ElmgenError(f"{path} was written by an older elmgen; delete it and run 'elmgen tokenize' again")
        problem = _meta_problem(meta)
        if problem:
            raise _damaged(path / "meta.json", problem)
        L, images, size, views = meta["grid"] ** 2, meta["images"], meta["shard_size"], meta["views"]
        shards = []
        for s, name in enumerate(meta["shards"]):
            shard = _load_npy(path / name)
            expected = (max(1, meta["draws"]), views * min(size, images - s * size), L)
            if shard.shape != expected or shard.dtype != code_dtype(meta["bits"]):
                raise _damaged(
                    path / name,
                    f"holds {shard.dtype} codes of shape {shard.shape}; meta.json says "
                    f"{code_dtype(meta['bits'])} of shape {expected}",
                )
            shards.append(shard)
        self.labels = _load_npy(path / "labels.npy")
        if (
            self.labels.shape != (meta["count"],)
            or not np.issubdtype(self.labels.dtype, np.integer)
            or self.labels.min() < 0
            or self.labels.max() >= meta["num_classes"]
        ):
            raise _damaged(
                path / "labels.npy",
                f"holds {self.labels.dtype} of shape {self.labels.shape}; meta.json "
                f"says {meta['count']} integer labels below {meta['num_classes']}",
            )
        self.draws = [ShardedRows(shards, d) for d in range(shards[0].shape[0])]
        self.codes = self.draws[0]

    @property
    def num_draws(self) -> int:
        return len(self.draws)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, vocab: Vocab, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx`; codes stored with several Bernoulli draws give draw `epoch % num_draws`."""
        cells_BL = torch.from_numpy(self.draws[epoch % self.num_draws][idx].astype(np.int64))
        return cells_to_subcodes(cells_BL, vocab), torch.from_numpy(self.labels[idx].astype(np.int64))

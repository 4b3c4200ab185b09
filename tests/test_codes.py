"""Pre-tokenization: views (crops x flips), Bernoulli draws, shards, resuming, and the LM-side reader."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import torchrun

from elmgen.cli import main
from elmgen.codes import CodeDataset, tokenize
from elmgen.data import ImageDataset, crop_source_size, to_float, to_uint8
from elmgen.errors import ElmgenError
from elmgen.tokenizers import Autoencoder, TokenizerConfig
from elmgen.vocab import Vocab, cells_to_subcodes

SIZE = 8  # images are tokenized at 8x8; crops come from 10x10 (crop range 1.25)

# A 1-step tokenizer on 16 images, for the command-line tests of tokenize
TINY_TOKENIZER = [
    "data.limit=16",
    "train.steps=1",
    "tokenizer.base_width=8",
    "tokenizer.channel_mult=[1,2,2]",
    "tokenizer.latent_dim=8",
    "tokenizer.num_bits=8",
    "eval_images=4",
    "train.batch_size=4",
]


class PixelTokenizer(torch.nn.Module):
    """Cell code = grey value of each pixel (f = 1): a stored row shows exactly which view was encoded."""

    code_bits, num_codes = 8, 256

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def encode_cells(self, x):
        self.calls += 1
        return to_uint8(x[:, :1]).flatten(1).long()


PIXEL_META = {"path": "pixels", "fingerprint": "0", "kind": "pixels", "grid": SIZE, "image_size": SIZE}


class Pictures(ImageDataset):
    in_memory = True

    def __init__(self, n: int, side: int):
        self.pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 1, side, side), dtype=np.uint8))
        self.labels = np.arange(n) % 3
        self.class_names, self.name = ["a", "b", "c"], f"pictures{side}"

    def images(self, idx):
        return self.pixels[torch.as_tensor(np.asarray(idx))]


def view_rows(image: int, shard_size: int, n: int, views: int) -> np.ndarray:
    """Row indices of one image's views, in order: shards of images, view-major inside a shard."""
    s = image // shard_size
    in_shard = min(n, (s + 1) * shard_size) - s * shard_size
    return s * shard_size * views + np.arange(views) * in_shard + image - s * shard_size


def rows_of(codes: CodeDataset, image: int, shard_size: int, n: int) -> np.ndarray:
    return codes.codes[view_rows(image, shard_size, n, codes.meta["views"])].reshape(-1, SIZE, SIZE)


def test_five_crops_and_flips_are_the_expected_views(tmp_path):
    n, shard = 7, 3
    data = Pictures(n, crop_source_size(SIZE, 1.25))
    meta = tokenize(
        PixelTokenizer(),
        PIXEL_META,
        data,
        tmp_path / "c",
        Vocab.parse("2-4"),
        flip=True,
        crops="five",
        crop_range=1.25,
        batch_size=2,
        shard_size=shard,
    )
    codes = CodeDataset(tmp_path / "c")
    assert meta["views"] == 10 and len(codes) == meta["count"] == 70 and codes.codes.shape == (70, 64)
    assert meta["shards"] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    for image in (0, 4, 6):
        img = data.pixels[image, 0].numpy()
        crops = [img[:8, :8], img[:8, 2:], img[2:, :8], img[2:, 2:], img[1:9, 1:9]]
        expected = np.stack(crops + [c[:, ::-1] for c in crops])
        assert np.array_equal(rows_of(codes, image, shard, n), expected)
        assert set(codes.labels[view_rows(image, shard, n, 10)]) == {data.labels[image]}


def test_random_crops_are_seeded_crops_of_the_enlarged_image(tmp_path):
    data = Pictures(6, 9)  # crop range 1.125: a side of 9 (one of four exact crops) or 8 (the whole image resized)
    args = dict(crops="random", num_crops=3, crop_range=1.125, flip=True)
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "a", Vocab.parse("1-8"), seed=1, **args)
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "b", Vocab.parse("1-8"), seed=1, batch_size=4, **args)
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "c", Vocab.parse("1-8"), seed=2, **args)
    a, b, c = (CodeDataset(tmp_path / x) for x in "abc")
    assert len(a) == 6 * 6 and np.array_equal(a.codes[:], b.codes[:]) and not np.array_equal(a.codes[:], c.codes[:])
    kinds = []
    for image in range(6):
        views = rows_of(a, image, 8192, 6)
        assert np.array_equal(views[3:], views[:3, :, ::-1])  # the mirrored copies follow the crops
        img = data.pixels[image : image + 1]
        whole = to_uint8(F.interpolate(to_float(img), size=(8, 8), mode="bilinear", antialias=True))[0, 0].numpy()
        exact = [img[0, 0, t : t + 8, le : le + 8].numpy() for t in (0, 1) for le in (0, 1)]
        for v in views[:3]:
            kinds.append(
                "exact"
                if any(np.array_equal(v, e) for e in exact)
                else "whole"
                if np.array_equal(v, whole)
                else "other"
            )
    assert "other" not in kinds and {"exact", "whole"} <= set(kinds)


def test_shift_crops_are_seeded_translations_with_the_edge_repeated(tmp_path):
    data = Pictures(6, SIZE)  # loaded at their own size: a shift pads, it never resamples
    args = dict(crops="shift", num_crops=4, crop_range=1.25, flip=True)  # 8 px padded to 10: up to 1 px each way
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "a", Vocab.parse("1-8"), seed=1, **args)
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "b", Vocab.parse("1-8"), seed=1, batch_size=4, **args)
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "c", Vocab.parse("1-8"), seed=2, **args)
    a, b, c = (CodeDataset(tmp_path / x) for x in "abc")
    assert len(a) == 6 * 8 and np.array_equal(a.codes[:], b.codes[:]) and not np.array_equal(a.codes[:], c.codes[:])
    moves = set()
    for image in range(6):
        views = rows_of(a, image, 8192, 6)
        assert np.array_equal(views[4:], views[:4, :, ::-1])  # the mirrored copies follow the shifts
        padded = np.pad(data.pixels[image, 0].numpy(), 1, mode="edge")
        shifted = {(dy, dx): padded[1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        for v in views[:4]:
            found = [move for move, expected in shifted.items() if np.array_equal(v, expected)]
            assert found, "a shift crop is not a translation of its image by at most 1 px"
            moves.add(found[0])
    assert len(moves) >= 5  # 24 draws of 9 translations: several occur


def test_interrupted_tokenization_resumes_to_identical_files(tmp_path):
    data = Pictures(11, crop_source_size(SIZE, 1.25))
    args = dict(flip=True, crops="five", crop_range=1.25, batch_size=2, shard_size=3)
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "straight", Vocab.parse("2-4"), **args)

    crashing = PixelTokenizer()
    real = crashing.encode_cells

    def encode_then_crash(x):
        if crashing.calls == 45:  # in the third of four shards (2 batches x 10 views per full shard)
            raise KeyboardInterrupt
        return real(x)

    crashing.encode_cells = encode_then_crash
    with pytest.raises(KeyboardInterrupt):
        tokenize(crashing, PIXEL_META, data, tmp_path / "resumed", Vocab.parse("2-4"), **args)
    partial = tmp_path / ".resumed.partial"
    assert sorted(p.name for p in partial.glob("shard_*")) == ["shard_00000.npy", "shard_00001.npy"]
    (partial / ".tmp_shard_00002.npy.k3j9x2").write_bytes(b"half a shard, as a kill during the write leaves it")
    assert not (tmp_path / "resumed").exists()

    again = PixelTokenizer()
    tokenize(again, PIXEL_META, data, tmp_path / "resumed", Vocab.parse("2-4"), **args)
    assert again.calls == 30  # only shards 2 (2 batches) and 3 (1 batch), 10 views each
    files = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert files == [
        "labels.npy",
        "meta.json",
        "shard_00000.npy",
        "shard_00001.npy",
        "shard_00002.npy",
        "shard_00003.npy",
    ]
    for name in files:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert not partial.exists()


def test_changed_settings_start_over(tmp_path):
    data = Pictures(4, SIZE)
    crashing = PixelTokenizer()
    crashing.encode_cells = lambda x: (_ for _ in ()).throw(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        tokenize(crashing, PIXEL_META, data, tmp_path / "c", Vocab.parse("1-8"), shard_size=2)
    (tmp_path / ".c.partial" / "shard_00000.npy").write_bytes(b"from another run")
    tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "c", Vocab.parse("1-8"), flip=True, shard_size=2)
    assert len(CodeDataset(tmp_path / "c")) == 8


def test_bernoulli_draws_and_the_draw_per_epoch(tmp_path):
    torch.manual_seed(0)
    model = Autoencoder(TokenizerConfig(base_width=8, channel_mult=[1, 2], latent_dim=8, num_bits=8)).eval()
    meta = {**PIXEL_META, "kind": "bae", "grid": 4}
    data = Pictures(6, SIZE)
    tokenize(model, meta, data, tmp_path / "d", Vocab.parse("2-4"), draws=3, flip=True, shard_size=4)
    tokenize(model, meta, data, tmp_path / "e", Vocab.parse("2-4"), draws=3, flip=True, shard_size=4, batch_size=1)
    tokenize(model, meta, data, tmp_path / "det", Vocab.parse("2-4"))
    codes = CodeDataset(tmp_path / "d")
    assert codes.num_draws == 3 and len(codes) == 12 and codes.meta["draws"] == 3
    assert np.load(tmp_path / "d" / "shard_00000.npy").shape == (3, 8, 16)
    for name in ("shard_00000.npy", "shard_00001.npy"):  # per-image seeds: the batch size does not matter
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "e" / name).read_bytes()
    idx = np.array([0, 5, 11])
    draws = [codes.batch(idx, Vocab.parse("2-4"), epoch=e)[0] for e in range(4)]
    assert torch.equal(draws[3], draws[0]) and not torch.equal(draws[0], draws[1])
    assert torch.equal(
        draws[1], cells_to_subcodes(torch.from_numpy(codes.draws[1][idx].astype(np.int64)), Vocab.parse("2-4"))
    )
    det = CodeDataset(tmp_path / "det")
    assert det.num_draws == 1 and np.array_equal(det.codes[:6], model.encode_cells(to_float(data.images(range(6)))))


def test_user_errors(tmp_path):
    data = Pictures(2, SIZE)
    vq_meta = {**PIXEL_META, "kind": "vq"}
    with pytest.raises(ElmgenError, match="Bernoulli draws need the binary autoencoder"):
        tokenize(PixelTokenizer(), vq_meta, data, tmp_path / "x", Vocab.parse("1-8"), draws=2)
    with pytest.raises(ElmgenError, match="crop_range"):
        tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "x", Vocab.parse("1-8"), crops="five")
    with pytest.raises(ElmgenError, match="needs the images at 10 px"):
        tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "x", Vocab.parse("1-8"), crops="five", crop_range=1.25)
    with pytest.raises(ElmgenError, match="num_crops applies to random and shift crops"):
        tokenize(PixelTokenizer(), PIXEL_META, data, tmp_path / "x", Vocab.parse("1-8"), num_crops=2)
    with pytest.raises(ElmgenError, match="less than a pixel; pass a crop_range of at least 1.25"):
        tokenize(
            PixelTokenizer(), PIXEL_META, data, tmp_path / "x", Vocab.parse("1-8"), crops="shift", crop_range=1.125
        )
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"grid": 8}))
    with pytest.raises(ElmgenError, match="older elmgen"):
        CodeDataset(tmp_path / "old")


def test_cli_tokenize_with_random_crops_and_draws(fake_fmnist, tmp_path, capsys):
    tok = tmp_path / "tok"
    assert main(["train-tokenizer", "--out", str(tok), *TINY_TOKENIZER]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "tokenize",
                "--tokenizer",
                str(tok),
                "--out",
                str(tmp_path / "codes"),
                "--limit",
                "12",
                "--crops",
                "random",
                "--num-crops",
                "2",
                "--crop-range",
                "1.125",
                "--flip",
                "--draws",
                "2",
                "--shard-size",
                "5",
            ]
        )
        == 0
    )
    meta = json.loads(capsys.readouterr().out)
    assert (meta["count"], meta["views"], meta["draws"], meta["vocab"]) == (48, 4, 2, "2-4")
    codes = CodeDataset(tmp_path / "codes")
    assert len(codes) == 48 and codes.num_draws == 2 and len(codes.meta["shards"]) == 3
    sub, labels = codes.batch(np.arange(48), Vocab.parse("4-2"), epoch=1)
    assert sub.shape == (48, 64, 4) and int(sub.max()) < 4 and labels.shape == (48,)


# Rank 1 dies (as under kill -9) when it starts its second shard; torchrun then stops rank 0 too.
DIE_IN_SECOND_SHARD = """
import os, sys
import elmgen.codes
from elmgen.cli import main

real, calls = elmgen.codes._encode_shard, []


def encode_or_die(*args):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        os._exit(9)
    return real(*args)


elmgen.codes._encode_shard = encode_or_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_write_the_folder_of_one_and_a_killed_run_resumes(fake_fmnist, tmp_path, capsys):
    tok = tmp_path / "tok"
    assert main(["train-tokenizer", "--out", str(tok), *TINY_TOKENIZER]) == 0
    settings = ["--limit", "14", "--crops", "random", "--num-crops", "2", "--crop-range", "1.125", "--flip"]
    settings += ["--draws", "2", "--shard-size", "3", "--tokenizer", str(tok)]
    assert main(["tokenize", "--out", str(tmp_path / "one"), *settings]) == 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(files) == 7  # five shards, labels, meta

    def same_as_one(folder):
        assert sorted(p.name for p in folder.iterdir()) == files
        for name in files:
            assert (folder / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

    done = torchrun("-m", "elmgen.cli", "tokenize", "--out", str(tmp_path / "two"), *settings)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["count"] == 56  # printed once, by the main process
    same_as_one(tmp_path / "two")

    script = tmp_path / "die.py"
    script.write_text(DIE_IN_SECOND_SHARD)
    killed = torchrun(str(script), "tokenize", "--out", str(tmp_path / "killed"), *settings)
    assert killed.returncode != 0
    partial = tmp_path / ".killed.partial"
    assert not (tmp_path / "killed").exists() and (partial / "plan.json").is_file()
    assert (partial / "shard_00001.npy").is_file()  # rank 1's first shard (it takes shards 1, 3)
    assert not (partial / "shard_00003.npy").exists() and not (partial / "meta.json").exists()
    resumed = torchrun("-m", "elmgen.cli", "tokenize", "--out", str(tmp_path / "killed"), *settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    same_as_one(tmp_path / "killed")
    assert not partial.exists()

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not elmgen's")
    refused = torchrun("-m", "elmgen.cli", "tokenize", "--out", str(tmp_path / "other"), *settings)
    assert refused.returncode != 0 and "not an elmgen code folder" in refused.stderr
    assert "the main process refused" in refused.stderr  # rank 1 ends too, at once, with one line
    assert (tmp_path / "other" / "notes.txt").read_text() == "not elmgen's"

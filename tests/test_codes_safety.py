"""Code folders never cost a user a file, and a damaged one is a one-line error, never a traceback."""

import errno
import json
import os

import numpy as np
import pytest

from elmgen.cli import main
from elmgen.codes import CodeDataset, tokenize
from elmgen.errors import ElmgenError
from elmgen.vocab import Vocab
from tests.test_codes import PIXEL_META, SIZE, TINY_TOKENIZER, Pictures, PixelTokenizer

VOCAB = Vocab.parse("2-4")


def encode(tmp_path, out, tokenizer=None, **kw):
    meta = {**PIXEL_META, "path": str(tmp_path / "tok")}
    return tokenize(tokenizer or PixelTokenizer(), meta, Pictures(5, SIZE), out, VOCAB, shard_size=2, **kw)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ElmgenError, match="not empty and not an elmgen code folder") as e:
        encode(tmp_path, out)
    assert str(out) in one_line(e) and (out / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("a file")
    with pytest.raises(ElmgenError, match="is a file"):
        encode(tmp_path, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "a file"
    (tmp_path / "empty").mkdir()
    assert encode(tmp_path, tmp_path / "empty")["count"] == 5 and len(CodeDataset(tmp_path / "empty")) == 5


def test_refuses_the_tokenizer_folder(tmp_path):
    tok = tmp_path / "tok"
    (tok / "checkpoints").mkdir(parents=True)
    (tok / "checkpoints" / "latest").write_text("step_00000001")
    for out in (tok, tok / "codes", tok / "checkpoints" / ".." / "x", tmp_path / "." / "tok"):
        with pytest.raises(ElmgenError, match="inside the tokenizer folder"):
            encode(tmp_path, out)
    assert sorted(p.relative_to(tok).as_posix() for p in tok.rglob("*")) == ["checkpoints", "checkpoints/latest"]
    assert not (tmp_path / ".tok.partial").exists()


def test_an_existing_code_folder_is_kept_or_refused_never_deleted(tmp_path):
    out = tmp_path / "c"
    encode(tmp_path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = PixelTokenizer()
    assert encode(tmp_path, out, again)["count"] == 5 and again.calls == 0  # finished: nothing to redo
    with pytest.raises(ElmgenError, match=r"other settings \(flip False there, True now\); pass another --out"):
        encode(tmp_path, out, flip=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_work_folder_of_other_settings_loses_only_elmgen_files(tmp_path):
    crashing = PixelTokenizer()
    crashing.encode_cells = lambda x: (_ for _ in ()).throw(KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        encode(tmp_path, tmp_path / "c", crashing)
    work = tmp_path / ".c.partial"
    (work / "notes.txt").write_text("mine")
    with pytest.raises(ElmgenError, match="notes.txt, which elmgen did not write") as e:
        encode(tmp_path, tmp_path / "c", flip=True)
    assert one_line(e) and sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    (work / "notes.txt").unlink()
    encode(tmp_path, tmp_path / "c", flip=True)
    assert len(CodeDataset(tmp_path / "c")) == 10


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    real = os.fsync

    def fsync_until_full(fd):
        # plan.json and shard 0 fit, shard 1 finds the disk full
        if "shard_00001" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_full)
    with pytest.raises(ElmgenError, match="shard_00001.npy: No space left on device; free disk space") as e:
        encode(tmp_path, tmp_path / "c")
    one_line(e)
    work = tmp_path / ".c.partial"
    assert sorted(p.name for p in work.iterdir()) == ["plan.json", "shard_00000.npy"]  # no temporary left
    monkeypatch.setattr(os, "fsync", real)
    again = PixelTokenizer()
    encode(tmp_path, tmp_path / "c", again)
    assert again.calls == 2 and len(CodeDataset(tmp_path / "c")) == 5


def test_a_kill_just_before_the_final_rename_resumes(tmp_path):
    encode(tmp_path, tmp_path / "c")
    os.replace(tmp_path / "c", tmp_path / ".c.partial")  # meta.json written, plan.json gone, not yet renamed
    again = PixelTokenizer()
    encode(tmp_path, tmp_path / "c", again)
    assert again.calls == 0 and len(CodeDataset(tmp_path / "c")) == 5 and not (tmp_path / ".c.partial").exists()


@pytest.fixture
def codes(tmp_path):
    encode(tmp_path, tmp_path / "c", flip=True)  # shards of 4, 4 and 2 rows
    return tmp_path / "c"


def damaged(path, *match) -> str:
    with pytest.raises(ElmgenError) as e:
        CodeDataset(path)
    line = one_line(e)
    assert "re-run `elmgen tokenize` into a new folder" in line
    for m in match:
        assert m in line, line
    return line


def edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_truncated_shard(codes):
    shard = codes / "shard_00001.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    damaged(codes, "shard_00001.npy is damaged")
    shard.write_bytes(shard.read_bytes()[:40])  # inside the header
    damaged(codes, "shard_00001.npy is damaged")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"grid": "8"}, "grid is '8', not an integer >= 1"),
        ({"draws": None}, "draws is None"),
        ({"shard_size": 0}, "shard_size is 0"),
        ({"count": 99}, "count 99 is not 5 images x 2 views"),
        ({"shards": ["../../etc/passwd"]}, "do not match 5 images of 2"),
        ({"bits": 20}, "shard_00000.npy is damaged: holds uint16 codes"),
        ({"images": 6, "count": 12}, "shard_00002.npy is damaged"),
        ({"num_classes": 2}, "labels.npy is damaged"),
    ],
)
def test_meta_with_wrong_values(codes, change, match):
    edit_meta(codes, **change)
    damaged(codes, match)


def test_meta_that_is_not_an_object(codes):
    (codes / "meta.json").write_text("[1, 2")
    damaged(codes, "meta.json is damaged: not a JSON object")


def test_wrong_labels_and_shards(codes):
    labels = np.load(codes / "labels.npy")
    np.save(codes / "labels.npy", labels[:-1])
    damaged(codes, "labels.npy is damaged", "shape (9,)")
    np.save(codes / "labels.npy", labels.astype(np.float32) + 0.5)
    damaged(codes, "labels.npy is damaged", "float32")
    np.save(codes / "labels.npy", labels)
    np.save(codes / "shard_00002.npy", np.zeros((1, 3, SIZE * SIZE), dtype=np.uint8))
    damaged(codes, "shard_00002.npy is damaged", "shape (1, 3, 64)", "(1, 2, 64)")
    np.save(codes / "shard_00002.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    damaged(codes, "shard_00002.npy is damaged")
    np.savez(codes / "shard_00002.npy", np.zeros(3))
    os.replace(codes / "shard_00002.npy.npz", codes / "shard_00002.npy")
    damaged(codes, "shard_00002.npy is damaged", "not a .npy array")


def test_cli_tokenize_out_and_limit(fake_fmnist, tmp_path, capsys):
    tok = tmp_path / "tok"
    assert main(["train-tokenizer", "--out", str(tok), *TINY_TOKENIZER]) == 0
    files = {p: p.read_bytes() for p in tok.rglob("*") if p.is_file()}
    capsys.readouterr()

    def error(*args) -> str:
        try:
            code = main(["tokenize", "--tokenizer", str(tok), *map(str, args)])
        except SystemExit as e:  # argparse refuses out-of-range numbers before elmgen runs
            code = e.code
        assert code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "inside the tokenizer folder" in error("--out", tok, "--limit", 4)
    assert "inside the tokenizer folder" in error("--out", tok / "checkpoints", "--limit", 4)
    assert {p: p.read_bytes() for p in tok.rglob("*") if p.is_file()} == files
    for limit in (0, -3):
        line = error("--out", tmp_path / "codes", "--limit", limit)
        assert "--limit" in line and "must be at least 1" in line and "px" not in line

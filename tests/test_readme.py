"""The README's Python examples run as written, against a tiny trained run in their working folder."""

import re
from pathlib import Path

from test_cli import TOK

from elmgen.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_examples_run(fake_fmnist, tmp_path, monkeypatch, one_thread):
    assert BLOCKS, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")  # the examples' paths are relative to the working folder
    for argv in (
        ["train-tokenizer", "--out", runs / "bae", "data.limit=32", "train.steps=2", *TOK],
        ["tokenize", "--tokenizer", runs / "bae", "--out", runs / "codes", "--limit", "20"],
        [
            "train",
            "--codes",
            runs / "codes",
            "--out",
            runs / "lm",
            "--preset",
            "micro",
            "train.steps=2",
            "train.batch_size=4",
        ],
    ):
        assert main([str(a) for a in argv]) == 0, argv
    for block in BLOCKS:
        exec(compile(block, str(README), "exec"), {})

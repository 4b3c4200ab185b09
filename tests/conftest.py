import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    root = write_fake_fmnist(tmp_path / "fmnist")
    monkeypatch.setenv("ELMGEN_FASHION_MNIST", str(root))
    return root


def write_fake_fmnist(root):
    """A small Fashion-MNIST stand-in in IDX format: class c is a bright square of side 4 + 2c."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 30, size=(n, 28, 28))
        for i, c in enumerate(labels):
            s = 4 + 2 * c
            images[i, 14 - s // 2 : 14 + s // 2, 14 - s // 2 : 14 + s // 2] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Three classes of colour PNG/JPEG images of different sizes (non-square, to exercise the crop)."""
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    for c, colour in enumerate(colours):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(6):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            arr = (np.asarray(colour)[None, None] * rng.uniform(0.6, 1.0, size=(h, w, 1))).astype(np.uint8)
            suffix = "png" if i % 2 else "jpg"
            Image.fromarray(arr).save(d / f"{i}.{suffix}")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a busy machine two threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchrun(*args: str, nproc: int = 2, timeout: int = 300):
    """`torchrun --standalone` with `nproc` CPU processes (gloo), one thread each; `args` start with `-m module` or
    a script. Returns the finished process (stdout, stderr as text)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from elmgen.data import (
    DataConfig,
    center_crop_resize,
    check_images,
    datasets,
    load_dataset,
    read_idx,
    to_float,
    to_uint8,
)
from elmgen.errors import ElmgenError
from tests.conftest import write_idx


def test_fashion_mnist_is_padded_to_32(fake_fmnist):
    ds = load_dataset(DataConfig(split="test"))
    assert len(ds) == 50 and ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    x = ds.images([0, 1])
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.uint8
    assert x[:, :, :2].sum() == 0 and x[:, :, :, -2:].sum() == 0  # 2-pixel zero border
    assert ds.labels[:3].tolist() == [0, 1, 2]
    rgb = load_dataset(DataConfig(split="test", channels=3, image_size=16, limit=5))
    assert rgb.images([4]).shape == (1, 3, 16, 16) and len(rgb) == 5


def test_real_fashion_mnist_files_when_installed():
    """CI installs Debian's dataset-fashion-mnist; this reads the real files."""
    ds = load_dataset(DataConfig(split="test"))
    assert len(ds) == 10_000 and np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.images([0]).float().mean() > 10


def test_idx_errors(tmp_path, monkeypatch):
    bad = tmp_path / "x.gz"
    write_idx(bad, np.zeros((3, 4), dtype=np.uint8))
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(ElmgenError):
        read_idx(bad)
    monkeypatch.setenv("ELMGEN_FASHION_MNIST", str(tmp_path / "missing"))
    with pytest.raises(ElmgenError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset(DataConfig())


def test_image_folder(image_folder):
    ds = load_dataset(DataConfig(source=str(image_folder), image_size=16, channels=3, holdout=0.0))
    assert len(ds) == 18 and ds.class_names == ["class_0", "class_1", "class_2"]
    x = ds.images(np.arange(18))
    assert x.shape == (18, 3, 16, 16)
    dominant = x.float().mean((2, 3)).argmax(1)
    assert torch.equal(dominant, torch.as_tensor(ds.labels))  # class c is mostly colour channel c
    grey = load_dataset(DataConfig(source=str(image_folder), image_size=8, channels=1))
    assert grey.images([0]).shape == (1, 1, 8, 8)


def test_folder_without_test_split_holds_out_a_fixed_share_of_each_class(image_folder):
    def files(split, holdout=0.1):
        ds = load_dataset(DataConfig(source=str(image_folder), split=split, holdout=holdout))
        return ds, [f.name for f in ds.files]

    train, train_files = files("train")
    test, test_files = files("test")
    assert (len(train), len(test)) == (15, 3)  # 6 images a class: one of each held out
    assert sorted(test.labels.tolist()) == [0, 1, 2] and np.bincount(train.labels).tolist() == [5, 5, 5]
    pairs = {(f, c) for f, c in zip(train_files, train.labels, strict=True)}
    assert not pairs & {(f, c) for f, c in zip(test_files, test.labels, strict=True)}
    assert files("test")[1] == test_files  # the same split every time
    assert "held-out part: 10% of each class held out" in test.name and "training part" in train.name
    assert train.labels[:3].tolist() == [0, 1, 2]  # classes interleaved: the first images cover every class
    assert len(files("test", holdout=0.5)[0]) == 9
    assert len(files("test", holdout=0.0)[0]) == 18  # no hold-out: the test split is the whole folder
    (image_folder / "test" / "class_0").mkdir(parents=True)  # a real test/ folder wins over the hold-out
    Image.new("RGB", (8, 8)).save(image_folder / "test" / "class_0" / "x.png")
    assert len(files("test")[0]) == 1
    with pytest.raises(ElmgenError, match="holdout must be in"):
        files("train", holdout=1.0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ElmgenError, match="not found"):
        load_dataset(DataConfig(source=str(tmp_path / "none")))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ElmgenError, match="no images"):
        load_dataset(DataConfig(source=str(tmp_path / "empty")))


def test_image_folder_structure_errors(image_folder, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("L", (8, 8)).save(flat / "a.png")
    with pytest.raises(ElmgenError, match=f"{flat} has no class sub-folders"):
        load_dataset(DataConfig(source=str(flat)))
    (image_folder / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    assert load_dataset(DataConfig(source=str(image_folder))).num_classes == 3
    (image_folder / "class_3").mkdir()
    (image_folder / "class_3" / "readme.txt").write_text("not an image")
    with pytest.raises(ElmgenError, match=r"class folder \S*class_3 holds no images \(.bmp, .jpeg"):
        load_dataset(DataConfig(source=str(image_folder)))
    for limit in (0, -1):
        with pytest.raises(ElmgenError, match="--limit .* must be positive"):
            load_dataset(DataConfig(limit=limit))


def test_float_labels_are_refused(fake_fmnist):
    labels = fake_fmnist / "t10k-labels-idx1-ubyte.gz"
    header = bytes([0, 0, 0x0D, 1]) + (50).to_bytes(4, "big")
    with gzip.open(labels, "wb") as f:
        f.write(header + (np.arange(50) % 10 + 0.7).astype(">f4").tobytes())
    with pytest.raises(ElmgenError, match="holds float values, not unsigned bytes"):
        load_dataset(DataConfig(split="test"))


def break_images(root):
    """A file that is no image, a truncated PNG and a truncated JPEG; returns their paths."""
    png, jpg = sorted((root / "class_1").glob("*.png"))[0], sorted((root / "class_2").glob("*.jpg"))[0]
    (root / "class_0" / "notes.png").write_bytes(b"not a png")
    for f in (png, jpg):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    return sorted(str(f) for f in (root / "class_0" / "notes.png", png, jpg))


def test_check_images_reports_every_bad_file(image_folder, tmp_path):
    assert check_images(image_folder) == []
    bad = break_images(image_folder)
    found = check_images(image_folder, workers=2)
    assert sorted(path for path, _ in found) == bad and all(reason for _, reason in found)
    split = tmp_path / "split"
    (split / "train").mkdir(parents=True)
    image_folder.rename(split / "test")
    (split / "train" / "cls").mkdir()
    moved = [path.replace(str(image_folder), str(split / "test")) for path in bad]
    assert [path for path, _ in check_images(split)] == [str(split / "train" / "cls")] + moved


def test_a_small_folder_is_checked_when_loaded(image_folder, monkeypatch):
    bad = break_images(image_folder)
    with pytest.raises(ElmgenError) as e:
        load_dataset(DataConfig(source=str(image_folder)))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"3 corrupt or unreadable image(s) in {image_folder}")
    assert bad[0] in line and f"run `elmgen check-data {image_folder}` for the full list" in line
    monkeypatch.setattr(datasets, "CHECK_AT_LOAD_MAX_FILES", 10)  # a large folder: found when read
    ds = load_dataset(DataConfig(source=str(image_folder)))
    with pytest.raises(ElmgenError, match="corrupt or unreadable image") as e:
        ds.images(np.arange(len(ds)))
    assert any(f"image {path}:" in str(e.value) for path in bad)


def test_center_crop_keeps_the_middle():
    arr = np.zeros((40, 100), dtype=np.uint8)
    arr[:, 30:70] = 255  # the central 40x40 square is white
    out = np.asarray(center_crop_resize(Image.fromarray(arr), 20))
    assert out.shape == (20, 20) and out.mean() > 250


def test_float_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(x)), x)
    assert to_float(x).min() == -1 and to_float(x).max() == 1

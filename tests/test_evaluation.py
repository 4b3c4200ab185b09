"""Generative metrics against independent computations, reference statistics, sample files, and `elmgen eval`."""

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist

from elmgen import evaluation as ev
from elmgen.cli import main
from elmgen.config import build_config
from elmgen.data import DataConfig, load_dataset
from elmgen.errors import ElmgenError
from elmgen.evaluation import metrics
from elmgen.io import file_hash
from elmgen.train import ClassifierJob, train_classifier

# --- metrics on features ------------------------------------------------------------------------------------------


def reference_fid(x, y):
    """FID written independently: Tr((S1 S2)^1/2) as the sum of square roots of the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), with S1^1/2 from an eigendecomposition."""
    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)
    return np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    got = ev.frechet_distance(*ev.feature_stats(x), *ev.feature_stats(y))
    assert got == pytest.approx(reference_fid(x, y), rel=1e-9)
    assert got > 1.0
    assert ev.frechet_distance(*ev.feature_stats(x), *ev.feature_stats(x)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    assert ev.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 20)), rng.normal(size=(7, 20)) + 0.5
    got = ev.frechet_distance(*ev.feature_stats(x), *ev.feature_stats(y))
    assert np.isfinite(got) and got == pytest.approx(reference_fid(x, y), rel=1e-3)
    with pytest.raises(ElmgenError, match="do not match"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_on_hand_made_probabilities():
    eye = np.eye(10)
    confident_and_diverse = eye[np.arange(100) % 10]
    assert ev.inception_score(confident_and_diverse, splits=1) == pytest.approx((10.0, 0.0))
    assert ev.inception_score(np.full((50, 10), 0.1), splits=10) == pytest.approx((1.0, 0.0))
    # a class-by-class file (as class-balanced sampling writes it) is not scored one class per split
    class_by_class = eye[np.repeat(np.arange(10), 10)]
    assert ev.inception_score(class_by_class, splits=10)[0] > 4
    # one split: half [1, 0], half [.5, .5] -> p(y) = [.75, .25];
    # KL = ln(4/3) and .5 ln(2/3) + .5 ln 2; IS = exp(mean of the two)
    mixed = np.array([[1.0, 0.0]] * 5 + [[0.5, 0.5]] * 5)
    expected = np.exp((np.log(4 / 3) + 0.5 * np.log(2 / 3) + 0.5 * np.log(2)) / 2)
    assert ev.inception_score(mixed, splits=1)[0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ElmgenError, match="at least 10 samples"):
        ev.inception_score(eye[:5], splits=10)


def reference_precision_recall(real, fake, k):
    """The ADM definition, brute force: the radius of a point is the distance to its k-th nearest other point."""
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    precision = (cdist(fake, real) <= real_radii[None]).any(1).mean()
    recall = (cdist(real, fake) <= fake_radii[None]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("rows_per_block", [None, 7])
def test_precision_recall_match_brute_force(rows_per_block, monkeypatch):
    if rows_per_block:  # exercise the blocked distance loops
        monkeypatch.setattr(metrics, "_rows_per_block", lambda n: rows_per_block)
    rng = np.random.default_rng(2)
    real = rng.normal(size=(80, 5))
    fake = rng.normal(size=(60, 5)) * 1.5 + 0.7  # overlaps the real cloud only in part
    got = ev.precision_recall(real, fake, k=3)
    want = reference_precision_recall(real, fake, 3)
    assert (got["precision"], got["recall"]) == pytest.approx(want)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    assert ev.precision_recall(real, real, k=3) == {"precision": 1.0, "recall": 1.0}
    radii = ev.knn_radii(real, 3)
    assert radii == pytest.approx(np.sort(cdist(real, real), axis=1)[:, 3])
    assert ev.precision_recall(real, fake, 3, real_radii_N=radii) == got


def test_class_accuracy_per_class():
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    out = ev.class_accuracy(probs, np.array([0, 1, 1, 2, 2, 0]), ["a", "b", "c"])
    assert out["class_accuracy"] == pytest.approx(4 / 6)
    assert out["per_class_accuracy"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1.0})
    with pytest.raises(ElmgenError, match="knows 3 classes"):
        ev.class_accuracy(probs, np.array([0, 1, 1, 2, 2, 7]), ["a", "b", "c"])


def test_class_scores_are_the_figures_per_image():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    scores = ev.class_scores(probs, np.array([0, 1, 2]), 3)
    assert scores["class_accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert scores["class_confidence"] == pytest.approx([0.7, 0.4, 0.6])
    out = ev.class_accuracy(probs, np.array([0, 1, 2]), ["a", "b", "c"])
    assert out["class_accuracy"] == pytest.approx(2 / 3) and out["class_confidence"] == pytest.approx(1.7 / 3)


def test_per_sample_scores_average_to_the_figures(fake_fmnist, tmp_path):
    extractor = ev.load_extractor("classifier", classifier=train_small_classifier(tmp_path / "clf", steps=2))
    test = load_dataset(DataConfig(split="test"))
    write_adm(tmp_path / "s.npz", test.images(np.arange(12)), test.labels[:12])
    got = ev.evaluate_samples(tmp_path / "s.npz", DataConfig(split="test"), extractor, splits=2, per_sample=True)
    assert set(got["per_sample"]) == {"precision", "class_accuracy", "class_confidence"}
    for name, values in got["per_sample"].items():
        assert len(values) == 12 and np.mean(values) == pytest.approx(got[name])
    assert "per_sample" not in ev.evaluate_samples(tmp_path / "s.npz", DataConfig(split="test"), extractor, splits=2)


# --- statistics files and sample files ------------------------------------------------------------------------------


def test_stats_round_trip_in_pytorch_fid_layout(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 4)).astype(np.float32)
    mu, sigma = ev.feature_stats(feats)
    space = {"name": "elmgen-classifier", "fingerprint": "abc123", "feature_dim": 4}
    stats = ev.RefStats(mu, sigma, 40, "somewhere", space, feats, ev.knn_radii(feats, 3), 3)
    path = ev.save_ref_stats(stats, tmp_path / "ref.npz")
    with np.load(path) as raw:  # what pytorch-fid reads
        assert raw["mu"].shape == (4,) and raw["sigma"].shape == (4, 4) and raw["mu"].dtype == np.float64
    back = ev.load_ref_stats(path)
    assert np.array_equal(back.mu, mu) and np.array_equal(back.sigma, sigma) and np.array_equal(back.feats, feats)
    assert (back.count, back.source, back.feature_space, back.k) == (40, "somewhere", space, 3)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # a stats file from another tool
    other = ev.load_ref_stats(tmp_path / "pytorch_fid.npz")
    assert other.feature_space is None and other.feats is None
    extractor = types.SimpleNamespace(feature_space={**space, "fingerprint": "def456"})
    with pytest.raises(ElmgenError, match="recompute it"):
        ev.check_stats(back, extractor, path)
    assert ev.check_stats(other, extractor, path) is other


def test_npz_shards_are_read_together(tmp_path):
    rng = np.random.default_rng(4)
    a, b = (
        rng.integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8),
        rng.integers(0, 256, size=(3, 8, 8, 1), dtype=np.uint8),
    )
    np.savez(tmp_path / "s0.npz", a, np.arange(5))
    np.savez_compressed(tmp_path / "s1.npz", b, np.arange(3) + 5)
    source = ev.open_samples(tmp_path)
    assert len(source) == 8 and source.labels.tolist() == list(range(8))
    got = np.concatenate(list(source.batches(3, size=8, channels=1)))
    assert np.array_equal(got, np.concatenate([a, b]).transpose(0, 3, 1, 2))
    rgb = np.concatenate(list(source.batches(4, size=8, channels=3)))
    assert rgb.shape == (8, 3, 8, 8) and np.array_equal(rgb[:, 0], rgb[:, 2])
    np.savez(tmp_path / "s2.npz", a)
    with pytest.raises(ElmgenError, match="some sample shards have labels"):
        ev.open_samples(tmp_path)
    np.savez(tmp_path / "float.npz", a.astype(np.float32))
    with pytest.raises(ElmgenError, match="expected uint8 images"):
        ev.open_samples(tmp_path / "float.npz")


def test_the_shares_of_a_run_are_read_complete_and_in_rank_order(tmp_path):
    images = np.random.default_rng(5).integers(0, 256, size=(7, 8, 8, 1), dtype=np.uint8)
    for rank, part in enumerate((slice(0, 2), slice(2, 4), slice(4, 7))):  # written in another order
        np.savez(tmp_path / f"samples.rank{rank:05d}-of-00003.npz", images[part], np.arange(7)[part])
    files = sorted(tmp_path.glob("*.npz"), reverse=True)
    for samples in (tmp_path, files):
        source = ev.open_samples(samples)
        assert source.labels.tolist() == list(range(7))
        assert np.array_equal(np.concatenate(list(source.batches(3, 8, 1))), images.transpose(0, 3, 1, 2))
    with pytest.raises(ElmgenError, match="lack samples.rank00001-of-00003.npz"):
        ev.open_samples([files[0], files[2]])
    with pytest.raises(ElmgenError, match="a share of samples twice"):
        ev.open_samples([*files, files[1]])
    np.savez(tmp_path / "samples.rank00000-of-00002.npz", images[:3], np.arange(3))
    with pytest.raises(ElmgenError, match=r"several runs \(samples.rank\*-of-00002, samples.rank\*-of-00003\)"):
        ev.open_samples(tmp_path)
    np.savez(tmp_path / "samples.npz", images, np.arange(7))
    with pytest.raises(ElmgenError, match="several runs .*samples.npz"):
        ev.open_samples([*files, tmp_path / "samples.npz"])


def test_conform_channels_and_size():
    grey_rgb = np.repeat(np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1), 3, axis=-1)
    assert np.array_equal(ev.conform(grey_rgb, 8, 1, "x")[:, 0], grey_rgb[..., 0])
    colour = grey_rgb.copy()
    colour[..., 0] = 0
    with pytest.raises(ElmgenError, match="colour images"):
        ev.conform(colour, 8, 1, "x")
    assert ev.conform(np.zeros((2, 20, 30), np.uint8), 16, 3, "x").shape == (2, 3, 16, 16)


# --- the command line ---------------------------------------------------------------------------------------------


def error_line(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("elmgen: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_small_classifier(out, steps: int):
    job = build_config(
        ClassifierJob,
        None,
        [
            "classifier.widths=[8,16,32]",
            "classifier.feature_dim=16",
            f"train.steps={steps}",
            "train.batch_size=32",
            "train.lr=5e-3",
            "train.warmup_steps=5",
            f"train.save_every={steps}",
            "shift=0",
            "hflip=false",
        ],
    )
    train_classifier(job, out)
    return out


@pytest.fixture
def classifier(fake_fmnist, tmp_path):
    return train_small_classifier(tmp_path / "clf", steps=60)


def write_adm(path, images_NCHW, labels):
    np.savez(path, images_NCHW.numpy().transpose(0, 2, 3, 1), np.asarray(labels))


@pytest.mark.slow
def test_eval_end_to_end(classifier, tmp_path, capsys):
    test = load_dataset(DataConfig(split="test"))
    write_adm(tmp_path / "real.npz", test.images(np.arange(50)), test.labels)
    noise = torch.randint(0, 256, (50, 1, 32, 32), dtype=torch.uint8)
    write_adm(tmp_path / "noise.npz", noise, test.labels)

    def run_eval(*argv):
        assert main(["eval", "--classifier", str(classifier), "--splits", "2", *map(str, argv)]) == 0
        return json.loads(capsys.readouterr().out)

    real = run_eval("--samples", tmp_path / "real.npz", "--ref", "fashion-mnist", "--out", tmp_path / "real.json")
    assert json.loads((tmp_path / "real.json").read_text()) == real
    assert (real["num_samples"], real["num_reference"]) == (50, 200)
    assert real["feature_space"]["name"] == "elmgen-classifier"
    assert real["feature_space"]["fingerprint"] == json.loads((classifier / "eval.json").read_text())["fingerprint"]
    assert real["class_accuracy"] >= 0.9 and len(real["per_class_accuracy"]) == 10
    assert real["inception_score"] > 4 and 0.5 < real["precision"] <= 1 and 0.5 < real["recall"] <= 1
    fake = run_eval("--samples", tmp_path / "noise.npz", "--ref", "fashion-mnist")
    assert fake["fid"] > 10 * real["fid"] and fake["precision"] < real["precision"]
    assert fake["inception_score"] < real["inception_score"]

    # the same reference as precomputed statistics gives the same numbers
    assert (
        main(
            ["ref-stats", "--classifier", str(classifier), "--ref", "fashion-mnist", "--out", str(tmp_path / "ref.npz")]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["count"] == 200
    again = run_eval("--samples", tmp_path / "real.npz", "--ref", tmp_path / "ref.npz")
    for key in ("fid", "precision", "recall", "inception_score", "num_reference"):
        assert again[key] == pytest.approx(real[key], rel=1e-9), key

    # a folder of PNGs in class-id sub-folders is the same samples
    for i, (img, label) in enumerate(zip(test.images(np.arange(50)), test.labels, strict=True)):
        (tmp_path / "png" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(tmp_path / "png" / str(label) / f"{i}.png")
    png = run_eval("--samples", tmp_path / "png", "--ref", tmp_path / "ref.npz")
    assert png["fid"] == pytest.approx(real["fid"], rel=1e-4, abs=1e-6)  # other batches: float rounding only
    assert png["class_accuracy"] == real["class_accuracy"]


def test_eval_user_errors(fake_fmnist, tmp_path, capsys):
    classifier = train_small_classifier(tmp_path / "clf", steps=2)
    assert "--classifier RUN" in error_line(capsys, "eval", "--samples", tmp_path, "--ref", "fashion-mnist")
    assert "samples not found" in error_line(
        capsys, "eval", "--classifier", classifier, "--samples", tmp_path / "none.npz", "--ref", "fashion-mnist"
    )
    other = ev.RefStats(np.zeros(16), np.eye(16), 5, "x", {"name": "elmgen-classifier", "fingerprint": "0" * 16})
    ev.save_ref_stats(other, tmp_path / "other.npz")
    write_adm(tmp_path / "s.npz", torch.zeros(20, 1, 32, 32, dtype=torch.uint8), np.zeros(20, dtype=int))
    assert "recompute it" in error_line(
        capsys, "eval", "--classifier", classifier, "--samples", tmp_path / "s.npz", "--ref", tmp_path / "other.npz"
    )


def test_inception_backend_without_weights_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(ev.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # the optional library is not even installed
    line = error_line(capsys, "eval", "--backend", "inception", "--samples", tmp_path, "--ref", "fashion-mnist")
    assert ev.INCEPTION_WEIGHTS_FILE in line and "--inception-weights" in line and ev.INCEPTION_WEIGHTS_ENV in line
    monkeypatch.setenv(ev.INCEPTION_WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    line = error_line(capsys, "eval", "--backend", "inception", "--samples", tmp_path, "--ref", "fashion-mnist")
    assert "missing.pth does not exist" in line
    (tmp_path / "w.pth").write_bytes(b"weights")
    line = error_line(
        capsys,
        "eval",
        "--backend",
        "inception",
        "--inception-weights",
        tmp_path / "w.pth",
        "--samples",
        tmp_path,
        "--ref",
        "fashion-mnist",
    )
    assert "pip install 'elmgen[inception]'" in line


def test_inception_backend_wiring(fake_fmnist, tmp_path, monkeypatch):
    """The torch-fidelity network replaced by a stand-in: checks what the backend feeds it and does with its output."""
    seen = []

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path):
            super().__init__()
            assert features_list == ["2048", "logits_unbiased"]
            self.proj = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            seen.append((x.dtype, tuple(x.shape[1:])))
            pooled = x.float().mean((2, 3)) / 255
            return pooled @ self.proj, pooled @ self.proj[:, :1008]

    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)

    class Payload:  # a pickle that would create a file when loaded without weights_only
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"net": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ElmgenError, match="does not hold the FID Inception weights"):
        ev.load_extractor("inception", inception_weights=tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pth")  # plain tensors: handed on to the (fake) network
    monkeypatch.setenv(ev.INCEPTION_WEIGHTS_ENV, str(tmp_path / "w.pth"))
    extractor = ev.load_extractor("inception")
    assert extractor.feature_space["fingerprint"] == file_hash(tmp_path / "w.pth")
    assert extractor.class_names is None  # Inception's classes are not the data set's: no class accuracy
    test = load_dataset(DataConfig(split="test", limit=20))
    write_adm(tmp_path / "s.npz", test.images(np.arange(20)), test.labels[:20])
    # (the Frechet distance of 2048-d features is left out: a 2048 x 2048 matrix root takes a minute here)
    feats, probs = ev.extract(extractor, ev.open_samples(tmp_path / "s.npz"), batch_size=8)
    ref = ev.DatasetImages(DataConfig(limit=30), extractor.image_size, extractor.channels)
    assert ev.extract(extractor, ref)[0].shape == (30, 2048)
    assert set(seen) == {(torch.uint8, (3, 256, 256))}  # grey -> RGB, ADM centre crop/resize to 256
    assert feats.shape == (20, 2048) and probs.shape == (20, 1008)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_evaluation_commands_have_help(capsys):
    for command in ("train-classifier", "eval", "ref-stats"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: elmgen " + command in capsys.readouterr().out

"""The command line as a user meets it: a tiny end-to-end run, and one-line errors for bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import torchrun
from PIL import Image

from elmgen.cli import main
from elmgen.commands.sample import SampleCommand, load_lm
from elmgen.evaluation import open_samples
from elmgen.models import load_model
from elmgen.sampling import SampleConfig, class_balanced, image_seeds, sample_images
from elmgen.tokenizers import load_tokenizer

TOK = [
    "tokenizer.base_width=16",
    "tokenizer.channel_mult=[1,2,2]",
    "tokenizer.latent_dim=16",
    "tokenizer.num_bits=8",
    "train.batch_size=8",
    "train.log_every=2",
    "eval_images=20",
]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("elmgen: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def pipeline(fake_fmnist, tmp_path, capsys):
    """train-tokenizer -> tokenize -> train on the small Fashion-MNIST stand-in."""
    tok, codes, lm = tmp_path / "tok", tmp_path / "codes", tmp_path / "lm"
    assert run(capsys, "train-tokenizer", "--out", tok, "data.limit=64", "train.steps=4", *TOK)[0] == 0
    code, out, _ = run(capsys, "tokenize", "--tokenizer", tok, "--out", codes, "--limit", 50, "--vocab", "2-4")
    assert code == 0 and json.loads(out)["count"] == 50
    code, out, _ = run(
        capsys,
        "train",
        "--codes",
        codes,
        "--out",
        lm,
        "--preset",
        "micro",
        "--precision",
        "bf16",
        "--grad-accum",
        2,
        "--ema-decay",
        0.5,
        "train.steps=3",
        "train.batch_size=4",
        "train.log_every=1",
    )
    assert code == 0 and json.loads(out)["step"] == 3
    return tok, codes, lm


@pytest.mark.slow
def test_training_switches_reach_the_job(pipeline):
    from omegaconf import OmegaConf

    _, _, lm = pipeline
    train = OmegaConf.load(lm / "job.yaml").train
    assert (train["precision"], train["grad_accum"], train["ema_decay"], train["compile"]) == ("bf16", 2, 0.5, False)
    assert (lm / "checkpoints" / "step_00000003" / "ema.safetensors").is_file()


@pytest.mark.slow
def test_end_to_end(pipeline, tmp_path, capsys):
    tok, codes, lm = pipeline
    for name in ("metrics.jsonl", "loss.png", "eval.json", "reconstructions.png", "job.yaml"):
        assert (tok / name).is_file(), name
    report = json.loads((tok / "eval.json").read_text())
    assert report["bits"] == 8 and report["grid"] == [8, 8] and 0 < report["code_usage"] <= 1
    code, out, _ = run(
        capsys, "sample", "--model", lm, "--out", tmp_path / "s", "--num-per-class", 2, "--top-k", 8, "--seed", 3
    )
    assert code == 0
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["arr_0"].shape == (20, 32, 32, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [c for c in range(10) for _ in range(2)]
    grid = Image.open(tmp_path / "s" / "samples.png")
    assert grid.height > grid.width  # 10 rows of 2
    run(capsys, "sample", "--model", lm, "--out", tmp_path / "s2", "--num-per-class", 2, "--top-k", 8, "--seed", 3)
    assert np.array_equal(np.load(tmp_path / "s2" / "samples.npz")["arr_0"], data["arr_0"])
    # bf16: the command keeps only bfloat16 linear weights, and samples what bf16 autocast over the fp32 model does
    run(
        capsys,
        "sample",
        "--model",
        lm,
        "--out",
        tmp_path / "s3",
        "--num-per-class",
        2,
        "--seed",
        3,
        "sample.precision=bf16",
    )
    model, meta = load_model(lm)
    labels, index_in_class = class_balanced(list(range(10)), 2, 10)
    tokenizer, _ = load_tokenizer(meta["codes"]["tokenizer"])
    bf16 = SampleConfig(seed=3, precision="bf16")
    autocast = sample_images(model, tokenizer, labels, image_seeds(3, labels, index_in_class), bf16)
    assert np.array_equal(np.load(tmp_path / "s3" / "samples.npz")["arr_0"], autocast.permute(0, 2, 3, 1).numpy())
    held, _, _ = load_lm(SampleCommand(model=str(lm), out=str(tmp_path / "s3"), sample=bf16))
    assert {m.weight.dtype for m in held.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}


@pytest.mark.slow
def test_processes_under_torchrun_write_shares_that_are_the_samples_of_one(pipeline, tmp_path, capsys):
    _, _, lm = pipeline
    settings = ["--model", str(lm), "--num-per-class", "3", "--top-k", "8", "--seed", "5", "--classes", "1", "4", "7"]
    assert run(capsys, "sample", "--out", tmp_path / "one", *settings)[0] == 0
    done = torchrun("-m", "elmgen.cli", "sample", "--out", str(tmp_path / "two"), *settings)
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == [f"samples.rank0000{r}-of-00002.{ext}" for r in (0, 1) for ext in ("npz", "png")]
    one = np.load(tmp_path / "one" / "samples.npz")
    shares = [np.load(tmp_path / "two" / f"samples.rank0000{r}-of-00002.npz") for r in (0, 1)]
    assert [len(s["arr_1"]) for s in shares] == [4, 5]
    for key in ("arr_0", "arr_1", "seeds"):  # the same seeds, so the same images, in the same order
        assert np.array_equal(np.concatenate([s[key] for s in shares]), one[key]), key
    # what eval reads: the shares as one run, in rank order
    source = open_samples(tmp_path / "two")
    assert np.array_equal(source.labels, one["arr_1"])
    read = np.concatenate(list(source.batches(4, size=32, channels=1)))
    assert np.array_equal(read, one["arr_0"].transpose(0, 3, 1, 2))


@pytest.mark.slow
def test_outpaint_makes_images_wider_than_the_training_images(pipeline, tmp_path, capsys):
    _, _, lm = pipeline
    code, out, _ = run(
        capsys,
        "outpaint",
        "--model",
        lm,
        "--out",
        tmp_path / "o",
        "--num-per-class",
        1,
        "--classes",
        3,
        5,
        "--width",
        12,
        "--stride",
        2,
    )
    assert code == 0 and json.loads(out)["image_size"] == [32, 48]
    data = np.load(tmp_path / "o" / "outpaint.npz")
    assert data["arr_0"].shape == (2, 32, 48, 1) and data["arr_1"].tolist() == [3, 5]
    assert "at least 8x8" in error_line(capsys, "outpaint", "--model", lm, "--out", tmp_path / "o", "--width", 6)


@pytest.mark.slow
def test_lm_with_a_tokenizer_of_another_vocabulary(pipeline, tmp_path, capsys):
    _, _, lm = pipeline
    other = tmp_path / "tok12"
    assert (
        run(capsys, "train-tokenizer", "--out", other, "data.limit=16", "train.steps=1", *TOK, "tokenizer.num_bits=12")[
            0
        ]
        == 0
    )
    line = error_line(capsys, "sample", "--model", lm, "--tokenizer", other, "--out", tmp_path / "s")
    assert "8-bit codes" in line and "12-bit codes" in line


@pytest.mark.slow
def test_k_not_divisible_by_n(pipeline, tmp_path, capsys):
    tok, codes, _ = pipeline
    assert "n must divide K" in error_line(
        capsys, "train", "--codes", codes, "--out", tmp_path / "x", "model.vocab=3-3"
    )  # parsed, then n*c != K
    line = error_line(capsys, "tokenize", "--tokenizer", tok, "--out", tmp_path / "c", "--vocab", "3-2")
    assert "covers 6 bits" in line and "K=8" in line and "2-4" in line


def test_missing_data_folder(tmp_path, capsys):
    line = error_line(capsys, "train-tokenizer", "--out", tmp_path / "t", "--data", tmp_path / "nope")
    assert "data folder not found" in line


def test_corrupt_image_in_folder(image_folder, tmp_path, capsys):
    (image_folder / "class_1" / "broken.png").write_bytes(b"not a png at all")
    line = error_line(
        capsys,
        "train-tokenizer",
        "--out",
        tmp_path / "t",
        "--data",
        image_folder,
        "data.channels=3",
        "train.steps=20",
        "train.batch_size=18",
        *TOK[:4],
    )
    assert "broken.png" in line and "corrupt" in line


def test_bad_config_values(tmp_path, capsys):
    assert "invalid config" in error_line(capsys, "train-tokenizer", "--out", tmp_path / "t", "train.stepz=3")
    assert "key=value" in error_line(capsys, "train-tokenizer", "--out", tmp_path / "t", "train.steps")
    assert "no checkpoint found" in error_line(capsys, "sample", "--model", tmp_path / "none", "--out", tmp_path / "s")


def test_model_info_json(capsys):
    code, out, _ = run(capsys, "model-info", "XL", "--vocab", "2-12", "--json")
    info = json.loads(out)
    assert code == 0 and abs(info["params"] / 757e6 - 1) < 0.03 and info["n_layer"] == 36
    cost = info["sampling_bf16_guided"]  # guided: 2 rows an image; bf16: 2 bytes a value
    assert cost["weights_gb"] == round(info["params"] * 2 / 1e9, 3)
    assert cost["kv_cache_mb_per_image"] == round(2 * 2 * 36 * 257 * 1280 * 2 / 1e6, 1)  # K and V, class + cells
    assert cost["gflop_per_image"] == round(2 * 256 * info["flops_per_token"]["forward"] / 1e9, 1)


def test_every_command_has_help(capsys):
    for command in (
        "train-tokenizer",
        "tokenize",
        "train",
        "sample",
        "outpaint",
        "inpaint",
        "model-info",
        "run",
        "demo",
        "shapes",
        "check-data",
    ):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: elmgen " + ("run" if command == "demo" else command) in capsys.readouterr().out


@pytest.mark.slow
def test_mlm_trains_and_samples(pipeline, tmp_path, capsys):
    _, codes, _ = pipeline
    mlm = tmp_path / "mlm"
    code, out, _ = run(
        capsys,
        "train",
        "--codes",
        codes,
        "--out",
        mlm,
        "--preset",
        "micro",
        "--kind",
        "mlm",
        "train.steps=3",
        "train.batch_size=4",
    )
    assert code == 0 and json.loads(out)["step"] == 3
    code, out, _ = run(
        capsys, "sample", "--model", mlm, "--out", tmp_path / "s", "--num-per-class", 1, "--steps", 4, "--classes", 2, 7
    )
    assert code == 0 and json.loads(out)["steps"] == 4
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["arr_0"].shape == (2, 32, 32, 1) and data["arr_1"].tolist() == [2, 7]
    code, out, _ = run(
        capsys,
        "inpaint",
        "--model",
        mlm,
        "--out",
        tmp_path / "i",
        "--indices",
        0,
        3,
        "--region",
        2,
        2,
        4,
        4,
        "--steps",
        3,
    )
    assert code == 0 and Image.open(tmp_path / "i" / "inpaint.png").size[0] > 3 * 32
    assert "must fit" in error_line(capsys, "inpaint", "--model", mlm, "--out", tmp_path / "i", "--region", 6, 6, 4, 4)
    _, _, ar = pipeline
    assert "masked model" in error_line(
        capsys, "inpaint", "--model", ar, "--out", tmp_path / "i", "--region", 0, 0, 2, 2
    )


@pytest.mark.slow
def test_quick_demo_writes_every_file_and_resumes(fake_fmnist, tmp_path, capsys):
    args = [
        "demo",
        "--quick",
        "--out",
        tmp_path / "demo",
        "tokenizer.tokenizer.base_width=16",
        "tokenizer.tokenizer.num_bits=8",
        "tokenizer.train.batch_size=8",
        "lm.model.vocab=2-4",
        "lm.model.n_layer=1",
        "lm.model.d_model=64",
        "lm.model.n_head=2",
        "lm.train.batch_size=8",
        "classifier.train.batch_size=16",
    ]
    code, out, _ = run(capsys, *args)
    assert code == 0
    for name in ("report.md", "samples.png", "samples.npz", "reconstructions.png", "loss.png", "metrics.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["lm"]["steps"] == 40 and metrics["tokenizer"]["bits"] == 8
    ev = metrics["eval"]
    assert ev["feature_space"]["name"] == "elmgen-classifier" and ev["num_samples"] == 20
    assert ev["num_reference"] == 200 and ev["fid"] > 0  # the fake data set has 200 training images
    for key in ("inception_score", "precision", "recall", "class_accuracy"):
        assert key in ev, key
    assert "## 4. Evaluation" in (tmp_path / "demo" / "report.md").read_text()
    assert np.load(tmp_path / "demo" / "samples.npz")["arr_0"].shape == (20, 32, 32, 1)
    assert "![samples](samples.png)" in (tmp_path / "demo" / "report.md").read_text()
    first = np.load(tmp_path / "demo" / "samples.npz")["arr_0"]
    lm_weights = next((tmp_path / "demo" / "lm" / "checkpoints").glob("step_*/model.safetensors"))
    trained_at = lm_weights.stat().st_mtime_ns
    assert run(capsys, *args)[0] == 0  # a second run reuses every stage and samples the same images
    assert lm_weights.stat().st_mtime_ns == trained_at
    assert np.array_equal(np.load(tmp_path / "demo" / "samples.npz")["arr_0"], first)


def test_every_command_reads_a_config_file_keys_and_options_in_that_order(tmp_path, capsys):
    config = tmp_path / "info.yaml"
    config.write_text("n_head: 2\nn_layer: 5\nvocab: 2-4\n")
    code, out, _ = run(
        capsys, "model-info", "tiny", "--config", config, "n_layer=3", "vocab=2-6", "--vocab", "2-8", "--json"
    )
    info = json.loads(out)
    assert code == 0 and (info["n_head"], info["n_layer"], info["vocab"], info["d_model"]) == (2, 3, "2-8", 256)


def test_help_comes_from_the_config_fields(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "1 disables classifier-free guidance [sample.guidance_scale]" in help_text  # an option: its field's comment
    assert "sample.top_p=1.0" in help_text and "keep the smallest set of entries" in help_text  # every config key
    assert "-n NUM_PER_CLASS" in help_text and "--cfg-scale" in help_text


@pytest.mark.slow
def test_sampling_keys_are_the_sweep_files_keys(pipeline, tmp_path, capsys):
    _, _, lm = pipeline
    config = tmp_path / "sample.yaml"
    config.write_text("sample:\n  temperature: 0.5\n  top_k: 2\nnum_per_class: 3\n")
    code, out, _ = run(
        capsys,
        "sample",
        "sample.guidance_scale=1.5",
        "sample.top_k=4",
        "--model",
        lm,
        "--out",
        tmp_path / "s",
        "--config",
        config,
        "--classes",
        1,
        "-n",
        2,
    )
    result = json.loads(out)
    assert code == 0 and result["images"] == 2  # -n beats the file's num_per_class
    assert (result["guidance_scale"], result["top_k"], result["temperature"]) == (1.5, 4, 0.5)
    assert "--model must be given" in error_line(capsys, "sample", "--out", tmp_path / "s2")

#!/usr/bin/env python3
"""Fault injection: kill every elmgen stage with SIGKILL at random moments, resume it, and check the result.

For each stage the script first runs the command uninterrupted into a reference folder (twice: artefacts
that differ between two uninterrupted runs are not bit-reproducible and are left out of the comparison),
then N times: runs the same command into a fresh folder, kills it at a moment drawn uniformly over the
reference's wall time, resumes it and checks that

  clean resume   the resume exits 0,
  identical      the final artefacts equal the reference's (each stage prints which ones),
  leftovers      no temporary survives in the output folder: no dot-prefixed name (`.tmp_*` folders
                 and files, `.<name>.tmp`, `.codes.partial`) and no name containing `.tmp`.

A training stage resumes with `--resume` when the killed run left a checkpoint, else with the same
command (`--resume` refuses a folder without one); tokenize, sample and sweep resume by re-running.

Not part of the test suite: with tiny configs each stage runs for seconds, and --n 20 over all stages
takes under an hour on an idle machine. Every subprocess runs with one thread.

    .venv/bin/python scripts/crash_test.py --n 20 --json crash.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ELMGEN = str(Path(sys.executable).with_name("elmgen"))
REPO = Path(__file__).resolve().parent.parent

# Tiny configs: a 4x4 grid of 8-bit codes from a 4-level tokenizer trained on 64 images, 512 images
# tokenized in 32 shards (the unit of resuming), a 2-layer transformer. Enough steps that training, not
# Python's start-up, takes most of a run; checkpoints every 6 steps and at the last, so kills land before,
# during and between checkpoint writes; one log row per step, so a resumed run's metrics.jsonl must equal
# the reference's row for row.
STEPS, SAVE_EVERY, IMAGES, CODE_IMAGES = 40, 6, 64, 512
TRAIN = [
    f"train.steps={STEPS}",
    f"train.save_every={SAVE_EVERY}",
    "train.log_every=1",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.precision=fp32",
]
TOKENIZER = [
    f"data.limit={IMAGES}",
    "tokenizer.base_width=8",
    "tokenizer.channel_mult=[1,2,2,2]",
    "tokenizer.latent_dim=8",
    "tokenizer.num_bits=8",
    "eval_images=16",
    *TRAIN,
]
SWEEP_YAML = f"""\
base:
  tokenizer:
    data: {{limit: {IMAGES}}}
    tokenizer: {{base_width: 8, channel_mult: [1, 2, 2, 2], latent_dim: 8, num_bits: 8}}
    train: {{steps: {STEPS}, save_every: {SAVE_EVERY}, log_every: 1, batch_size: 8, warmup_steps: 2, precision: fp32}}
    eval_images: 16
  lm:
    model: {{n_layer: 2, d_model: 64, n_head: 2, vocab: 2-4, grid_size: 4}}
    train: {{steps: {STEPS}, save_every: {SAVE_EVERY}, log_every: 1, batch_size: 8, warmup_steps: 2, precision: fp32}}
  num_per_class: 1
  evaluate: false
grid:
  sample.guidance_scale: [1.0, 2.0]
"""


@dataclass
class Stage:
    name: str
    needs: str | None  # the stage whose reference output is this one's input
    out_name: str  # the command's --out, inside the trial's output folder
    trains: bool  # resumes with --resume (when a checkpoint exists)
    args: Callable[[Path | None, Path], list[str]]  # (input folder, work folder) -> arguments but --out
    artefacts: Callable[[Path], list[Path]]  # an output folder -> the files to compare


def training_artefacts(run: Path) -> list[Path]:
    """The `latest` pointer, the weights, EMA and config of the checkpoint it names, and metrics.jsonl."""
    latest = run / "checkpoints" / "latest"
    ckpt = latest.parent / latest.read_text().strip()
    names = ("model.safetensors", "ema.safetensors", "config.json")
    return [latest] + [ckpt / n for n in names if (ckpt / n).is_file()] + [run / "metrics.jsonl"]


def sweep_artefacts(out: Path) -> list[Path]:
    stages = out / "stages"
    files = [out / "summary.csv"] + sorted((out / "runs").glob("*/samples.npz"))
    for run in sorted(stages.glob("tokenizers/*")) + sorted(stages.glob("lms/*")):
        files += training_artefacts(run)
    for codes in sorted(stages.glob("codes/*")):
        files += sorted(codes.glob("*.npy")) + [codes / "meta.json"]
    return files


STAGES = [
    Stage(
        "train-tokenizer",
        None,
        "tok",
        True,
        lambda _, w: ["train-tokenizer", *TOKENIZER],
        lambda out: training_artefacts(out) + [out / "eval.json"],
    ),
    Stage(
        "tokenize",
        "train-tokenizer",
        "codes",
        False,
        lambda tok, w: [
            "tokenize",
            "--tokenizer",
            str(tok),
            "--limit",
            str(CODE_IMAGES),
            "--shard-size",
            "16",
            "--batch-size",
            "16",
        ],
        lambda out: sorted(out.glob("shard_*.npy")) + [out / "labels.npy", out / "meta.json"],
    ),
    Stage(
        "train-ar",
        "tokenize",
        "lm",
        True,
        lambda codes, w: ["train", "--codes", str(codes), "--preset", "micro", "--kind", "ar", *TRAIN],
        training_artefacts,
    ),
    Stage(
        "train-mlm",
        "tokenize",
        "lm",
        True,
        lambda codes, w: ["train", "--codes", str(codes), "--preset", "micro", "--kind", "mlm", *TRAIN],
        training_artefacts,
    ),
    Stage(
        "sample",
        "train-ar",
        "samples",
        False,
        lambda lm, w: ["sample", "--model", str(lm), "--num-per-class", "3", "--batch-size", "10", "--seed", "1"],
        lambda out: [out / "samples.npz", out / "samples.png"],
    ),
    Stage("sweep", None, "sweep", False, lambda _, w: ["sweep", str(w / "sweep.yaml")], sweep_artefacts),
]
BY_NAME = {s.name: s for s in STAGES}


def same(a_root: Path, b_root: Path, rel: str) -> bool:
    """Whether a_root/rel and b_root/rel have equal contents. An .npz is a zip whose member timestamps are
    the time of writing, so its arrays are compared; metrics.jsonl rows are compared without their
    throughput (wall-clock) fields; JSON files name the folders they came from by absolute path, so
    b_root stands for a_root in them."""
    a, b = a_root / rel, b_root / rel
    if not b.is_file():
        return False
    if a.suffix == ".npz":
        with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
            return sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
    if a.name == "metrics.jsonl":

        def rows(p):
            return [
                {k: v for k, v in json.loads(line).items() if not k.endswith("_per_s")}
                for line in p.read_text().splitlines()
                if line.strip()
            ]

        try:
            return rows(a) == rows(b)
        except ValueError:  # a torn last line
            return False
    if a.suffix == ".json":
        return a.read_bytes().replace(str(a_root).encode(), str(b_root).encode()) == b.read_bytes()
    return a.read_bytes() == b.read_bytes()


def leftovers(root: Path) -> list[str]:
    """Temporaries under `root`: elmgen writes no dot-prefixed or *.tmp* names except while publishing a file."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name.startswith(".") or ".tmp" in p.name)


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def start(argv: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: the kill reaches the process group of this command and nothing else.
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(argv) + "\n").encode())
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=environment(), start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float | None = None) -> int | None:
    """The exit code, or None after `timeout` seconds; if this script is interrupted, the command dies with it."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    except BaseException:
        kill(proc)
        raise


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run(argv: list[str], log: Path) -> tuple[int, float]:
    t = time.perf_counter()
    code = wait(start(argv, log))
    return code, time.perf_counter() - t


def kill_at(argv: list[str], log: Path, delay: float) -> bool:
    """Start `argv`, SIGKILL it after `delay` seconds; False if it had finished by then."""
    proc = start(argv, log)
    if wait(proc, delay) is not None:
        return False
    kill(proc)
    return True


def command(stage: Stage, out: Path, inputs: Path | None, workdir: Path) -> list[str]:
    return [ELMGEN, *stage.args(inputs, workdir), "--out", str(out)]


def resume_command(stage: Stage, out: Path, inputs: Path | None, workdir: Path) -> list[str]:
    argv = command(stage, out, inputs, workdir)
    return argv + ["--resume"] if stage.trains and (out / "checkpoints" / "latest").is_file() else argv


@dataclass
class Reference:
    out: Path
    seconds: float
    compared: list[str]  # relative paths, reproducible between two uninterrupted runs
    unreproducible: list[str] = field(default_factory=list)


def reference(stage: Stage, workdir: Path, refs: dict[str, Reference]) -> Reference:
    """The stage's uninterrupted output (built once, with the references it depends on)."""
    if stage.name in refs:
        return refs[stage.name]
    inputs = reference(BY_NAME[stage.needs], workdir, refs).out if stage.needs else None
    outs = []
    for copy in ("a", "b"):
        out = workdir / stage.name / f"reference_{copy}" / stage.out_name
        out.parent.mkdir(parents=True)
        code, seconds = run(command(stage, out, inputs, workdir), out.parent / "run.log")
        if code != 0:
            sys.exit(f"{stage.name}: the uninterrupted run failed (exit {code}); see {out.parent / 'run.log'}")
        outs.append((out, seconds))
    (a, seconds), (b, _) = outs
    paths = [str(p.relative_to(a)) for p in stage.artefacts(a)]
    ref = Reference(a, seconds, [p for p in paths if same(a, b, p)], [p for p in paths if not same(a, b, p)])
    refs[stage.name] = ref
    return ref


def trial(stage: Stage, ref: Reference, inputs: Path | None, workdir: Path, index: int, rng: random.Random) -> dict:
    folder = workdir / stage.name / f"trial_{index:02d}"
    out_root = folder / "out"  # scanned for leftovers: tokenize works beside its --out
    out_root.mkdir(parents=True)
    out = out_root / stage.out_name
    delay = rng.uniform(0, ref.seconds)
    killed = kill_at(command(stage, out, inputs, workdir), folder / "killed.log", delay)
    left_by_kill = leftovers(out_root)  # what the resume has to clean up
    argv = resume_command(stage, out, inputs, workdir)
    code, _ = run(argv, folder / "resume.log")
    different = [p for p in ref.compared if not same(ref.out, out, p)] if code == 0 else ref.compared
    return {
        "trial": index,
        "kill_after_s": round(delay, 2),
        "killed": killed,
        "left_by_kill": left_by_kill,
        "resumed_with": argv[1:],
        "resume_exit": code,
        "different": different,
        "leftovers": leftovers(out_root),
        "folder": str(folder),
    }


def summarize(stage: Stage, ref: Reference, trials: list[dict]) -> dict:
    return {
        "stage": stage.name,
        "reference_seconds": round(ref.seconds, 1),
        "trials": len(trials),
        "kills": sum(t["killed"] for t in trials),
        "clean_resumes": sum(t["resume_exit"] == 0 for t in trials),
        "identical": sum(t["resume_exit"] == 0 and not t["different"] for t in trials),
        "leftovers": sum(bool(t["leftovers"]) for t in trials),
        "kills_leaving_temporaries": sum(bool(t["left_by_kill"]) for t in trials),
        "compared": ref.compared,
        "not_reproducible": ref.unreproducible,
        "details": trials,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="kills per stage (default 20)")
    p.add_argument(
        "--stages",
        nargs="+",
        choices=list(BY_NAME),
        default=list(BY_NAME),
        help="stages to test (default: all); the references they need are built anyway",
    )
    p.add_argument("--workdir", type=Path, help="folder for all runs (default: a new temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the summary (with every trial) to FILE")
    p.add_argument("--keep", action="store_true", help="keep the work folder (always kept when --workdir is given)")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through wait(), which kills the command
    if a.n < 1:
        p.error("--n must be at least 1")
    if not Path(ELMGEN).is_file():
        p.error(f"no elmgen command beside {sys.executable}; run this script with the project's venv python")
    if a.workdir is not None and a.workdir.exists() and any(a.workdir.iterdir()):
        p.error(f"--workdir {a.workdir} is not empty")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="elmgen-crash-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "sweep.yaml").write_text(SWEEP_YAML)
    rng = random.Random(a.seed)
    refs: dict[str, Reference] = {}
    results = []
    print(f"work folder {workdir}; {a.n} kills per stage, seed {a.seed}", flush=True)
    print(f"{'stage':<16} {'kills':>6} {'clean resumes':>14} {'identical results':>18} {'leftovers':>10}", flush=True)
    for name in a.stages:
        stage = BY_NAME[name]
        ref = reference(stage, workdir, refs)
        inputs = refs[stage.needs].out if stage.needs else None
        trials = [trial(stage, ref, inputs, workdir, i, rng) for i in range(a.n)]
        s = summarize(stage, ref, trials)
        results.append(s)
        identical = "n/a" if not ref.compared else s["identical"]
        print(f"{name:<16} {s['kills']:>6} {s['clean_resumes']:>14} {identical:>18} {s['leftovers']:>10}", flush=True)
        print(
            f"  {s['trials']} trials, uninterrupted run {ref.seconds:.1f} s, "
            f"{s['kills_leaving_temporaries']} kills left temporaries for the resume to clean up",
            flush=True,
        )
        print(f"  compared: {', '.join(ref.compared)}", flush=True)
        if ref.unreproducible:
            print(
                f"  not bit-reproducible even uninterrupted (not compared): {', '.join(ref.unreproducible)}", flush=True
            )
        for t in trials:
            if t["resume_exit"] or t["different"] or t["leftovers"]:
                print(
                    f"  trial {t['trial']} (kill after {t['kill_after_s']} s): exit {t['resume_exit']}, "
                    f"different {t['different']}, leftovers {t['leftovers']}; {t['folder']}",
                    flush=True,
                )
    totals = {k: sum(s[k] for s in results) for k in ("trials", "kills", "clean_resumes", "identical", "leftovers")}
    print(
        f"{'total':<16} {totals['kills']:>6} {totals['clean_resumes']:>14} {totals['identical']:>18} "
        f"{totals['leftovers']:>10}",
        flush=True,
    )
    if a.json:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        a.json.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "commit": commit or None,
                    "n": a.n,
                    "seed": a.seed,
                    "workdir": str(workdir),
                    "totals": totals,
                    "stages": results,
                },
                indent=2,
            )
        )
    if a.workdir is None and not a.keep:
        shutil.rmtree(workdir)
    failed = (
        totals["clean_resumes"] < totals["trials"]
        or totals["leftovers"]
        or any(s["compared"] and s["identical"] < s["trials"] for s in results)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the benchmark scripts: the command line, one fresh process per case, timing and
the machine's own ceilings (matmul rate, memory bandwidth, the roofline of a step).

Peak memory: every case runs in a fresh interpreter (the script re-invokes itself with `--case`),
which reports its ru_maxrss (the process's resident-set high-water mark) as `peak_rss_mb`, and as
`case_rss_mb` that mark minus the one reached after imports, before the case built anything (so it
includes what torch loads lazily on first use, e.g. oneDNN kernels, and with torch.compile the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads (default: all cores of this process)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case after the warm-up; the median counts")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    return p


def environment(threads: int) -> dict:
    """What a result line needs to be compared with another one."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit.stdout.strip() or None,
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "device": "cpu",
    }


def _cpu_name() -> str | None:
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return found.group(1) if found else None


def matmul_reference(n: int = 2048, seconds: float = 2.0) -> dict:
    """bf16 and fp32 GFLOP/s of repeated n x n @ n x n matmuls (2 n^3 FLOPs each): the practical ceiling."""
    out = {"matmul_size": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        count, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b
            count += 1
        out[f"matmul_gflops_{name}"] = round(2 * n**3 * count / (time.perf_counter() - t) / 1e9, 1)
    return out


def memory_bandwidth(mb: int = 256, seconds: float = 1.0) -> dict:
    """GB/s of repeated copies of an mb-megabyte fp32 tensor (each reads and writes it once), far beyond the
    caches: the rate at which a decode step can stream its weights."""
    src = torch.randn(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        dst.copy_(src)
        count += 1
    return {"bandwidth_gbs": round(2 * src.nbytes * count / (time.perf_counter() - t) / 1e9, 1)}


def timed_between_ceilings(measure: Callable[[], dict], timed: Callable[[], float]) -> tuple[float, dict]:
    """`timed()` and the better of two `measure()`s of the machine's ceiling, one just before it and one just
    after: this VM's speed drifts by up to a third between minutes, and a single reading taken in a slow moment
    makes every share of it look better than it is."""
    before = measure()
    seconds = timed()
    after = measure()
    return seconds, {k: max(before[k], after[k]) for k in before}


def roofline_seconds(weight_bytes: float, flops: float, ceiling: dict, precision: str) -> float:
    """The least time a step can take on this machine: reading its weights once or doing its FLOPs,
    whichever is slower (`ceiling`: memory_bandwidth and matmul_reference of the same process)."""
    return max(weight_bytes / (ceiling["bandwidth_gbs"] * 1e9), flops / (ceiling[f"matmul_gflops_{precision}"] * 1e9))


def call_seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of fn."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls of fn (warm it up first)."""
    return statistics.median(call_seconds(fn) for _ in range(repeats))


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(
    args: argparse.Namespace,
    script: str,
    cases: list[dict],
    run_case: Callable[[dict], dict],
    compare: Callable[[dict, list[dict]], None] | None = None,
) -> list[dict]:
    """With --case: run that one case here and print its result. Otherwise run every case in a fresh
    process, one after the other, and print one JSON line each: environment, the case (with
    `repeats`), its result, and return those rows (none with --case). `compare(row, earlier_rows)` may add
    comparisons with earlier cases to a row."""
    torch.set_num_threads(args.threads)
    if args.case:
        base = _max_rss_mb()
        torch.manual_seed(0)
        result = run_case(json.loads(args.case))
        peak = _max_rss_mb()
        print(json.dumps({**result, "peak_rss_mb": round(peak), "case_rss_mb": round(peak - base)}))
        return []
    head = environment(args.threads)
    rows: list[dict] = []
    for case in cases:
        case = {**case, "repeats": args.repeats}
        cmd = [sys.executable, script, "--threads", str(args.threads), "--case", json.dumps(case)]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        row = {**head, **case, **json.loads(out.splitlines()[-1])}
        if compare is not None:
            compare(row, rows)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def rounded(values: dict) -> dict:
    """Floats to 4 significant digits."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in values.items()}

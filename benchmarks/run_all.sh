#!/usr/bin/env bash
# Runs every benchmark with the settings the docs quote and appends their JSON lines to a file.
#
#   bash benchmarks/run_all.sh [results.jsonl]     (default: benchmarks/results.jsonl)
#
# Run it on an otherwise idle machine: each script uses all cores unless given --threads.
# PYTHON overrides the interpreter (default: the repository's .venv).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/benchmarks/results.jsonl}")
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"

run() { "$py" "$@" | tee -a "$out"; }

run benchmarks/train_step.py --presets tiny B --kind ar mlm --batch 16 --grid 16
run benchmarks/train_step.py --presets tiny B --kind ar mlm --batch 16 --grid 16 --compile
run benchmarks/sampling.py --preset tiny --grid 16 --batch 1 32 --mlm-steps 8 16 --repeats 1  # recompute at batch 32: minutes a call
run benchmarks/tokenizer.py --configs demo configs/tokenizer-folder-rgb64.yaml --batch 64
run benchmarks/input_pipeline.py --images 1200 --workers 0 1 2
echo "appended to $out" >&2

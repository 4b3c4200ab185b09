#!/usr/bin/env bash
# One-time (idempotent) set-up on Debian: Fashion-MNIST, a virtual environment in .venv,
# the CPU build of PyTorch, chromium, and elmgen itself with its test tools and the browser demo.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    as_root apt-get update -qq
    as_root apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || { as_root apt-get install -y -qq python3-venv && python3 -m venv .venv; }
fi
# The pinned torch goes first: an open range resolved first would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
# chromium: the browser the test of `elmgen serve` drives (Playwright on Debian's binary, no download)
if [ ! -x /usr/bin/chromium ]; then
    as_root apt-get update -qq
    as_root apt-get install -y -qq chromium
fi
.venv/bin/pip install -q -e ".[dev,demo]"

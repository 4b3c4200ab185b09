"""Devices and precision: which device a name means, whether it computes bfloat16 natively, autocast."""

from __future__ import annotations

import contextlib
import os

import torch

from elmgen.errors import ElmgenError

PRECISIONS = ("fp32", "bf16", "auto")


def resolve_device(name: str) -> torch.device:
    """The device `name` stands for ("auto": under torchrun the process's own GPU, LOCAL_RANK; else the current
    GPU or the CPU), checked to exist. Joins no process group (that is `train.distributed.distributed`)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ElmgenError(f"unknown device {name!r}; use auto, cpu, mps or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ElmgenError("CUDA is not available in this torch build (or on this machine); use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ElmgenError(
            f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s); "
            "use --device auto or cuda:N with a smaller N"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ElmgenError("MPS is not available in this torch build (or on this machine); use --device cpu or auto")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CPUs without AVX512-BF16/AMX emulate it, many times
    slower than fp32 (convolutions most of all)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" -> "bf16" where the device has native bf16, else "fp32"; other values as they are."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

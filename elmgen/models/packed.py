"""Linear layers computed by oneDNN on weights it has reordered once: the matmuls of CPU decoding, a few rows
each, run 1.5 to 4 times faster than through `F.linear`, which streams the weight at a fraction of the memory
bandwidth at so few rows (docs/performance.md, "Decoding on weights reordered once")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn

from elmgen.device import native_bf16


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """oneDNN's reordered-weight matmul exists in this build and runs on this device (CPU only) in `dtype`
    (bfloat16 only where the CPU computes it natively: torch's oneDNN bf16 matmuls check for those instructions,
    and it was measured only there)."""
    device, ops = torch.device(device), torch.ops.mkldnn
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and (dtype != torch.bfloat16 or native_bf16(device))
    )


def _packed_linear(weight, bias, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "")


@contextmanager
def packed_linears(model: nn.Module, rows: int, dtype: torch.dtype) -> Iterator[None]:
    """Within the block every `nn.Linear` of `model` computes in `dtype` (what autocast would compute in) with a
    copy of its weight reordered for matmuls of about `rows` rows; on leaving, the layers are as they were. The
    copies cost one more set of linear weights in `dtype` while the block lasts. For inference only: the copies
    carry no gradient and do not follow changes to the weights made inside the block."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        for m in linears:
            weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), rows)
            bias = None if m.bias is None else m.bias.detach().to(dtype)
            m.forward = partial(_packed_linear, weight, bias, dtype)
        yield
    finally:
        for m in linears:
            vars(m).pop("forward", None)

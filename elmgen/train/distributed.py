"""Every distributed helper in one place: joining the torchrun process group, rank checks, gradient and loss
averaging, FSDP sharding, and gathering (or scattering) whole tensors for checkpoints, so that one code path
serves one process or many and a run resumes with any number of them."""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the first call joins the process group:
    NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def average_gradients(model: torch.nn.Module, world: int, bucket: int = 1 << 24) -> None:
    """Data parallelism: replace every gradient by its mean over the processes, a few large
    all-reduces at a time (works for any module, whatever its forward looks like)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    start = 0
    while start < len(grads):
        group, size = [], 0
        while start < len(grads) and (not group or size + grads[start].numel() <= bucket):
            group.append(grads[start])
            size += grads[start].numel()
            start += 1
        flat = torch.cat([g.flatten() for g in group])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(group, flat.split([g.numel() for g in group]), strict=True):
            g.copy_(part.view_as(g))


def mean_over_processes(value: torch.Tensor, world: int) -> torch.Tensor:
    """`value` (in place) averaged over the processes."""
    dist.all_reduce(value)
    value /= world
    return value


def shard(model: torch.nn.Module) -> None:
    """FSDP: shard each of `model.fsdp_units` on its own (one all-gather per unit), then the root."""
    from torch.distributed.fsdp import fully_shard

    # The logits are a reshaped view; no loss here modifies them in place, which is what FSDP warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in model.fsdp_units:
        fully_shard(unit)
    fully_shard(model)


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Whole CPU tensors of the weights and optimizer state, keyed by parameter name (a collective under FSDP:
    every process must call it)."""
    return get_model_state_dict(model, options=FULL_STATE), get_optimizer_state_dict(model, opt, options=FULL_STATE)


def load_whole_state(model: torch.nn.Module, opt: torch.optim.Optimizer, weights: dict, optimizer: dict) -> None:
    """The inverse of `gather_state`: whole tensors into the model and optimizer, sharded as they are."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    set_optimizer_state_dict(model, opt, optimizer, options=full)

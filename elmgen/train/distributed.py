"""Every distributed helper in one place: joining the torchrun process group, rank checks, DDP, loss
averaging, FSDP2 sharding, and gathering (or scattering) whole tensors for checkpoints, so that one code path
serves one process or many and a run resumes with any number of them."""

from __future__ import annotations

import atexit
import contextlib
import os
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from elmgen.errors import ElmgenError


def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the first call joins the process group:
    NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # leave the group while the interpreter is still whole: left to finalization, gloo's worker threads
        # free tensors after Python is gone and the process aborts (SIGABRT; pytorch/pytorch PR 179291)
        atexit.register(leave_group)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launched() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them (RANK, WORLD_SIZE), joining no process group: for work that
    needs no collective, such as writing a share of the samples."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        rank, world = -1, 0
    if not 0 <= rank < world:
        raise ElmgenError(
            f"RANK={os.environ.get('RANK')} and WORLD_SIZE={os.environ.get('WORLD_SIZE')} are not a process "
            "of a group; start the processes with torchrun (or unset both)"
        )
    return rank, world


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class StepModule(torch.nn.Module):
    """One micro-batch's loss as a module's forward: DDP hooks only `forward`, and the trainers' step functions
    call whatever their models offer (the tokenizer's training module has no forward of its own). It registers
    (so DDP averages) the model's `children` only, when given: the others have wrappers of their own."""

    def __init__(self, model: torch.nn.Module, step_fn: Callable, children: tuple[str, ...] | None = None):
        super().__init__()
        self.held = model if children is None else torch.nn.ModuleDict({n: getattr(model, n) for n in children})
        self.step_fn, self.model = step_fn, [model]  # in a list: not registered, the step sees the whole model

    def forward(self, step: int, idx):
        return self.step_fn(self.model[0], step, idx)


def replicate(
    model: torch.nn.Module, step_fn: Callable, children: tuple[str, ...] | None = None
) -> DistributedDataParallel:
    """Data parallelism: DDP around the step, so gradients are averaged in buckets while the backward pass
    still runs; over the model's `children` only, when given (a GAN's generator and discriminator are
    replicated each on its own, each for its optimizer)."""
    device = next(model.parameters()).device
    return DistributedDataParallel(
        StepModule(model, step_fn, children), device_ids=[device.index] if device.type == "cuda" else None
    )


def gradient_sync(module: torch.nn.Module, on: bool):
    """A context for one micro-batch's forward and backward: with `on` False, DDP (`no_sync`) and FSDP2 keep
    the gradients local, to be reduced with the last micro-batch's; a plain module needs nothing."""
    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if on else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def mean_over_processes(value: torch.Tensor, world: int) -> torch.Tensor:
    """`value` (in place) averaged over the processes."""
    dist.all_reduce(value)
    value /= world
    return value


def shard(model: torch.nn.Module, bf16: bool) -> None:
    """FSDP2: shard each of `model.fsdp_units` (e.g. transformer blocks) on its own, one all-gather per unit,
    then the root. With `bf16` the gathered parameters are bfloat16; gradients are reduced in fp32 either way,
    and the sharded parameters and the optimizer stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The logits are a reshaped view; no loss here modifies them in place, which is what FSDP warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for unit in model.fsdp_units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> tuple[dict, dict]:
    """Whole CPU tensors of the weights and of the optimizers' state (one state for them all), keyed by parameter
    name (a collective under FSDP: every process must call it)."""
    return get_model_state_dict(model, options=FULL_STATE), get_optimizer_state_dict(model, opts, options=FULL_STATE)


def load_whole_state(model: torch.nn.Module, opts: list[torch.optim.Optimizer], weights: dict, optimizer: dict) -> None:
    """The inverse of `gather_state`: whole tensors into the model and optimizers, sharded as they are; each
    optimizer takes its parameters' share of `optimizer` (any split of the parameters over optimizers)."""
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    if opts:
        set_optimizer_state_dict(model, opts, optimizer, options=full)

"""The training loop shared by the tokenizer and language-model trainers.

Batches are a pure function of (seed, step), and the RNG state travels in the checkpoint, so a
resumed run reproduces the losses of an uninterrupted one exactly. Only the main process logs and
writes, so the same loop serves a torchrun launch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from elmgen import checkpoint
from elmgen.config import save_yaml
from elmgen.errors import ElmgenError

PRECISIONS = ("fp32", "bf16", "auto")
RUN_FILES = ("metrics.jsonl", "job.yaml", "loss.png", "eval.json", "reconstructions.png")  # what trainers write


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64  # global batch: split over data-parallel processes, then over grad_accum micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step (same result as one big batch, less memory)
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0
    lr_decay: str = "constant"  # "constant" or "cosine" (to min_lr at the last step)
    min_lr: float = 0.0
    weight_decay: float = 0.05  # on matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "auto" (bf16 where the device computes it natively)
    ema_decay: float = 0.0  # keep an EMA of the weights (saved beside them, used for sampling); 0: none
    compile: bool = False  # torch.compile the model's forward (fixed shapes: compiled once)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (language models)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    seed: int = 0
    log_every: int = 20
    save_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    time_budget_s: float = 0.0  # > 0: train as many steps as fit in this many seconds at the pace of the first
    # steps (`steps` is then only the provisional length the learning rate follows until the count is decided)

    def validate(self, world: int = 1) -> None:
        """Refuse out-of-range settings (NaN included) before anything is written; `world`: processes."""
        if self.lr_decay not in ("constant", "cosine"):
            raise ElmgenError(f"train.lr_decay must be 'constant' or 'cosine', not {self.lr_decay!r}")
        if self.precision not in PRECISIONS:
            raise ElmgenError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        # (field, holds, valid range): written so that NaN fails every test
        ranges = [
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("lr", 0 < self.lr < math.inf, "a finite number > 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, train.lr]"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "a finite number >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", 0 <= self.grad_clip < math.inf, "a finite number >= 0 (0 disables clipping)"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: no EMA)"), ("seed", self.seed >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"), ("save_every", self.save_every >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("time_budget_s", 0 <= self.time_budget_s < math.inf, "a finite number >= 0 (0: train.steps steps)"),
        ]
        for name, holds, valid in ranges:
            if not holds:
                raise ElmgenError(f"train.{name}={getattr(self, name)} is out of range: it must be {valid}")
        if self.batch_size % (world * self.grad_accum):
            raise ElmgenError(f"train.batch_size={self.batch_size} must be divisible by processes x grad_accum "
                              f"= {world} x {self.grad_accum}")


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None = None) -> float:
    """The learning rate of `step` in a run of `total_steps` (default cfg.steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        total = cfg.steps if total_steps is None else total_steps
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) the first call joins the process group:
    NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def resolve_device(name: str) -> torch.device:
    distributed()
    if name == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ElmgenError(f"unknown device {name!r}; use auto, cpu, mps or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ElmgenError("CUDA is not available in this torch build (or on this machine); use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ElmgenError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s); "
                          "use --device auto or cuda:N with a smaller N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ElmgenError("MPS is not available in this torch build (or on this machine); use --device cpu or auto")
    return device


def check_training_memory(train, estimate_gb, what: str, fix: str) -> None:
    """Refuse a training job whose estimated peak memory, `estimate_gb(micro_batch)`, exceeds the device's: at
    its start, not when it runs out hours later."""
    train.validate()  # a sound batch split before dividing by it
    micro_batch = train.batch_size // train.grad_accum
    needed = estimate_gb(micro_batch)
    if train.device != "cpu" and torch.cuda.is_available():
        total, where = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, "the GPU"
    else:
        total, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    if needed > total / 1e9:
        raise ElmgenError(f"{what}, {micro_batch} at a time, needs about {needed:,.0f} GB of memory, more than the "
                          f"{total / 1e9:,.0f} GB of {where}; {fix}")


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    """"auto" -> "bf16" where the device has native bf16, else "fp32"; other values as they are."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all tensors in one pass (8x faster than foreach for 85M parameters on this
    # CPU); FSDP's sharded (DTensor) parameters take the foreach path.
    fused = not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: consecutive slices of one shuffled permutation per epoch."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start, num_items)
        perm = np.random.default_rng([seed, epoch]).permutation(num_items)
        take = perm[offset: offset + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, dtype=np.int64)


PACE_STEPS = 6  # a time budget is turned into a step count after this many steps (the first is not timed)


def steps_within(budget_s: float, elapsed_s: float, steps_done: int, s_per_step: float) -> int:
    """How many steps a run that has taken `elapsed_s` for `steps_done` steps can do in `budget_s`
    at `s_per_step` from now on (at least one more)."""
    return steps_done + max(1, int((budget_s - elapsed_s) / s_per_step))


def clock(device: torch.device) -> float:
    """Seconds, once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def budget_steps(budget_s: float, step: int, t_start: float, t_first: float, device: torch.device, desc: str) -> int:
    """The run's step count under a time budget, from the pace since step 1 (every process gets rank 0's)."""
    now = clock(device)
    pace = (now - t_first) / (step - 1) if step > 1 else now - t_start
    total = torch.tensor([steps_within(budget_s, now - t_start, step, pace)], device=device)
    if dist.is_initialized():  # every process must stop at the same step
        dist.broadcast(total, 0)
    if is_main_process():
        tqdm.write(f"{desc}: {pace:.3g} s a step, so {int(total)} steps fit the {budget_s / 60:.3g}-minute budget",
                   file=sys.stderr)
    return int(total)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A malformed last line is what a kill mid-append leaves: it is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            if i == lines[-1][0]:
                break
            raise ElmgenError(f"{path}, line {i}, is not a metrics row; delete that line (or the file)")
        rows.append(row)
    return rows


# A step function takes the model, the step and the dataset indices of one micro-batch, and returns
# (mean loss over that micro-batch, extra floats to log).
StepFn = Callable[[torch.nn.Module, int, np.ndarray], tuple[torch.Tensor, dict]]


def local_micro_batches(step: int, cfg: TrainConfig, num_items: int, rank: int, world: int) -> np.ndarray:
    """(grad_accum, micro batch) indices of this process at `step`: its contiguous share of the global
    batch, cut into micro-batches (cfg.validate(world) checked the split). The global batch never
    depends on the number of processes."""
    idx = batch_indices(step, cfg.batch_size, num_items, cfg.seed)
    return idx.reshape(world, -1)[rank].reshape(cfg.grad_accum, -1)


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


class EMA:
    """Exponential moving average of a module's parameters. Under FSDP each process averages its own
    shards; `full_state` gathers them."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = dict(module.named_parameters())
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: forget the random init quickly
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole CPU tensors (a collective under FSDP: every process must call it)."""
        return {name: (s.full_tensor() if isinstance(s, DTensor) else s).cpu() for name, s in self.shadow.items()}

    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, s in self.shadow.items():
            value = state[name].to(s.device, s.dtype)
            if isinstance(s, DTensor):
                value = distribute_tensor(value, s.device_mesh, s.placements)
            self.shadow[name] = value


def prepare(model: torch.nn.Module, cfg: TrainConfig, world: int) -> bool:
    """Activation checkpointing, FSDP sharding and compilation, in place, as configured; True if sharded.

    Models opt in: `activation_checkpointing` is a flag they read in forward, `fsdp_units` the
    submodules sharded on their own (e.g. transformer blocks) before the root."""
    name = type(model).__name__
    if cfg.activation_checkpointing:
        if not hasattr(model, "activation_checkpointing"):
            raise ElmgenError(f"train.activation_checkpointing is not supported for {name}; turn it off")
        model.activation_checkpointing = True
    if cfg.fsdp and world > 1:
        if not hasattr(model, "fsdp_units"):
            raise ElmgenError(f"train.fsdp is not supported for {name} (small enough for plain data parallelism)")
        from torch.distributed.fsdp import fully_shard

        # The logits are a reshaped view; no loss here modifies them in place, which is what FSDP warns about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for unit in model.fsdp_units:
            fully_shard(unit)
        fully_shard(model)
    if cfg.compile:
        model.compile(dynamic=False)
    return cfg.fsdp and world > 1


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def fit(model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, step_fn: StepFn, num_items: int,
        ckpt_config: dict, resume: bool = False, desc: str = "train",
        units_per_step: int | None = None, unit: str = "it", job=None) -> list[dict]:
    """Train `model` for cfg.steps optimizer steps over a dataset of `num_items`, logging to
    run_dir/metrics.jsonl. Under torchrun every process takes its share of each global batch and
    gradients are averaged (with cfg.fsdp: reduce-scattered onto parameter shards), so any number of
    processes follows the same trajectory (up to the random draws inside a step), and checkpoints hold
    whole tensors, so a run can resume with another number of processes.

    Seed torch with cfg.seed before building the model: a fresh run continues from that RNG state.
    `units_per_step` (tokens or images per step) turns step time into a throughput figure.
    With cfg.ema_decay > 0 an EMA of the weights is kept and saved beside them (`ema.safetensors`);
    loaders prefer it. `job` (a config dataclass) is saved as run_dir/job.yaml once the run is accepted:
    a refused run leaves the folder as it was.
    With cfg.time_budget_s the step count is decided early in the run and saved in its checkpoints, so a
    resumed run ends where the first one planned to.
    Returns the logged metric rows of this run (all of them, when resumed).
    """
    rank, world = distributed()
    cfg.validate(world)
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    sharded = prepare(model, cfg, world)
    opt = make_optimizer(model, cfg)
    metrics_path = run_dir / "metrics.jsonl"
    step = 0
    total = cfg.steps  # with a time budget, decided at step PACE_STEPS and kept in the checkpoints
    ema_state = None
    if checkpoint.has_checkpoint(run_dir):
        if not resume:
            raise ElmgenError(
                f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose a new --out"
            )
        state = checkpoint.load_trainer_state(run_dir)
        if state is None:
            raise ElmgenError(f"checkpoint in {run_dir} has no trainer state to resume from")
        # Whole (unsharded) tensors, keyed by parameter name: resumable with any number of processes.
        full = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(model, checkpoint.load_state(run_dir, ema=False), options=full)
            set_optimizer_state_dict(model, opt, state["optimizer"], options=full)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ElmgenError(f"checkpoint in {run_dir} does not match this model or optimizer "
                              f"({str(e).splitlines()[0]}); was it written for another config?") from None
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = state["step"]
        if cfg.time_budget_s and isinstance(state.get("total_steps"), int):
            total = state["total_steps"]  # the count decided when the run started: a resumed run ends there
        ema_state = checkpoint.load_ema(run_dir)
    elif resume:
        raise ElmgenError(f"nothing to resume: {run_dir} holds no checkpoint")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and ema_state is not None:
        ema.load_full_state(ema_state)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        # What a killed run left: temporaries, and metric rows past its last checkpoint (all of them
        # when it had none), which this run logs again.
        checkpoint.remove_temporaries(run_dir / "checkpoints")
        checkpoint.remove_temporaries(run_dir, *RUN_FILES)
        kept = [row for row in read_metrics(metrics_path) if row["step"] <= step] if step else []
        checkpoint.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        if job is not None:
            save_yaml(job, run_dir / "job.yaml")

    def save():
        # Gathering whole tensors is a collective under FSDP: every process takes part, the main one writes.
        weights = get_model_state_dict(model, options=FULL_STATE)
        optimizer = get_optimizer_state_dict(model, opt, options=FULL_STATE)
        ema_weights = ema.full_state() if ema is not None else None
        if is_main_process():
            state = {
                "optimizer": optimizer, "step": step, "total_steps": total, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
            checkpoint.save_checkpoint(run_dir, step, weights, {**ckpt_config, "total_steps": total}, state,
                                       cfg.keep_checkpoints, ema_weights)

    model.train()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not is_main_process(), dynamic_ncols=True)
    # A time budget becomes a step count at step pace_at, before the first checkpoint, from the pace of the
    # steps after the first (whose allocations and compilation make it slow)
    pace_at = min(PACE_STEPS, cfg.save_every) if cfg.time_budget_s and step == 0 else 0
    total = max(total, pace_at)
    t_start = t_first = clock(device)
    window: list[torch.Tensor] = []  # losses stay on the device: no host sync until a log or a checkpoint
    extras: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with bar:
        while step < total:
            lr = lr_at(step, cfg, total)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = []
            for micro_idx in local_micro_batches(step, cfg, num_items, rank, world):
                with autocast(device, cfg.precision):
                    loss, extra = step_fn(model, step, micro_idx)
                (loss / cfg.grad_accum).backward()
                losses.append(loss.detach())
            loss = torch.stack(losses).mean()
            if world > 1:
                if not sharded:  # FSDP reduce-scatters the gradients itself
                    average_gradients(model, world)
                dist.all_reduce(loss)
                loss /= world
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(step)
            step += 1
            if step == pace_at:
                total = budget_steps(cfg.time_budget_s, step, t_start, t_first, device, desc)
                bar.total = total
            if step == 1:
                t_first = clock(device)
            window.append(loss)
            for k, v in extra.items():
                extras.setdefault(k, []).append(float(v))
            bar.update(1)
            log, checkpoint_now = step % cfg.log_every == 0 or step == total, step % cfg.save_every == 0
            if log or checkpoint_now:
                losses_W = torch.stack(window)
                if not torch.isfinite(losses_W).all():
                    raise ElmgenError(f"the loss became non-finite before step {step} (no checkpoint was written "
                                      f"after it); lower train.lr or use fp32, then --resume")
            if log:
                elapsed = time.perf_counter() - t0
                row = {"step": step, "loss": losses_W.double().mean().item(), "lr": lr}
                row.update({k: float(np.mean(v)) for k, v in extras.items()})
                if units_per_step:
                    row[f"{unit}_per_s"] = units_per_step * len(window) / elapsed
                if is_main_process():
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("step", "lr")})
                window, extras, t0 = [], {}, time.perf_counter()
            if checkpoint_now or step == total:
                save()
    model.eval()
    return read_metrics(metrics_path)

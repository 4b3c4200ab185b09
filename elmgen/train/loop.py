"""The training loop shared by the tokenizer, language-model and classifier trainers.

Batches are a pure function of (seed, step), and the RNG state travels in the checkpoint, so a
resumed run reproduces the losses of an uninterrupted one exactly. Only the main process logs and
writes, so the same loop serves a torchrun launch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from elmgen import checkpoint
from elmgen.checkpoint import CheckpointMeta
from elmgen.config import save_yaml
from elmgen.data.loader import Load, default_workers, micro_batches
from elmgen.device import autocast, resolve_precision
from elmgen.errors import ElmgenError
from elmgen.io import atomic_write_text, read_metrics, remove_temporaries
from elmgen.schedules import lr_at
from elmgen.train.budget import RunLength
from elmgen.train.config import OptimizerConfig, TrainConfig
from elmgen.train.distributed import (
    distributed,
    gather_state,
    gradient_sync,
    is_main_process,
    load_whole_state,
    mean_over_processes,
    replicate,
    shard,
)

RUN_FILES = ("metrics.jsonl", "job.yaml", "loss.png", "eval.json", "reconstructions.png")  # what trainers write


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
        raise ElmgenError(
            f"{what}, {micro_batch} at a time, needs about {needed:,.0f} GB of memory, more than the "
            f"{total / 1e9:,.0f} GB of {where}; {fix}"
        )


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, skip: tuple[str, ...] = ()) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters but those of its children `skip` (trained by their own)."""
    params = [p for name, p in model.named_parameters() if p.requires_grad and name.split(".")[0] not in skip]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all tensors in one pass (docs/performance.md: the largest single gain in a
    # training step); FSDP's sharded (DTensor) parameters take the foreach path.
    fused = not any(isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: consecutive slices of one shuffled permutation per epoch."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start, num_items)
        perm = np.random.default_rng([seed, epoch]).permutation(num_items)
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out, dtype=np.int64)


# A step function takes the model, the step and one micro-batch (its dataset indices, or what fit's `load` made
# of them), and returns (mean loss over that micro-batch, extra floats to log).
StepFn = Callable[[torch.nn.Module, int, np.ndarray], tuple[torch.Tensor, dict]]


@dataclass
class Part:
    """A network trained in the same steps as the model but on its own (a GAN's discriminator): its own loss,
    AdamW, learning-rate schedule and gradient clip (`optim`), its own DDP wrapper, and outside the EMA.
    `name`: the model's child it is (the prefix of its tensors in checkpoints). From step `start` its step
    function (called with the whole model) runs after the model's on each micro-batch; its schedule counts
    from there."""

    name: str
    optim: OptimizerConfig
    step_fn: StepFn
    start: int = 0


@dataclass
class Optimized:
    """What one optimizer trains, and how: the model's share (part None) or a part's."""

    part: Part | None
    optim: OptimizerConfig
    step_fn: StepFn
    opt: torch.optim.AdamW
    names: set[str]  # its parameters' names in the model (keys of the optimizer's saved state)
    replicated: torch.nn.Module | None  # its DDP wrapper (under torchrun without FSDP), else None

    @property
    def start(self) -> int:
        return self.part.start if self.part else 0

    def lr(self, step: int, total: int) -> float:
        return lr_at(step - self.start, self.optim, total - self.start)


def local_micro_batches(step: int, cfg: TrainConfig, num_items: int, rank: int, world: int) -> np.ndarray:
    """(grad_accum, micro batch) indices of this process at `step`: its contiguous share of the global
    batch, cut into micro-batches (cfg.validate(world) checked the split). The global batch never
    depends on the number of processes."""
    idx = batch_indices(step, cfg.batch_size, num_items, cfg.seed)
    return idx.reshape(world, -1)[rank].reshape(cfg.grad_accum, -1)


class EMA:
    """Exponential moving average of a module's parameters but those of its children `skip`. Under FSDP each
    process averages its own shards; `full_state` gathers them."""

    def __init__(self, module: torch.nn.Module, decay: float, skip: tuple[str, ...] = ()):
        self.decay = decay
        self.params = {name: p for name, p in module.named_parameters() if name.split(".")[0] not in skip}
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
    """Activation checkpointing, FSDP sharding and compilation (per sharded unit under FSDP), in place, as
    configured; True if sharded.

    Models opt in: `activation_checkpointing` is a flag they read in forward, `fsdp_units` the
    submodules sharded on their own (e.g. transformer blocks) before the root."""
    name = type(model).__name__
    if cfg.activation_checkpointing:
        if not hasattr(model, "activation_checkpointing"):
            raise ElmgenError(f"train.activation_checkpointing is not supported for {name}; turn it off")
        model.activation_checkpointing = True
    sharded = cfg.fsdp and world > 1
    if sharded:
        if not hasattr(model, "fsdp_units"):
            raise ElmgenError(f"train.fsdp is not supported for {name} (small enough for plain data parallelism)")
        shard(model, bf16=resolve_precision(cfg.precision, next(model.parameters()).device) == "bf16")
    if cfg.compile:
        # sharded, each unit compiles on its own: one graph per block, FSDP's gathers and reductions between them
        for module in model.fsdp_units if sharded else [model]:
            module.compile(dynamic=False)
    return sharded


def fit(
    model: torch.nn.Module,
    cfg: TrainConfig,
    run_dir: str | Path,
    step_fn: StepFn,
    num_items: int,
    meta: CheckpointMeta,
    resume: bool = False,
    desc: str = "train",
    units_per_step: int | None = None,
    unit: str = "it",
    job=None,
    parts: tuple[Part, ...] = (),
    load: Load | None = None,
    in_memory: bool = False,
    preview: Callable[[torch.nn.Module], Image.Image] | None = None,
) -> list[dict]:
    """Train `model` for cfg.steps optimizer steps over a dataset of `num_items`, logging to
    run_dir/metrics.jsonl. Under torchrun every process takes its share of each global batch and
    gradients are averaged (with cfg.fsdp: reduce-scattered onto parameter shards), so any number of
    processes follows the same trajectory (up to the random draws inside a step), and checkpoints hold
    whole tensors, so a run can resume with another number of processes.

    Seed torch with cfg.seed before building the model: a fresh run continues from that RNG state.
    `units_per_step` (tokens or images per step) turns step time into a throughput figure. With cfg.ema_decay > 0
    an EMA of the weights (not the parts') is kept and saved beside them (`ema.safetensors`); loaders prefer it.
    With cfg.time_budget_s the step count is decided early and kept in the checkpoints, so a resumed run ends where
    the first one planned to. `job` (a config dataclass) is saved as job.yaml once the run is accepted: a refused
    run leaves the folder as it was. `meta`: what every checkpoint's config.json records. `parts`: children of the
    model trained by optimizers of their own (`Part`). `load(step, idx)`: a micro-batch made from its indices (a
    pure function: decoded images, augmented), run by cfg.workers DataLoader processes (`inputs`; by default none
    when the data set is `in_memory`); the step functions get its result instead of the indices. With cfg.log
    "tensorboard" the figures also go to TensorBoard event files beside metrics.jsonl, with `preview(model)` (a
    picture: samples, reconstructions; not under FSDP) at each checkpoint. Returns all of metrics.jsonl.
    """
    rank, world = distributed()
    cfg.validate(world)
    writer = summary_writer() if cfg.log == "tensorboard" else None  # refused before any work when missing
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    sharded = prepare(model, cfg, world)
    trained = _optimized(model, cfg, step_fn, parts, world > 1 and not sharded)
    step, ema, total = _start(model, trained, cfg, run_dir, resume, tuple(p.name for p in parts))
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        _clean_run_folder(run_dir, step, job)
    model.train()
    board = writer(str(run_dir), purge_step=step or None) if writer and is_main_process() else None
    if sharded:  # only the main process draws the picture, and a sharded model's forward is a collective
        preview = None
    window = MetricsWindow(run_dir / "metrics.jsonl", units_per_step, unit, board)
    length = RunLength(cfg, step, total, device, desc)
    batches = _batches(cfg, step, num_items, rank, world, load, in_memory, device)
    bar = tqdm(total=total, initial=step, desc=desc, disable=not is_main_process(), dynamic_ncols=True)
    with bar, contextlib.closing(batches):  # closing the batches stops the workers
        while step < length.total:
            lr = lr_at(step, cfg, length.total)
            micro = _next_micro_batches(batches, cfg.grad_accum, load is None)
            loss, extra = _optimizer_step(model, trained, cfg, step, length.total, micro, world, device)
            if ema is not None:
                ema.update(step)
            step += 1
            bar.total = length.after(step)
            window.add(loss, extra)
            bar.update(1)
            log, checkpoint_now = step % cfg.log_every == 0 or step == length.total, step % cfg.save_every == 0
            if log or checkpoint_now:
                window.check_finite(step)
            if log:
                bar.set_postfix({k: f"{v:.4g}" for k, v in window.log(step, lr).items() if k not in ("step", "lr")})
            if checkpoint_now or step == length.total:
                _save(model, trained, ema, cfg, run_dir, step, replace(meta, total_steps=length.total))
                window.checkpoint(step, lambda: _picture(model, preview, device) if preview else None)
    window.close()
    model.eval()
    return read_metrics(run_dir / "metrics.jsonl")


def summary_writer() -> type:
    """torch's TensorBoard SummaryWriter; ElmgenError when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ElmgenError(
            "train.log=tensorboard needs the tensorboard package: pip install 'elmgen[tensorboard]', "
            "or log to metrics.jsonl alone (train.log=jsonl)"
        ) from None
    return SummaryWriter


def _picture(model: torch.nn.Module, preview: Callable, device: torch.device) -> Image.Image:
    """`preview(model)` in eval mode without gradients, its random draws from a copy of the RNG state: the
    training run goes on as if it had not been drawn."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        model.eval()
        try:
            return preview(model)
        finally:
            model.train()


def _batches(cfg: TrainConfig, start: int, num_items: int, rank: int, world: int, load, in_memory: bool, device):
    """This process's micro-batches from step `start` on, endless (a time budget decides the run's length as it
    goes): (step, indices) pairs, or with `load` what the input pipeline's workers made of them."""
    pairs = ((s, idx) for s in itertools.count(start) for idx in local_micro_batches(s, cfg, num_items, rank, world))
    if load is None:
        return pairs
    workers = default_workers(in_memory) if cfg.workers is None else cfg.workers
    return micro_batches(load, workers, cfg.seed, pairs, device)


def _next_micro_batches(batches: Iterator, grad_accum: int, as_indices: bool) -> list:
    """The next step's micro-batches: their indices (from (step, indices) pairs), or what `load` made of them."""
    micro = [next(batches) for _ in range(grad_accum)]
    return [idx for _, idx in micro] if as_indices else micro


def _optimized(
    model: torch.nn.Module, cfg: TrainConfig, step_fn: StepFn, parts: tuple[Part, ...], replicated: bool
) -> list[Optimized]:
    """The model's optimizer (over all but the parts) and each part's, with DDP wrappers when `replicated`:
    each wraps only its own parameters, so DDP averages each optimizer's gradients on its own."""
    skip = tuple(p.name for p in parts)
    names = [name for name, _ in model.named_parameters()]
    rest = tuple(name for name, _ in model.named_children() if name not in skip) if skip else None
    out = [
        Optimized(
            None,
            cfg,
            step_fn,
            make_optimizer(model, cfg, skip),
            {n for n in names if n.split(".")[0] not in skip},
            replicate(model, step_fn, rest) if replicated else None,
        )
    ]
    for p in parts:
        out.append(
            Optimized(
                p,
                p.optim,
                p.step_fn,
                make_optimizer(getattr(model, p.name), p.optim),
                {n for n in names if n.split(".")[0] == p.name},
                replicate(model, p.step_fn, (p.name,)) if replicated else None,
            )
        )
    return out


def _start(
    model: torch.nn.Module,
    trained: list[Optimized],
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    skip: tuple[str, ...],
) -> tuple[int, EMA | None, int]:
    """The step to start from, the EMA (with cfg.ema_decay > 0) and the run's step count: the run's last
    checkpoint, loaded into model, optimizers and EMA (with `resume`), or step 0 for a new run."""
    if not checkpoint.has_checkpoint(run_dir):
        if resume:
            raise ElmgenError(f"nothing to resume: {run_dir} holds no checkpoint")
        return 0, _ema(model, cfg, None, skip), cfg.steps
    if not resume:
        raise ElmgenError(f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose a new --out")
    state = checkpoint.load_trainer_state(run_dir)
    if state is None:
        raise ElmgenError(f"checkpoint in {run_dir} has no trainer state to resume from")
    # Whole (unsharded) tensors, keyed by parameter name: resumable with any number of processes. The optimizers
    # with saved state get it (a part that had not started has none); checkpoints written before the parts had
    # optimizers of their own hold one optimizer over everything, split here by parameter name.
    saved = state["optimizer"].get("state", {})
    opts = [t.opt for t in trained if t.names & set(saved)]
    try:
        load_whole_state(model, opts, checkpoint.load_state(run_dir, ema=False), state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ElmgenError(
            f"checkpoint in {run_dir} does not match this model or optimizer "
            f"({str(e).splitlines()[0]}); was it written for another config?"
        ) from None
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    # the count a time budget decided when the run started: a resumed run ends there
    total = state["total_steps"] if cfg.time_budget_s and isinstance(state.get("total_steps"), int) else cfg.steps
    return state["step"], _ema(model, cfg, checkpoint.load_ema(run_dir), skip), total


def _ema(model: torch.nn.Module, cfg: TrainConfig, state: dict | None, skip: tuple[str, ...]) -> EMA | None:
    """The EMA of the (loaded) weights but the children `skip` when cfg.ema_decay > 0, with a checkpoint's EMA
    state if it kept one (an older one's extra tensors, e.g. a discriminator's, are ignored)."""
    if cfg.ema_decay <= 0:
        return None
    ema = EMA(model, cfg.ema_decay, skip)
    if state is not None:
        ema.load_full_state(state)
    return ema


def _clean_run_folder(run_dir: Path, step: int, job) -> None:
    """Remove what a killed run left: temporaries, and metric rows past its last checkpoint (all of them when
    it had none), which this run logs again; then save the accepted job."""
    remove_temporaries(run_dir / "checkpoints")
    remove_temporaries(run_dir, *RUN_FILES)
    metrics_path = run_dir / "metrics.jsonl"
    kept = [row for row in read_metrics(metrics_path) if row["step"] <= step] if step else []
    atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
    if job is not None:
        save_yaml(job, run_dir / "job.yaml")


def _optimizer_step(
    model,
    trained: list[Optimized],
    cfg: TrainConfig,
    step: int,
    total: int,
    micro_batches: list,
    world: int,
    device,
) -> tuple[torch.Tensor, dict]:
    """One step of every optimizer whose share has started, over this process's micro-batches: on each, the
    model's forward and backward, then each part's. Returns the model's loss (averaged over every process) and
    the last micro-batch's extra figures, with each part's learning rate. Gradients are synchronised only after
    the last micro-batch (DDP wrappers, or FSDP's hooks on the model itself)."""
    active = [t for t in trained if step >= t.start]
    losses, extra = [], {}
    for i, micro in enumerate(micro_batches):
        for t in active:
            with gradient_sync(t.replicated or model, i == len(micro_batches) - 1):
                with autocast(device, cfg.precision):
                    loss, logs = t.replicated(step, micro) if t.replicated else t.step_fn(model, step, micro)
                (loss / cfg.grad_accum).backward()
            extra.update(logs)
            if t.part is None:
                losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    if world > 1:
        loss = mean_over_processes(loss, world)
    for t in active:
        lr = t.lr(step, total)
        for group in t.opt.param_groups:
            group["lr"] = lr
        if t.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in t.opt.param_groups for p in g["params"]], t.optim.grad_clip)
        t.opt.step()
        t.opt.zero_grad(set_to_none=True)
        if t.part is not None:
            extra[f"lr_{t.part.name}"] = lr
    return loss, extra


def _save(
    model, trained: list[Optimized], ema: EMA | None, cfg: TrainConfig, run_dir: Path, step: int, meta: CheckpointMeta
) -> None:
    # Gathering whole tensors is a collective under FSDP: every process takes part, the main one writes. One
    # optimizer state keyed by parameter name holds every optimizer that has stepped (a part before its start
    # has no state, and gathering would invent one).
    weights, optimizer = gather_state(model, [t.opt for t in trained if t.opt.state])
    ema_weights = ema.full_state() if ema is not None else None
    if is_main_process():
        state = {
            "optimizer": optimizer,
            "step": step,
            "total_steps": meta.total_steps,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        checkpoint.save_checkpoint(run_dir, step, weights, meta, state, cfg.keep_checkpoints, ema_weights)


class MetricsWindow:
    """The steps since the last row of metrics.jsonl. Losses stay on the device: no host sync until a log or
    a checkpoint."""

    def __init__(self, path: Path, units_per_step: int | None, unit: str, board=None):
        self.path, self.units_per_step, self.unit = path, units_per_step, unit
        self.board = board  # a SummaryWriter (train.log: tensorboard, main process), or None
        self.losses: list[torch.Tensor] = []
        self.extras: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, extra: dict) -> None:
        self.losses.append(loss)
        for k, v in extra.items():
            self.extras.setdefault(k, []).append(float(v))

    def check_finite(self, step: int) -> None:
        if not torch.isfinite(torch.stack(self.losses)).all():
            raise ElmgenError(
                f"the loss became non-finite before step {step} (no checkpoint was written "
                f"after it); lower train.lr or use fp32, then --resume"
            )

    def log(self, step: int, lr: float) -> dict:
        """Append the window's row (main process) and start a new window; returns the row."""
        elapsed = time.perf_counter() - self.t0
        row = {"step": step, "loss": torch.stack(self.losses).double().mean().item(), "lr": lr}
        row.update({k: float(np.mean(v)) for k, v in self.extras.items()})
        if self.units_per_step:
            row[f"{self.unit}_per_s"] = self.units_per_step * len(self.losses) / elapsed
        if is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if key != "step":
                    self.board.add_scalar(key, value, step)
        self.losses, self.extras, self.t0 = [], {}, time.perf_counter()
        return row

    def checkpoint(self, step: int, picture: Callable[[], Image.Image | None]) -> None:
        """At a checkpoint: the picture (drawn only for TensorBoard) and everything logged so far, to disk."""
        if self.board is None:
            return
        image = picture()
        if image is not None:
            array = np.asarray(image)
            self.board.add_image("preview", array, step, dataformats="HW" if array.ndim == 2 else "HWC")
        self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

"""The training loop's settings, shared by every trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from elmgen.device import PRECISIONS
from elmgen.errors import ElmgenError

LOGS = ("jsonl", "tensorboard")  # where training figures go: metrics.jsonl always, TensorBoard too


@dataclass
class OptimizerConfig:
    """One AdamW's settings and learning-rate schedule: the model's (TrainConfig) and any network trained beside
    it by an optimizer of its own (the tokenizer's discriminator)."""

    lr: float = 1e-4  # peak learning rate (after warm-up)
    warmup_steps: int = 0  # linear warm-up from 0
    lr_decay: str = "constant"  # "constant" or "cosine" (to min_lr at the last step)
    min_lr: float = 0.0  # cosine decay ends here
    weight_decay: float = 0.05  # on matrices only (not norms, biases)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def validate_optimizer(self, prefix: str) -> None:
        """Refuse out-of-range settings (NaN included); `prefix`: the config key they sit under."""
        if self.lr_decay not in ("constant", "cosine"):
            raise ElmgenError(f"{prefix}.lr_decay must be 'constant' or 'cosine', not {self.lr_decay!r}")
        # (field, holds, valid range): written so that NaN fails every test
        ranges = [
            ("lr", 0 < self.lr < math.inf, "a finite number > 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"in [0, {prefix}.lr]"),
            ("weight_decay", 0 <= self.weight_decay < math.inf, "a finite number >= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", 0 <= self.grad_clip < math.inf, "a finite number >= 0 (0 disables clipping)"),
        ]
        refuse_out_of_range(self, prefix, ranges)


def refuse_out_of_range(cfg, prefix: str, ranges: list[tuple[str, bool, str]]) -> None:
    for name, holds, valid in ranges:
        if not holds:
            raise ElmgenError(f"{prefix}.{name}={getattr(cfg, name)} is out of range: it must be {valid}")


@dataclass
class TrainConfig(OptimizerConfig):
    steps: int = 2000  # optimizer steps of the whole run
    batch_size: int = 64  # global batch: split over data-parallel processes, then over grad_accum micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step (same result as one big batch, less memory)
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "auto" (bf16 where the device computes it natively)
    ema_decay: float = 0.0  # keep an EMA of the weights (saved beside them, used for sampling); 0: none
    compile: bool = False  # torch.compile the model's forward (fixed shapes: compiled once)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (language models)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    seed: int = 0  # initial weights and batch order
    log_every: int = 20  # steps per row of metrics.jsonl
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    workers: int | None = None  # tokenizer, classifier: processes decoding and augmenting images ahead of the step;
    # None: none for data held in memory (Fashion-MNIST), else one per core but one (per process under torchrun)
    log: str = "jsonl"  # "jsonl": metrics.jsonl; "tensorboard": TensorBoard event files beside it too (figures,
    # and a sample or reconstruction grid at each checkpoint; pip install 'elmgen[tensorboard]')
    time_budget_s: float = 0.0  # > 0: train as many steps as fit in this many seconds at the pace of the first
    # steps (`steps` is then only the provisional length the learning rate follows until the count is decided)

    def validate(self, world: int = 1) -> None:
        """Refuse out-of-range settings (NaN included) before anything is written; `world`: processes."""
        self.validate_optimizer("train")
        if self.log not in LOGS:
            raise ElmgenError(f"train.log must be one of {', '.join(LOGS)}, not {self.log!r}")
        if self.precision not in PRECISIONS:
            raise ElmgenError(f"train.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        ranges = [
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: no EMA)"),
            ("seed", self.seed >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("save_every", self.save_every >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("workers", self.workers is None or self.workers >= 0, ">= 0 (0: decode in the training process)"),
            ("time_budget_s", 0 <= self.time_budget_s < math.inf, "a finite number >= 0 (0: train.steps steps)"),
        ]
        refuse_out_of_range(self, "train", ranges)
        if self.batch_size % (world * self.grad_accum):
            raise ElmgenError(
                f"train.batch_size={self.batch_size} must be divisible by processes x grad_accum "
                f"= {world} x {self.grad_accum}"
            )

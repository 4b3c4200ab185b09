"""A time budget for a training run: its step count decided from the pace of its first steps."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from elmgen.train.config import TrainConfig
from elmgen.train.distributed import is_main_process

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


class RunLength:
    """The run's step count: `total`, or under a time budget the count decided at step `pace_at` (before the
    first checkpoint) from the pace of the steps after the first, whose allocations and compilation make it slow.
    Every process gets rank 0's count."""

    def __init__(self, cfg: TrainConfig, step: int, total: int, device: torch.device, desc: str):
        self.budget_s, self.device, self.desc = cfg.time_budget_s, device, desc
        self.pace_at = min(PACE_STEPS, cfg.save_every) if cfg.time_budget_s and step == 0 else 0
        self.total = max(total, self.pace_at)
        self.t_start = self.t_first = clock(device)

    def after(self, step: int) -> int:
        """The count after `step` steps are done."""
        if step == self.pace_at:
            now = clock(self.device)
            pace = (now - self.t_first) / (step - 1) if step > 1 else now - self.t_start
            total = torch.tensor([steps_within(self.budget_s, now - self.t_start, step, pace)], device=self.device)
            if dist.is_initialized():  # every process must stop at the same step
                dist.broadcast(total, 0)
            self.total = int(total)
            if is_main_process():
                minutes = self.budget_s / 60
                tqdm.write(
                    f"{self.desc}: {pace:.3g} s a step, so {self.total} steps fit the {minutes:.3g}-minute budget",
                    file=sys.stderr,
                )
        if step == 1:
            self.t_first = clock(self.device)
        return self.total

"""A time budget for a training run: its step count decided from the pace of its first steps."""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from elmgen.train.config import TrainConfig
from elmgen.train.distributed import is_main_process

# A first step count is decided after PACE_STEPS steps (the first is not timed), the final one after about
# PACE_SHARE of the budget more, from the median step time: a few slow steps at the start (another program
# starting beside the run) would otherwise shorten the whole run.
PACE_STEPS, PACE_SHARE = 6, 0.1


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
    """The run's step count: `total`, or under a time budget the count decided before the first checkpoint from
    the pace of the steps after the first, whose allocations and compilation make it slow (a first count at step
    PACE_STEPS, the final one at `final_at`). Every process gets rank 0's counts."""

    def __init__(self, cfg: TrainConfig, step: int, total: int, device: torch.device, desc: str):
        self.budget_s, self.save_every, self.device, self.desc = cfg.time_budget_s, cfg.save_every, device, desc
        self.final_at = min(PACE_STEPS, cfg.save_every) if cfg.time_budget_s and step == 0 else 0
        self.total = max(total, self.final_at)
        self.step_s: list[float] = []  # the times of steps 2 to now
        self.t_start = self.t_last = clock(device)

    def after(self, step: int) -> int:
        """The count after `step` steps are done."""
        if step > self.final_at:
            return self.total
        now = clock(self.device)
        if step > 1:
            self.step_s.append(now - self.t_last)
        self.t_last = now
        first = step == min(PACE_STEPS, self.save_every)
        if first or step == self.final_at:
            pace = statistics.median(self.step_s) if self.step_s else now - self.t_start
            total = steps_within(self.budget_s, now - self.t_start, step, pace)
            final_at = min(self.save_every, step + int(PACE_SHARE * self.budget_s / pace)) if first else step
            counts = torch.tensor([total, final_at], device=self.device)
            if dist.is_initialized():  # every process must stop at the same step
                dist.broadcast(counts, 0)
            self.total, self.final_at = (int(c) for c in counts)
            if self.final_at == step and is_main_process():
                minutes = self.budget_s / 60
                tqdm.write(
                    f"{self.desc}: {pace:.3g} s a step, so {self.total} steps fit the {minutes:.3g}-minute budget",
                    file=sys.stderr,
                )
        return self.total

"""The sampling options and what they mean at each decoding step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from elmgen.errors import ElmgenError
from elmgen.schedules import GUIDANCE_SCHEDULES, guidance_scale_at, temperature_at


@dataclass
class SampleConfig:
    guidance_scale: float = 3.0  # 1 disables classifier-free guidance
    guidance_schedule: str = "linear"  # how the scale ramps from 1 to guidance_scale with progress p = (t+1)/T:
    #   constant: s; linear: 1 + (s-1) p; cosine: 1 + (s-1)(1 - cos(pi p))/2; power: 1 + (s-1) p^guidance_power
    guidance_power: float = 2.0  # the exponent of the power schedule
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only while p is inside
    temperature: float = 1.0  # 0 samples greedily (argmax)
    temperature_end: float | None = None  # if set, temperature moves linearly to this over the steps
    top_k: int = 0  # keep the k most likely entries of each sub-code vocabulary; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of entries holding this much probability
    seed: int = 0  # with the class and the index in it, picks each image's own random stream
    kv_cache: bool = True  # AR: False recomputes the whole prefix at every step (for checking)
    compile: bool = False  # AR: torch.compile the one-cell decode step (static shapes: traced once)
    steps: int = 10  # MLM: decoding steps
    mask_noise: float = 4.5  # MLM: Gumbel noise scale on confidences, annealed to 0 over the steps
    precision: str = "fp32"  # "bf16": autocast the transformer and keep the KV cache in bfloat16

    def validate(self, vocab_size: int | None = None) -> None:
        """Refuse what would sample garbage (NaN, negative, out of range) before any work; the message names the
        option, its valid range and the value. `vocab_size`: entries of one sub-code vocabulary, when known."""
        inf = math.inf  # `0 <= x < inf` also refuses NaN: every comparison with NaN is false
        ci, t_end = self.guidance_interval, self.temperature_end
        checks = (
            ("guidance_scale", 0 <= self.guidance_scale < inf, "a number >= 0 (1 disables guidance)"),
            (
                "guidance_schedule",
                self.guidance_schedule in GUIDANCE_SCHEDULES,
                f"one of {', '.join(GUIDANCE_SCHEDULES)}",
            ),
            ("guidance_power", 0 < self.guidance_power < inf, "a number > 0"),
            ("guidance_interval", len(ci) == 2 and 0 <= ci[0] <= ci[1] <= 1, "LO HI with 0 <= LO <= HI <= 1"),
            ("temperature", 0 <= self.temperature < inf, "a number >= 0 (0 samples greedily)"),
            ("temperature_end", t_end is None or 0 <= t_end < inf, "a number >= 0"),
            (
                "top_k",
                0 <= self.top_k <= (vocab_size or self.top_k),
                "between 0 (all) and the sub-code vocabulary size" + (f" {vocab_size}" if vocab_size else ""),
            ),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("steps", self.steps >= 1, "at least 1"),
            ("mask_noise", 0 <= self.mask_noise < inf, "a number >= 0"),
            ("precision", self.precision in ("fp32", "bf16"), "fp32 or bf16"),
        )
        for name, ok, valid in checks:
            if not ok:
                raise ElmgenError(
                    f"--{name.replace('_', '-')} (sample.{name}) must be {valid}, not {getattr(self, name)}"
                )


def step_rules(cfg: SampleConfig, step: int, num_steps: int) -> tuple[float, float]:
    """(guidance scale, temperature) at one decoding step."""
    scale = guidance_scale_at(
        step, num_steps, cfg.guidance_scale, cfg.guidance_schedule, cfg.guidance_power, cfg.guidance_interval
    )
    return scale, temperature_at(step, num_steps, cfg.temperature, cfg.temperature_end)

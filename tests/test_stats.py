import math

import numpy as np
import pytest

from elmgen.stats import mean_interval, paired_bootstrap


def test_mean_interval_matches_the_t_formula():
    mean, half = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2) = 4.3027
    assert math.isnan(mean_interval([5.0])[1])


def test_t_interval_covers_the_true_mean_at_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = sum(abs(m - 1.0) <= h for m, h in (mean_interval(rng.normal(1.0, 2.0, 5)) for _ in range(2000)))
    assert 0.93 <= hits / 2000 <= 0.97


def test_paired_bootstrap_detects_a_known_difference_through_shared_noise():
    rng = np.random.default_rng(1)
    seed_luck = rng.normal(0, 5.0, 30)  # large, shared by both rows: pairing cancels it
    a, b = seed_luck + rng.normal(0, 0.1, 30), seed_luck + 0.5 + rng.normal(0, 0.1, 30)
    out = paired_bootstrap(a, b)
    assert out["significant"] and out["low"] < 0.5 < out["high"] and out["diff"] == pytest.approx(0.5, abs=0.1)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [2.0])


def test_identical_rows_are_flagged_near_the_nominal_rate():
    rng = np.random.default_rng(2)
    flagged = 0
    for i in range(300):
        luck = rng.normal(0, 3.0, 30)
        flagged += paired_bootstrap(luck + rng.normal(size=30), luck + rng.normal(size=30), draws=1000, seed=i)[
            "significant"
        ]
    assert flagged / 300 <= 0.1  # nominal 0.05; the percentile bootstrap runs a little liberal at n = 30

"""The benchmark's bootstrap interval of an agreement (benchmarks/benchmark.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.benchmark import _interval


def test_interval_brackets_the_mean_and_is_exact_when_all_agree() -> None:
    assert _interval(np.ones(50, bool)) == (1.0, 1.0)
    agrees = np.arange(200) % 10 != 0  # 0.9
    low, high = _interval(agrees)
    assert 0.84 < low < 0.9 < high < 0.95
    assert _interval(agrees) == (low, high)  # seeded

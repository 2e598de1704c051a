"""The benchmark's per-example agreement and its bootstrap interval (benchmarks/benchmark.py)."""

from __future__ import annotations

import numpy as np

from benchmarks.benchmark import _agrees, _interval


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True))[:, None, :]  # [texts, 1, hidden]: pooled row only


def test_neighbour_agreement_per_text_is_the_nearest_other_text_under_both() -> None:
    rng = np.random.default_rng(0)
    reference = _unit(rng.normal(size=(12, 4)).tolist())
    candidate = _unit((reference[:, 0] + rng.normal(scale=0.3, size=(12, 4))).tolist())

    def nearest(x: np.ndarray, i: int) -> int:
        return max((j for j in range(len(x)) if j != i), key=lambda j: float(x[i, 0] @ x[j, 0]))

    expected = [nearest(reference, i) == nearest(candidate, i) for i in range(12)]
    assert 0 < sum(expected) < 12
    agrees = _agrees("feature-extraction", [reference[:5], reference[5:]], [candidate[:5], candidate[5:]])
    np.testing.assert_array_equal(agrees, expected)
    assert _agrees("feature-extraction", [reference], [reference]).all()


def test_span_agreement_ignores_padding_and_needs_start_and_end() -> None:
    nan = np.nan
    reference = np.array([[[1, 3, 2, nan], [0, 1, 5, nan]], [[4, 1, 0, 0], [0, 0, 1, 2]]], np.float32)
    candidate = np.array([[[1, 3, 2, 9], [0, 1, 5, 9]], [[4, 1, 0, 0], [0, 3, 1, 2]]], np.float32)
    np.testing.assert_array_equal(_agrees("question-answering", [reference], [candidate]), [True, False])


def test_interval_brackets_the_mean_and_is_exact_when_all_agree() -> None:
    assert _interval(np.ones(50, bool)) == (1.0, 1.0)
    agrees = np.arange(200) % 10 != 0  # 0.9
    low, high = _interval(agrees)
    assert 0.84 < low < 0.9 < high < 0.95
    assert _interval(agrees) == (low, high)  # seeded

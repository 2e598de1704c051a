"""Median latency of an ONNX file on one provider: a quick, honest figure for the manifest and report.

This is not the benchmark (see benchmarks/benchmark.py): it times each file the same way, in one process,
one after another, so ratios between the files of one run are meaningful; absolute numbers are noisy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.parity import open_session


def measure_latency(
    path: Path, provider: str, feeds_by_shape: dict[str, dict[str, np.ndarray]], runs: int = 7, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """{"b1xs128": {"median_ms": .., "p90_ms": ..}, ...} for each named feed dict (batch x sequence)."""
    session = open_session(path, provider)
    names = {i.name for i in session.get_inputs()}
    result = {}
    for label, feeds in feeds_by_shape.items():
        feeds = {k: v for k, v in feeds.items() if k in names}
        for _ in range(warmup):
            session.run(None, feeds)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append((time.perf_counter() - start) * 1e3)
        result[label] = {"median_ms": statistics.median(times), "p90_ms": float(np.percentile(times, 90))}
    return result


def latency_feeds(tokenize: Any, texts: Sequence[str], shapes: Sequence[tuple[int, int]]) -> dict[str, dict[str, np.ndarray]]:
    """Full-length feeds (no padding) of real text per (batch, sequence) shape."""
    long_text = " ".join(texts)
    return {f"b{b}xs{s}": tokenize([long_text] * b, max_length=s) for b, s in shapes}

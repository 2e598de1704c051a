"""Latency of an ONNX file on one provider: percentiles over a batch grid, and the CPU throughput mode that
serves best (one multi-threaded session vs several single-threaded ones side by side).

This is not the benchmark (see benchmarks/benchmark.py): it times each file the same way, in one process, one
after another, so ratios between the files of one run are meaningful; absolute numbers are noisy.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.parity import open_session

Feeds = dict[str, np.ndarray]


def measure_latency(
    path: Path, provider: str, feeds_by_shape: dict[str, Feeds], runs: int = 9, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """{"b1xs128": {"median_ms", "p90_ms", "p99_ms", "samples_per_s"}, ...} per named feed dict."""
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
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        batch = next(iter(feeds.values())).shape[0]
        result[label] = {"median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
                         "samples_per_s": float(batch * 1e3 / p50)}
    return result


def throughput_modes(path: Path, feeds: Feeds, seconds: float = 1.0, workers: int | None = None) -> dict[str, Any]:
    """Samples/s of one session using every core vs `workers` single-threaded sessions run concurrently."""
    workers = workers or os.cpu_count() or 1
    batch = next(iter(feeds.values())).shape[0]

    def drive(sessions: Sequence[Any]) -> float:
        names = {i.name for i in sessions[0].get_inputs()}
        local = {k: v for k, v in feeds.items() if k in names}
        for session in sessions:
            session.run(None, local)  # warm-up
        counts = [0] * len(sessions)
        deadline = time.perf_counter() + seconds

        def loop(index: int) -> None:
            while time.perf_counter() < deadline:
                sessions[index].run(None, local)  # onnxruntime releases the GIL while it runs
                counts[index] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(sessions))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return sum(counts) * batch / (time.perf_counter() - start)

    single = drive([open_session(path, "CPUExecutionProvider")])
    several = drive([open_session(path, "CPUExecutionProvider", threads=1) for _ in range(workers)])
    best = "one session, all threads" if single >= several else f"{workers} sessions, 1 thread each"
    return {"one_session_samples_per_s": single, f"{workers}_sessions_samples_per_s": several, "best": best,
            "batch": batch}


def latency_feeds(tokenize: Any, texts: Sequence[str], shapes: Sequence[tuple[int, int]]) -> dict[str, Feeds]:
    """Full-length feeds (no padding) of real text per (batch, sequence) shape."""
    long_text = " ".join(texts)
    return {f"b{b}xs{s}": tokenize([long_text] * b, max_length=s) for b, s in shapes}

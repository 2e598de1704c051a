"""Latency of an ONNX file on one provider: percentiles over a batch grid, and the CPU throughput mode that
serves best (one multi-threaded session vs several single-threaded ones side by side).

This is not the benchmark (see benchmarks/benchmark.py): it times each file the same way, in one process, one
after another, so ratios between the files of one run are meaningful; absolute numbers are noisy.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphs.core.sessions import open_session
from graphs.core.telemetry import child_env

Feeds = dict[str, np.ndarray]
logger = logging.getLogger(__name__)


def measure_latency(
    path: Path, provider: str, feeds_by_shape: dict[str, Feeds], runs: int = 9, warmup: int = 2, threads: int = 0,
    io_binding: bool | None = None, session: Any = None,
) -> dict[str, dict[str, float]]:
    """{"b1xs128": {"median_ms", "p90_ms", "p99_ms", "samples_per_s"}, ...} per named feed dict.

    ``threads``: intra-op threads of the session (0: onnxruntime's default, every core). ``io_binding`` (default:
    :func:`binds_io`) binds inputs and outputs on the provider's device once, so a GPU timing measures the run,
    not host-device copies. Peak memory is :func:`peak_memory_mb` (a fresh process). ``session``: one already
    made (an OpenVINO compiled model, graphs/core/openvino_sessions.py) instead of an onnxruntime session of
    ``path``; ``provider`` then only names it (no IOBinding).
    """
    if io_binding is None:
        io_binding = binds_io(provider) and session is None
    if session is None:
        session = open_session(path, provider, threads=threads)
    names = {i.name for i in session.get_inputs()}
    result = {}
    for label, feeds in feeds_by_shape.items():
        feeds = {k: v for k, v in feeds.items() if k in names}
        if io_binding:
            binding = bind(session, provider, feeds)
            run = lambda b=binding: session.run_with_iobinding(b)  # noqa: E731
        else:
            run = lambda f=feeds: session.run(None, f)  # noqa: E731
        for _ in range(warmup):
            run()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        batch = next(iter(feeds.values())).shape[0]
        result[label] = {"median_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
                         "samples_per_s": float(batch * 1e3 / p50)}
    return result


DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}


def binds_io(provider: str) -> bool:
    """Whether latency is timed with IOBinding on ``provider``: GPU providers whose device is known (elsewhere
    binding would copy anyway, and on CPU there is nothing to save)."""
    return provider != "CPUExecutionProvider" and provider in DEVICES


def bind(session: Any, provider: str, feeds: Feeds) -> Any:
    """An onnxruntime IOBinding with ``feeds`` copied to the provider's device once and outputs left there."""
    import onnxruntime as ort

    device = DEVICES.get(provider, "cpu")
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device, 0)
    return binding


def peak_memory_mb(path: Path, provider: str, feeds: Feeds, timeout: float = 300.0) -> float | None:
    """Peak resident memory (MiB) one session of ``path`` adds to a fresh Python process that has imported
    onnxruntime: weights, arena and activations of two runs of ``feeds``. Measured in a child process because
    a process that already ran the model keeps the freed pages (glibc) and would report nothing. Linux only
    (``/proc/self/status``); None elsewhere or when the child fails (logged)."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="export-model-mem-") as work:
        inputs = Path(work) / "feeds.npz"
        np.savez(inputs, **feeds)
        root = str(Path(__file__).resolve().parents[1])
        # ORT_DISABLE_TELEMETRY=1: the child's onnxruntime sends no usage events (graphs/core/telemetry.py).
        env = child_env({**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
        try:
            done = subprocess.run([sys.executable, "-m", "exporter.memory_probe", str(path), provider, str(inputs)],
                                  capture_output=True, text=True, timeout=timeout, env=env, check=True)
            return round(float(done.stdout.strip().splitlines()[-1]) / 2**20, 1)
        except (subprocess.SubprocessError, ValueError, IndexError) as error:
            logger.warning("peak memory of %s on %s not measured: %s", path.name, provider, error)
            return None


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

"""``--tune``: quantize with every CPU recipe, time each result on this machine, keep the fastest that is accurate.

Which INT8 form runs fastest depends on the CPU and the onnxruntime build (VNNI or not, thread count, model
width), so instead of trusting the default preset this quantizes the model once per candidate preset (each with
the accuracy search, so every candidate meets the same task-metric bars), times the candidates round-robin on
the same real-text inputs, and keeps the one whose median latency, relative to the fastest candidate at each
timed shape, sums lowest (so batch 1 counts as much as batch 8). A
candidate that fails (onnxruntime refuses it, or the search cannot meet the bars) is recorded with its reason
and not chosen. The table of candidates goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from calibration.quantize import (
    PRESETS,
    QuantizationConfig,
    QuantizationReport,
    quantize_model,
    save_quantized,
)
from calibration.search import is_large
from graphs.core.errors import QuantizationError, first_line, from_onnxruntime
from graphs.core.sessions import open_session

logger = logging.getLogger(__name__)

CPU_CANDIDATES = ("cpu-avx512-vnni", "cpu-avx512-vnni-static", "cpu-avx512-vnni-unfused", "cpu-qoperator-u8s8")
"""Presets tried on the CPU provider (gpu-tensorrt-s8s8 targets TensorRT and is not timed here)."""


CARRIED = ("samples", "seed", "batch_size", "exclude_nodes", "calibration_chunk_batches", "max_accuracy_drop",
           "search_ranking_batches", "search_budget_s", "search_strategy", "validation_samples")
"""The user's options every candidate keeps; everything else (the recipe) comes from the candidate preset."""


def candidate_config(base: QuantizationConfig, preset: str) -> QuantizationConfig:
    """The preset ``preset`` with ``base``'s :data:`CARRIED` options (samples, seed, accuracy bars, ...), so a
    recipe chosen for the run (``--quantization-preset``, ``--calibration-method``) does not leak into the others."""
    return dataclasses.replace(PRESETS[preset], **{name: getattr(base, name) for name in CARRIED}, tune=False)


def _is_failure(error: Exception) -> bool:
    """A candidate's own failure: ours, or onnxruntime's."""
    return isinstance(error, (QuantizationError, RuntimeError, ValueError)) or from_onnxruntime(error)


def tune_quantization(
    sources: Mapping[str, Path], output_path: Path, reader: CalibrationDataReader, base: QuantizationConfig,
    timing_feeds: Mapping[str, Mapping[str, np.ndarray]], sample_sha256: str = "",
    validation: Sequence[Mapping[str, np.ndarray]] | None = None, metric: str = "embedding",
    candidates: Sequence[str] = CPU_CANDIDATES, rounds: int = 7,
    quantize: Callable[..., QuantizationReport] = quantize_model,
) -> tuple[QuantizationReport, list[dict[str, Any]]]:
    """Quantize ``sources["fused"]`` / ``sources["unfused"]`` with each candidate preset, time them, write the
    fastest to ``output_path``; returns its report and one row per candidate (see module doc)."""
    if len(candidates) > 1 and not hasattr(reader, "rewind"):
        raise QuantizationError("--tune calibrates once per candidate preset and needs a reader with rewind(); "
                                "use calibration.data.TextCalibrationReader")
    rows: list[dict[str, Any]] = []
    reports: dict[str, QuantizationReport] = {}
    with tempfile.TemporaryDirectory(prefix="export-model-tune-") as work:
        files: dict[str, Path] = {}
        for preset in candidates:
            config = candidate_config(base, preset)
            path = Path(work) / f"{preset}.onnx"
            row: dict[str, Any] = {"preset": preset, "graph": "fused" if config.uses_fused_graph else "unfused"}
            start = time.perf_counter()
            if hasattr(reader, "rewind"):
                reader.rewind()  # every candidate calibrates on the whole sample
            try:
                report = quantize(sources[row["graph"]], path, reader, config, sample_sha256=sample_sha256,
                                  validation=validation, metric=metric)
            except Exception as error:
                if not _is_failure(error):
                    raise
                row |= {"status": "failed", "reason": first_line(error)}
                logger.info("tune: %s failed: %s", preset, row["reason"])
                rows.append(row)
                continue
            reports[preset], files[preset] = report, path
            search = report.search or {}
            row |= {"status": "ok", "quantized_nodes": report.quantized_nodes,
                    "fallback_nodes": len(report.fallback_nodes), "scores": search.get("scores_after", {}),
                    "quantize_seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
        if not files:
            raise QuantizationError(
                f"--tune: every candidate preset failed ({'; '.join(r['preset'] + ': ' + r['reason'] for r in rows)}); "
                "run without --tune to see the default preset's error"
            )
        timings, refused = _time_round_robin(files, timing_feeds, rounds)
        for row in rows:
            if row["preset"] in timings:
                row["median_ms"] = {label: round(ms, 3) for label, ms in timings[row["preset"]].items()}
            if row["preset"] in refused:
                row |= {"status": "failed", "reason": refused[row["preset"]]}
        if not timings:
            raise QuantizationError(f"--tune: no candidate could be timed ({refused})")
        # Each shape counts alike: a candidate's time per shape relative to the fastest there, summed.
        fastest = {label: min(per[label] for per in timings.values()) for label in timing_feeds}
        chosen = min(timings, key=lambda preset: sum(timings[preset][label] / fastest[label] for label in fastest))
        for row in rows:
            row["chosen"] = row["preset"] == chosen
        model = onnx.load(str(files[chosen]))  # with its external data, if any: saved again beside output_path
        save_quantized(model, output_path, is_large(model))
    logger.info("tune: chose %s of %s", chosen, [r["preset"] for r in rows])
    return reports[chosen], rows


def _time_round_robin(
    files: Mapping[str, Path], feeds: Mapping[str, Mapping[str, np.ndarray]], rounds: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(median ms per candidate and shape, {candidate: why onnxruntime refused to run it}); candidates
    interleaved so machine noise hits them alike."""
    sessions, refused = {}, {}
    for preset, path in files.items():
        try:
            session = open_session(path, spinning=False)
            names = {i.name for i in session.get_inputs()}
            local = {label: {k: v for k, v in f.items() if k in names} for label, f in feeds.items()}
            for f in local.values():  # warm-up, and the first run that may fail
                session.run(None, f)
            sessions[preset] = (session, local)
        except Exception as error:
            if not _is_failure(error):
                raise
            refused[preset] = f"onnxruntime could not run it: {first_line(error)}"
    times: dict[str, dict[str, list[float]]] = {preset: {label: [] for label in feeds} for preset in sessions}
    for _ in range(rounds):
        for preset, (session, local) in sessions.items():
            for label, f in local.items():
                start = time.perf_counter()
                session.run(None, f)
                times[preset][label].append((time.perf_counter() - start) * 1e3)
    medians = {preset: {label: statistics.median(values) for label, values in per.items()} for preset, per in times.items()}
    return medians, refused

"""Parity of the artifact's files on OpenVINO (the optional ``openvino`` package), beside onnxruntime's rows.

Each file OpenVINO reads is run at every precision variant this machine allows and judged against the same
PyTorch reference outputs with the same bars: an FP32 file at ``fp32`` (``INFERENCE_PRECISION_HINT=f32``, max abs
error <= ``fp32_atol``) and, where the CPU has AVX-512 BF16 or AMX, at ``bf16`` (mean cosine >=
``bf16_min_cosine``); an INT8 file at ``int8`` (f32 hint: its float parts, LayerNorm, Softmax, GELU and the
attention MatMuls, in float32) and, where bf16 is allowed, at ``int8-bf16`` (bf16 hint: those float parts in
bf16, the INT8 MatMuls unchanged), each with mean cosine >= ``int8_min_cosine``. A float16 file is
not an OpenVINO variant. A file OpenVINO cannot read or compile (onnxruntime's ``QAttention`` in
``model_quantized.onnx``) is a ``skip`` row saying why; without openvino one ``skip`` row says so.

At export a reduced-precision run (bf16, int8, int8-bf16) that passed is judged once more by a ``judge`` the
exporter passes in: the accuracy search's task metric on its held-out examples, where the decisions (nearest
neighbour, argmax, answer span) are counted over enough rows to see a change that the parity batches' few rows
and a mean cosine cannot. A run under that bar becomes a ``skip`` row, measured and not served, its numbers kept
and its reason naming the score. The judge lives with the exporter (it needs the calibration metrics); the
deployment side's ``verify`` checks parity only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from exporter.runtime.parity import Batch, ParityConfig, ParityEntry, compare, run_session
from graphs.core.errors import first_line
from graphs.core.openvino_sessions import (
    BF16_FLAGS,
    ENGINE,
    bf16_flags,
    missing_reason,
    open_compiled,
    version,
)

log = logging.getLogger(__name__)

INT8_BF16 = "int8-bf16"
"""An INT8 file run with OpenVINO's bf16 hint: its INT8 MatMuls as they are, its float parts in bf16."""
EVERY_FILE = "every file"
"""The ``file`` of the one skip row written where openvino is absent."""
Judge = Callable[[Any], tuple[dict[str, float], str | None]]
"""A compiled session -> (its task scores, None or why they fall short of the bar)."""


def variants(file_precision: str, flags: list[str] | None = None) -> list[str]:
    """The OpenVINO runs of a file of `file_precision` on this CPU ("fp32" -> fp32, and bf16 where `flags`
    (default: this CPU's) allow it; "int8" -> int8, and int8-bf16 where they allow it; anything else -> none)."""
    bf16 = bool(bf16_flags() if flags is None else flags)
    if file_precision == "fp32":
        return ["fp32", *(["bf16"] if bf16 else [])]
    return ["int8", *([INT8_BF16] if bf16 else [])] if file_precision == "int8" else []


def hint(precision: str) -> str:
    """The precision an OpenVINO run of `precision` compiles with ("bf16" for bf16 and int8-bf16, "fp32"
    otherwise)."""
    return "bf16" if precision in ("bf16", INT8_BF16) else "fp32"


def absent_entries() -> list[ParityEntry]:
    """One skip row where openvino is not installed; none where it is."""
    if version() is not None:
        return []
    return [ParityEntry(EVERY_FILE, ENGINE, "fp32", "skip", reason=missing_reason())]


def check_openvino(
    name: str, file_precision: str, task: str, batches: Sequence[Batch], expected: Sequence[Batch],
    config: ParityConfig, model: Any, threads: int = 0, judge: Judge | None = None,
) -> list[ParityEntry]:
    """Parity entries of file `name` (`model`: its path or checked bytes) on OpenVINO, one per variant
    (:func:`variants`); [] without openvino (see :func:`absent_entries`). `judge`: the task bar a passing
    reduced-precision run must also meet to be served (see the module docstring)."""
    if version() is None:
        return []
    entries = []
    output_names = list(expected[0])
    for precision in variants(file_precision):
        start = time.perf_counter()
        try:
            session = open_compiled(model, hint(precision), threads)
        except RuntimeError as error:  # OpenVINO's read or compile failure (not ProviderUnavailableError)
            entries.append(ParityEntry(name, ENGINE, precision, "skip",
                                       reason=f"OpenVINO cannot read or compile it: {openvino_failure(error)}"))
            continue
        try:
            actual = run_session(session, batches, output_names)
        except RuntimeError as error:
            entries.append(ParityEntry(name, ENGINE, precision, "fail",
                                       reason=f"OpenVINO cannot run it: {openvino_failure(error)}"))
            continue
        entry = compare(name, ENGINE, precision, task, batches, expected, actual, config)
        if judge is not None and entry.status == "pass" and precision != "fp32":
            scores, short = judge(session)
            entry.metric.update(scores)
            if short:
                entry.status, entry.reason = "skip", f"measured, not served: {short}"
        log.info("parity %s on %s %s: %s (max abs %.2e, mean cosine %.6f) in %.1fs", name, ENGINE, precision,
                 entry.status, entry.max_abs_error, entry.mean_cosine, time.perf_counter() - start)
        entries.append(entry)
    return entries


def openvino_failure(error: BaseException, limit: int = 240) -> str:
    """One line from OpenVINO's multi-line error: its summary lines ("No conversion rule found for operations:
    com.microsoft.QAttention") where it has them, else the first line that is not a source location."""
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip()]
    summary = lines[lines.index("Summary:") + 1:] if "Summary:" in lines else []
    summary = [line for line in summary if not line.startswith("To facilitate")]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return ("; ".join(summary) or (useful[0] if useful else first_line(error)))[:limit]


def record(threads: int = 0) -> dict[str, Any]:
    """What the manifest says about OpenVINO on the building machine: version (None: absent), the settings each
    precision compiles with, and the CPU flags that allowed bf16 (or why it was not run)."""
    from graphs.core.openvino_sessions import settings

    found = version()
    flags = bf16_flags()
    result: dict[str, Any] = {"version": found, "engine": ENGINE}
    if found is None:
        return result | {"reason": missing_reason()}
    result["settings"] = {p: settings(hint(p), threads) for p in (["fp32", "bf16", "int8", INT8_BF16] if flags
                                                                   else ["fp32", "int8"])}
    result["bf16"] = ({"run": True, "cpu_flags": flags} if flags else
                      {"run": False, "reason": f"this CPU has none of {list(BF16_FLAGS)}"})
    return result

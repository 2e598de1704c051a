"""The export's OpenVINO side: ``model_qdq.onnx`` (an INT8 file OpenVINO runs on its INT8 kernels), parity of
every file OpenVINO reads, at each precision this CPU allows, and the latency of each (file, precision) that
passed, keyed ``"OpenVINO CPU <precision>"`` in the manifest's ``latency`` beside onnxruntime's providers (same
shapes, same runs, so the ratios between them are meaningful).

``model_qdq.onnx`` is the compacted, unfused ``model.onnx`` with every weight MatMul (Q, K, V, attention output,
FFN in and out; the graph's attention score and context MatMuls, which have no weight, stay float) as a standard
``QuantizeLinear -> DequantizeLinear -> MatMul`` pair (u8 activations with one static range each, s8 symmetric
per-channel weights), calibrated with the project's own recipe (SmoothQuant, GPTQ rounding, bias correction;
:mod:`calibration.fused` with ``op_types=("MatMul",)`` and no per-token scale, whose run-time
``DynamicQuantizeLinear`` OpenVINO's ONNX frontend cannot read) and the same accuracy search as
``model_quantized.onnx`` (judged by onnxruntime on the same held-out texts or gold examples). That is the form
OpenVINO's ONNX frontend maps to its INT8 kernels, as NNCF places quantizers for transformers (on MatMul inputs;
LayerNorm, Softmax and GELU stay float). The unfused graph is the source because OpenVINO decomposes onnxruntime's
fused ``Attention`` into float ops, which would leave the QKV projection, a third of each layer's weights, out of
INT8. Its parity rows (onnxruntime and OpenVINO, mean cosine >= ``int8_min_cosine``) decide whether it ships:
built where openvino is installed, and left out again, with a skip row giving the failed row's reason, where one
of its rows fails (an optional file does not make the artifact undeployable).

A reduced-precision OpenVINO run (bf16, int8, int8-bf16) that passed parity must also keep the task's decisions
on the accuracy search's held-out examples, by the search's own metric and bars (:func:`task_judge`); one that
does not is a skip row, measured and not served, so ``run`` never picks a faster variant that changes answers
(on an extractive-QA model bf16 passes a mean-cosine bar while moving spans).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from calibration.data import CalibrationDataReader
from calibration.metrics import failures, get_metric
from calibration.quantize import quantize_model
from calibration.search_core import summarize
from calibration.settings import QuantizationConfig
from exporter.latency import Feeds, measure_latency
from exporter.runtime.files import OPTIMIZED_FILE, QUANTIZED_FILE
from exporter.runtime.openvino_check import Judge, absent_entries, check_openvino, hint
from exporter.runtime.parity import Batch, ParityConfig, ParityEntry
from graphs.core.errors import QuantizationError
from graphs.core.openvino_sessions import ENGINE, missing_reason, open_compiled, version
from graphs.core.sessions import CPU, open_session

QDQ_FILE = "model_qdq.onnx"
QDQ_REFINE_SHARE = 0.5
"""The optional OpenVINO file's search refines for at most half the time it took before (the first file's: as
long again), so the whole export keeps its time bound with both files built; a few more of its MatMuls may stay
FP32 (docs/decisions/0010-openvino.md)."""


def build_qdq(source: Path, output: Path, reader: CalibrationDataReader, config: QuantizationConfig,
              sample_sha256: str, mode: str = "auto", validation: Sequence[Batch] | None = None,
              metric: Any = "embedding", spent_s: float = 0.0) -> dict[str, Any]:
    """Write ``model_qdq.onnx`` (see the module docstring) from the unfused graph `source` where openvino is
    installed (`mode` "auto"; "never" skips it), searched on `validation` by `metric` as
    :func:`calibration.quantize.quantize_model` does (None: no search); the manifest's record of it (``built``,
    and the quantization report or why not).

    The two searches share one ``--search-budget``: this one gets what ``model_quantized.onnx``'s search left
    (`spent_s` of it used), so the export's time bound holds with the optional file built. Where nothing is left,
    or this search cannot keep any node INT8 within the bars, the file is left out with the reason (an optional
    file does not fail the export)."""
    if mode == "never":
        return {"built": False, "reason": "not requested (--openvino-int8 never)"}
    if version() is None:
        return {"built": False, "reason": missing_reason()}
    left = config.search_budget_s - spent_s
    if validation is not None and left <= 0:
        return {"built": False, "reason": f"the accuracy search budget ({config.search_budget_s:g} s, shared with "
                f"{QUANTIZED_FILE}'s search) was spent; a larger --search-budget builds it"}
    recipe = dataclasses.replace(config, op_types=("MatMul",), per_token_ffn=False, graph="fused", format="QDQ",
                                 preset=f"{config.preset}+openvino-qdq", search_budget_s=max(left, 1e-3),
                                 search_engine="openvino", search_refine_share=QDQ_REFINE_SHARE)
    try:
        report = quantize_model(source, output, reader, recipe, sample_sha256=sample_sha256, validation=validation,
                                metric=metric)
    except QuantizationError as error:
        output.unlink(missing_ok=True)
        return {"built": False, "reason": f"left out: {error}"}
    return {"built": True, "source": source.name, **report.to_dict()}


def keep_qdq(built: Path, entries: list[ParityEntry], checked: list[tuple[str, str]], record: dict[str, Any]
             ) -> tuple[list[ParityEntry], list[tuple[str, str]]]:
    """(entries, checked) with ``model_qdq.onnx`` removed from the folder and its rows replaced by one skip row
    where any of its parity rows failed (`record`, the manifest's ``qdq_file``, says why); unchanged otherwise."""
    failed = [e for e in entries if e.file == QDQ_FILE and e.status == "fail"]
    if not failed:
        return entries, checked
    (built / QDQ_FILE).unlink()
    why = "; ".join(f"{e.provider} {e.precision}: {e.reason}" for e in failed)
    record.update(built=False, reason=f"left out: its parity failed ({why}); --openvino-int8 never skips building it")
    kept = [e for e in entries if e.file != QDQ_FILE]
    return kept + [ParityEntry(QDQ_FILE, CPU, "int8", "skip", reason=record["reason"])], [
        pair for pair in checked if pair[0] != QDQ_FILE]


def task_judge(reference: Path, validation: Sequence[Batch], metric: Any, max_accuracy_drop: float) -> Judge:
    """The task bar of an OpenVINO run at reduced precision: the accuracy search's `metric` on its `validation`
    batches (held-out texts, or the search part of the gold examples), against onnxruntime running the FP32
    graph `reference` (what the search measures the INT8 files against), with the search's bars at
    `max_accuracy_drop`. The reference runs once, at the first judgement."""
    metric = get_metric(metric)
    bars = metric.bars(max_accuracy_drop)
    reference_summaries: list[Any] = []

    def judge(session: Any) -> tuple[dict[str, float], str | None]:
        if not reference_summaries:
            reference_summaries.extend(summarize(open_session(reference), validation, metric))
        scores = metric.scores(reference_summaries, summarize(session, validation, metric))
        unmet = failures(scores, bars)
        examples = sum(len(next(iter(batch.values()))) for batch in validation)
        return ({f"held_out_{name}": round(scores[name], 6) for name in bars},
                f"{metric.name} on the accuracy search's {examples} held-out examples: {', '.join(unmet)}"
                if unmet else None)
    return judge


def openvino_parity(built: Path, checked: Sequence[tuple[str, str]], task: str, batches: Sequence[Batch],
                    expected: Sequence[Batch], config: ParityConfig,
                    search: tuple[Sequence[Batch], Any, float] | None = None) -> list[ParityEntry]:
    """OpenVINO parity rows of the `checked` (file, precision) pairs in folder `built` (one skip row without
    openvino); with `search` (the accuracy search's validation batches, metric and max accuracy drop) each passing
    reduced-precision row is also held to :func:`task_judge` against ``model_optimized.onnx``."""
    entries = absent_entries()
    judge = task_judge(built / OPTIMIZED_FILE, *search) if search is not None else None
    for name, precision in checked:
        entries += check_openvino(name, precision, task, batches, expected, config, built / name, judge=judge)
    return entries


def openvino_latency(built: Path, entries: Sequence[ParityEntry], feeds: dict[str, Feeds], length: int,
                     full: bool = False) -> dict[str, Any]:
    """``{"OpenVINO CPU <precision>": {"files": {name: percentiles per shape}, "settings": ..., ...}}`` for each
    (file, precision) whose OpenVINO parity row passed."""
    passed: dict[str, list[str]] = {}
    for entry in entries:
        if entry.provider == ENGINE and entry.status == "pass":
            passed.setdefault(entry.precision, []).append(entry.file)
    result: dict[str, Any] = {}
    for precision, names in passed.items():
        files, applied = {}, {}
        for name in names:
            session = open_compiled(built / name, hint(precision))
            applied = session.settings
            files[name] = measure_latency(built / name, ENGINE, feeds, session=session)
        result[f"{ENGINE} {precision}"] = {
            "files": files, "engine": "openvino", "precision": precision, "settings": applied,
            "sequence": length, "threads": os.cpu_count() or 1, "io_binding": False,
            "mode": "full" if full else "quick", "shapes": list(feeds)}
    return result

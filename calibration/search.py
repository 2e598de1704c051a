"""Accuracy-aware fallback: put the quantized nodes that hurt the task metric most back in FP32, one at a time.

Start from a fully quantized QDQ graph (every weight MatMul INT8, the fast end) and its FP32 source:

1. Run both on the held-out batches; the task metric (:mod:`calibration.metrics`) scores INT8 against FP32.
   If every bar holds, nothing falls back.
2. Rank: for each quantized node, a trial graph with only that node back in FP32 is run on the first
   ``ranking_batches`` batches; the node's *harm* is how much the relative error of the metric's summaries
   drops (a greedy leave-one-out trial, measured end to end, so error that compounds downstream counts).
3. Fall back: the most harmful node goes back to FP32, the task metric is re-measured on every held-out
   batch, and so on until every bar holds. Each step is recorded with its scores.

A fallback is graph surgery on the already calibrated graph, not a new calibration: the node reads the float
activation (the QuantizeLinear input) and the original float weight again, and QuantizeLinear /
DequantizeLinear nodes left without consumers are removed::

    x -> Q -> DQ -> MatMul <- DQ <- W_int8        x -> MatMul <- W_fp32

Memory: only the metric's per-batch summaries (pooled embeddings, logits) are kept, never hidden states, and
one onnxruntime session exists at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from calibration.metrics import TaskMetric, failures, relative_error
from exporter.errors import QuantizationError
from exporter.progress import bar

logger = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
PROTO_LIMIT = 1_900_000_000  # protobuf cannot serialize 2 GB; larger graphs go through a temporary file


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must be saved with external data: past protobuf's limit, or loaded without its external
    data (``load_external_data=False``)."""
    return model.ByteSize() > PROTO_LIMIT or any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


@dataclass
class FallbackStep:
    """One node put back in FP32: its harm from the ranking trial (None: not ranked before the time budget ran
    out), the task scores after the step, and why it went back."""

    node: str
    op_type: str
    harm: float | None
    scores: dict[str, float]
    reason: str = "most harmful node left"


@dataclass
class SearchReport:
    """What :func:`search_fallback` measured and decided; ``to_dict()`` goes into the manifest.

    ``harm`` maps every ranked quantized node to the drop in relative error when it alone is FP32 (empty when the
    fully quantized graph already met the bars and no ranking was needed). ``budget_reached``: None, or the phase
    ("ranking" / "falling back") in which ``budget_s`` ran out.
    """

    metric: str
    max_accuracy_drop: float
    bars: dict[str, float]
    scores_before: dict[str, float]
    scores_after: dict[str, float]
    fallbacks: list[FallbackStep] = field(default_factory=list)
    harm: dict[str, float] = field(default_factory=dict)
    validation_batches: int = 0
    validation_examples: int = 0
    ranking_batches: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    budget_s: float | None = None
    budget_reached: str | None = None

    @property
    def fallback_nodes(self) -> list[str]:
        return [step.node for step in self.fallbacks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"fallback_nodes": self.fallback_nodes}


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of compute nodes that read a DequantizeLinear output (the nodes onnxruntime runs in INT8)."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in _QDQ_OPS and any(name in dequantized for name in node.input)
    ]


def fall_back(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, nodes: Iterable[str]
) -> onnx.ModelProto:
    """A copy of ``quantized`` in which ``nodes`` read their FP32 inputs again (see module doc).

    Node names are matched between the two graphs (onnxruntime's QDQ quantizer keeps them); float weights
    are copied from ``float_model``. Raises ``QuantizationError`` for a name found in only one graph.
    """
    model = copy.deepcopy(quantized)
    float_inputs = {node.name: list(node.input) for node in float_model.graph.node}
    float_weights = {init.name: init for init in float_model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    present = {init.name for init in model.graph.initializer}
    for name in nodes:
        if name not in by_name or name not in float_inputs:
            raise QuantizationError(
                f"cannot fall back node {name!r}: not in both the FP32 and the INT8 graph; "
                f"pass names from calibration.search.quantized_nodes()"
            )
        node = by_name[name]
        for index, original in enumerate(float_inputs[name]):
            if index < len(node.input) and node.input[index] != original:
                node.input[index] = original
                if original in float_weights and original not in present:
                    model.graph.initializer.append(float_weights[original])
                    present.add(original)
    _remove_dead_qdq(model)
    return model


def _remove_dead_qdq(model: onnx.ModelProto) -> None:
    """Drop Q/DQ nodes whose outputs nothing reads, then initializers nothing reads (to a fixed point)."""
    graph_outputs = {output.name for output in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [
            node
            for node in model.graph.node
            if node.op_type in _QDQ_OPS and not any(out in used for out in node.output)
        ]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers that no node reads and that are not graph outputs."""
    used = {name for node in model.graph.node for name in node.input} | {output.name for output in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def cpu_session(model: onnx.ModelProto, work: Path) -> ort.InferenceSession:
    """A quiet CPU onnxruntime session on ``model``; graphs past protobuf's 2 GB limit go through ``work``."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if model.ByteSize() > PROTO_LIMIT:
        path = work / "candidate.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def evaluate(model: onnx.ModelProto, batches: Sequence[Batch], metric: TaskMetric) -> list[np.ndarray]:
    """Run ``model`` on ``batches`` with onnxruntime (CPU) and return the metric's summary of each batch.

    Feeds the graph does not declare (e.g. ``token_type_ids`` for a model without it) are dropped.
    """
    with tempfile.TemporaryDirectory(prefix="export-model-search-") as work:
        session = cpu_session(model, Path(work))
        names = {graph_input.name for graph_input in session.get_inputs()}
        summaries = []
        for feeds in batches:
            inputs = {name: value for name, value in feeds.items() if name in names}
            summaries.append(metric.summarize(session.run(None, inputs), feeds))
    return summaries


def search_fallback(
    float_model: onnx.ModelProto,
    quantized: onnx.ModelProto,
    validation: Sequence[Batch],
    metric: TaskMetric,
    max_accuracy_drop: float = 0.01,
    ranking_batches: int = 8,
    build: Callable[[Sequence[str]], onnx.ModelProto] | None = None,
    candidates: Sequence[str] | None = None,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[onnx.ModelProto, SearchReport]:
    """Fall back the most harmful quantized nodes of ``quantized`` to FP32 until ``metric`` meets its bars.

    Args:
        float_model: the FP32 graph ``quantized`` was made from (same node names).
        quantized: the QDQ graph with every candidate node quantized.
        validation: held-out input batches (never the calibration texts), tokenized as the model sees them.
        metric: task metric; its ``bars(max_accuracy_drop)`` are the criterion.
        max_accuracy_drop: allowed drop as a fraction (default 0.01 = 1%).
        ranking_batches: batches used to rank node harm (default 8; the first ones of ``validation``).
        build: for graphs that are not onnxruntime QDQ graphs (the fused route of
            :mod:`calibration.fused`): ``build(nodes)`` returns the graph with exactly ``nodes`` quantized.
            Default None: QDQ surgery (:func:`fall_back`) on ``quantized``.
        candidates: the quantizable node names when ``build`` is given (default: ``quantized_nodes``).
        budget_s: wall-clock seconds the search may take (None: no limit). Ranking stops when they run out, and
            the unranked nodes go back to FP32 together (their harm unknown); in the fallback steps, every node
            not yet tried goes back at once. One evaluation records the scores of that graph.
        clock: the time source (tests pass a fake one).

    Returns:
        The graph that meets the bars and a :class:`SearchReport`.

    Raises:
        QuantizationError: no validation batch, or the bars still fail with every node back in FP32 (then
            the metric or the batches are wrong, not the quantization); the message lists each step.
    """
    if not validation:
        raise QuantizationError("accuracy search needs at least one held-out batch; pass validation batches")
    start = clock()

    def out_of_time() -> bool:
        return budget_s is not None and clock() - start > budget_s

    bars = metric.bars(max_accuracy_drop)
    reference = evaluate(float_model, validation, metric)
    current = evaluate(quantized, validation, metric)
    before = metric.scores(reference, current)
    report = SearchReport(
        metric=metric.name,
        max_accuracy_drop=max_accuracy_drop,
        bars=bars,
        scores_before=before,
        scores_after=before,
        validation_batches=len(validation),
        validation_examples=sum(len(next(iter(batch.values()))) for batch in validation),
        evaluations=2,
        budget_s=budget_s,
    )
    logger.info("accuracy search (%s, max drop %.3f): INT8 scores %s", metric.name, max_accuracy_drop, _fmt(before))
    if not failures(before, bars):
        report.seconds = round(clock() - start, 3)
        logger.info("every bar met with all nodes quantized; nothing falls back")
        return quantized, report

    ranking = list(validation[: max(1, ranking_batches)])
    report.ranking_batches = len(ranking)
    ranking_reference = reference[: len(ranking)]
    base_error = relative_error(ranking_reference, current[: len(ranking)])
    candidates = list(candidates) if candidates is not None else quantized_nodes(quantized)

    def without(fallen: Sequence[str]) -> onnx.ModelProto:
        if build is None:
            return fall_back(quantized, float_model, fallen)
        back = set(fallen)
        return build([name for name in candidates if name not in back])

    harm: dict[str, float] = {}
    for name in bar(candidates, desc="ranking INT8 nodes"):
        if out_of_time():
            report.budget_reached = "ranking"
            break
        trial = evaluate(without([name]), ranking, metric)
        harm[name] = base_error - relative_error(ranking_reference, trial)
    report.evaluations += len(harm)
    report.harm = dict(sorted(harm.items(), key=lambda item: -item[1]))
    op_types = {node.name: node.op_type for node in quantized.graph.node}
    if report.budget_reached:
        logger.warning("accuracy search: the %g s budget ran out after ranking %d of %d nodes; the other %d go "
                       "back to FP32", budget_s, len(harm), len(candidates), len(candidates) - len(harm))
    # Nodes whose harm is unknown go back first, together: the safe side of a search that ran out of time.
    unranked = [name for name in candidates if name not in harm]
    steps: list[list[str]] = ([unranked] if unranked else []) + [[name] for name in report.harm]

    fallen: list[str] = []
    model, scores = quantized, before
    for index, group in enumerate(bar(steps, desc="falling back to FP32")):
        reason = "not ranked: the search's time budget ran out" if group is unranked else "most harmful node left"
        if index > 0 and out_of_time():  # every node not yet tried goes back at once
            report.budget_reached = report.budget_reached or "falling back"
            group = [name for later in steps[index:] for name in later]
            reason = "not tried: the search's time budget ran out"
        fallen += group
        model = without(fallen)
        scores = metric.scores(reference, evaluate(model, validation, metric))
        report.evaluations += 1
        for name in group:
            known = harm.get(name)
            report.fallbacks.append(FallbackStep(name, op_types[name], None if known is None else round(known, 8),
                                                 scores, reason))
        logger.info("fell back %s (%s): %s", ", ".join(group[:3]) + (" ..." if len(group) > 3 else ""), reason,
                    _fmt(scores))
        if not failures(scores, bars) or reason.startswith("not tried"):
            break
    if failures(scores, bars):
        steps = "; ".join(f"{step.node}: {_fmt(step.scores)}" for step in report.fallbacks)
        raise QuantizationError(
            f"{metric.name} bars {bars} not met even with all {len(fallen)} quantized nodes back in FP32 "
            f"({steps}); check the metric and the held-out batches"
        )
    report.scores_after = scores
    report.seconds = round(clock() - start, 3)
    logger.info(
        "accuracy search done: %d of %d nodes back in FP32, %d evaluations, %.1f s",
        len(fallen), len(candidates), report.evaluations, report.seconds,
    )
    return model, report


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())

"""Accuracy-aware fallback: put the quantized nodes that hurt the task metric most back in FP32.

Start from a fully quantized graph (every target INT8, the fast end) and its FP32 source:

1. Run both on the held-out batches; the task metric (:mod:`calibration.metrics`) scores INT8 against FP32.
   If every bar holds, nothing falls back.
2. Rank the quantized nodes by harm. Two strategies (``strategy``):

   - ``paired`` (default): ONE run of a probe graph on the first ``ranking_batches`` batches. The probe is the
     FP32 graph with, beside every quantized node, its INT8 twin reading the same float input (the pairing of
     onnxruntime.quantization's qdq_loss_debug, but each node's own error, not the error accumulated upstream);
     a node's harm is the relative squared error of its INT8 output against its FP32 output over the real
     tokens. Cost: one evaluation, whatever the number of nodes.
   - ``leave-one-out``: for each quantized node, a trial graph with only that node back in FP32 is run on the
     ranking batches; its harm is how much the relative error of the metric's summaries drops (measured end to
     end). Cost: one evaluation per node.
3. Fall back:

   - ``paired``: the shortest prefix of the ranking that meets every bar on every held-out batch, found by
     doubling the prefix (1, 2, 4, ...) until the bars hold, then bisecting between the last failing and the
     first passing length: about 2 log2(k) evaluations for a prefix of k nodes, where putting nodes back one at
     a time costs k. A node's own error does not say how much the task metric needs it back, so the prefix is
     then refined: groups from its least harmful end (half the prefix, then quarters, ... single nodes) go back
     to INT8, each kept INT8 only if every bar still holds (the complement tests of delta debugging). The
     refinement takes at most as long as the search before it (``REFINE_SHARE``) and stops at the budget;
     whatever it has not tried stays FP32.
   - ``leave-one-out``: the most harmful node goes back to FP32, the task metric is re-measured on every
     held-out batch, and so on until every bar holds.

   Every trial is recorded with its scores.

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
from typing import Any, NoReturn

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibration.metrics import TaskMetric, failures, relative_error
from graphs.core.errors import QuantizationError
from graphs.core.progress import bar
from graphs.core.sessions import open_session

logger = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
STRATEGIES = ("paired", "leave-one-out")
"""How the search ranks and falls back (see module doc)."""
MASK_INPUT = "attention_mask"
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

    ``harm`` maps every ranked quantized node to its harm (``leave-one-out``: the drop in relative error when it
    alone is FP32; ``paired``: its own INT8 output's relative squared error), empty when the fully quantized graph
    already met the bars and no ranking was needed. ``budget_reached``: None, or the phase ("ranking" /
    "falling back" / ``paired``: "refining") in which ``budget_s`` ran out.
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
    strategy: str = "leave-one-out"
    trials: list[dict[str, Any]] = field(default_factory=list)
    """``paired``: each fallback trial, ``{"fallen": k, "phase": ..., "scores": ..., "met": bool}`` in the order
    measured: k nodes back in FP32; phase "prefix" (the first k of the ranking), "refine" (a subset of the
    passing prefix) or "all back" (the budget ran out before a passing prefix)."""

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


SERIALIZE_LIMIT = 64 << 20
"""Graphs larger than this (64 MiB) reach onnxruntime through a file in the work folder rather than as bytes, so a
serialized copy does not sit in memory beside the session while it is built (BERT-base and up)."""


def cpu_session(model: onnx.ModelProto, work: Path) -> Any:
    """A quiet CPU onnxruntime session on ``model``; graphs past protobuf's 2 GB limit go through ``work`` with
    external data, graphs past :data:`SERIALIZE_LIMIT` through a file in ``work``."""
    size = model.ByteSize()
    if size > SERIALIZE_LIMIT:
        path = work / "candidate.onnx"
        onnx.save_model(model, str(path), save_as_external_data=size > PROTO_LIMIT)
        return open_session(path)
    return open_session(model.SerializeToString())


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


def _tensors(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return ({i.name for i in graph.input} | {i.name for i in graph.initializer}
            | {out for node in graph.node for out in node.output})


def probe_graph(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str],
    shifts: Mapping[str, np.ndarray] | None = None, inplace: bool = False,
) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """The FP32 graph with each of ``nodes``' INT8 form from ``quantized`` beside it, reading the same float input.

    ``float_model`` and ``quantized`` share tensor and node names (the FP32 twin and the INT8 graph of one plan).
    For each node, the INT8 *island* is what ``quantized`` computes the node's first output from: the nodes reached
    backwards from its producer until tensors that ``float_model`` also has (the float activation, shared
    biases, the mask). The island is copied with every tensor it makes renamed, so it reads the FP32 graph's
    activation and its output sits beside the FP32 output. ``shifts[node]`` (bias correction: what the INT8
    graph adds to the bias after the node) is added to the INT8 output. The probe's outputs are, per node,
    the squared error and the squared FP32 value summed over the last axis (``[batch, seq]`` for token outputs),
    so a run returns a few numbers per token, not activations. Returns the probe and ``{node: (error output,
    reference output)}``. ``inplace``: the probe is ``float_model`` itself, changed (no copy of the weights).
    """
    known = _tensors(float_model)
    probe = float_model if inplace else copy.deepcopy(float_model)
    producer = {out: node for node in quantized.graph.node for out in node.output}
    position = {id(node): index for index, node in enumerate(quantized.graph.node)}
    q_inits = {init.name: init for init in quantized.graph.initializer}
    float_nodes = {node.name: node for node in float_model.graph.node}
    opset = next((o.version for o in probe.opset_import if o.domain in ("", "ai.onnx")), 17)
    copied: set[str] = set()
    outputs: dict[str, tuple[str, str]] = {}
    del probe.graph.output[:]
    for index, name in enumerate(nodes):
        if name not in float_nodes:
            raise QuantizationError(f"cannot probe node {name!r}: not in the FP32 graph")
        target = float_nodes[name].output[0]
        if target not in producer:
            raise QuantizationError(f"cannot probe node {name!r}: the INT8 graph does not compute {target!r}")
        island, stack, seen = [], [producer[target]], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            island.append(node)
            stack += [producer[i] for i in node.input if i and i not in known and i in producer]
        tag = f"__probe{index}"
        made = {out for node in island for out in node.output}
        rename = {tensor: tensor + tag for tensor in made}
        for node in sorted(island, key=lambda n: position[id(n)]):
            twin = copy.deepcopy(node)
            twin.name = node.name + tag
            for slot, tensor in enumerate(twin.input):
                if tensor in rename:
                    twin.input[slot] = rename[tensor]
                elif tensor and tensor not in known and tensor in q_inits and tensor not in copied:
                    probe.graph.initializer.append(q_inits[tensor])
                    copied.add(tensor)
            for slot, tensor in enumerate(twin.output):
                twin.output[slot] = rename.get(tensor, tensor + tag)
            probe.graph.node.append(twin)
        estimate = rename[target]
        if shifts and name in shifts:
            shift = f"{name}{tag}_shift"
            probe.graph.initializer.append(numpy_helper.from_array(np.asarray(shifts[name], np.float32), shift))
            probe.graph.node.append(helper.make_node("Add", [estimate, shift], [estimate + "_shifted"]))
            estimate += "_shifted"
        probe.graph.node.append(helper.make_node("Sub", [estimate, target], [f"{name}{tag}_difference"]))
        pair = (f"{name}{tag}_error", f"{name}{tag}_reference")
        for source, out in ((f"{name}{tag}_difference", pair[0]), (target, pair[1])):
            if opset >= 18:
                axes = f"{out}_axes"
                probe.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                probe.graph.node.append(helper.make_node("ReduceSumSquare", [source, axes], [out], keepdims=0))
            else:
                probe.graph.node.append(helper.make_node("ReduceSumSquare", [source], [out], axes=[-1], keepdims=0))
            probe.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        outputs[name] = pair
    for opset_id in quantized.opset_import:
        if opset_id.domain and not any(o.domain == opset_id.domain for o in probe.opset_import):
            probe.opset_import.append(opset_id)
    return probe, outputs


def paired_errors(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str], batches: Sequence[Batch],
    shifts: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Each node's INT8 output error against its FP32 output on the same float input, from one run of
    :func:`probe_graph` over ``batches``: ``sum |int8 - fp32|^2 / sum |fp32|^2`` over the real tokens (those
    the ``attention_mask`` feed marks; every row where there is none or the output is not per token).
    ``float_model`` is changed into the probe (pass a copy you do not need again)."""
    probe, outputs = probe_graph(float_model, quantized, nodes, shifts, inplace=True)
    del float_model
    error = dict.fromkeys(nodes, 0.0)
    reference = dict.fromkeys(nodes, 0.0)
    with tempfile.TemporaryDirectory(prefix="export-model-probe-") as work:
        session = cpu_session(probe, Path(work))
        del probe
        names = {graph_input.name for graph_input in session.get_inputs()}
        order = [output.name for output in session.get_outputs()]
        for feeds in batches:
            values = dict(zip(order, session.run(None, {k: v for k, v in feeds.items() if k in names}), strict=True))
            mask = feeds.get(MASK_INPUT)
            for name, (err, ref) in outputs.items():
                e, r = values[err], values[ref]
                weight = mask.astype(np.float64) if mask is not None and mask.shape == e.shape else 1.0
                error[name] += float(np.sum(e * weight))
                reference[name] += float(np.sum(r * weight))
    return {name: error[name] / max(reference[name], 1e-30) for name in nodes}


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
    strategy: str = "paired",
    shifts: Mapping[str, np.ndarray] | None = None,
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
        strategy: ``paired`` (default: one probe run ranks, the shortest passing prefix of the ranking goes back)
            or ``leave-one-out`` (one trial per node ranks, nodes go back one at a time); see module doc.
        shifts: ``paired`` only: per node, what the INT8 graph adds after it (bias correction), added to the
            node's INT8 output in the probe.

    Returns:
        The graph that meets the bars and a :class:`SearchReport`.

    Raises:
        QuantizationError: no validation batch, or the bars still fail with every node back in FP32 (then
            the metric or the batches are wrong, not the quantization); the message lists each step.
    """
    if not validation:
        raise QuantizationError("accuracy search needs at least one held-out batch; pass validation batches")
    if strategy not in STRATEGIES:
        raise QuantizationError(f"search strategy {strategy!r} not in {list(STRATEGIES)}")
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
        strategy=strategy,
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

    if strategy == "paired":
        return _paired_fallback(report, reference, validation, ranking, metric, candidates, without, quantized,
                                shifts, clock, start, out_of_time)

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
        _unmet(metric, bars, len(fallen), "; ".join(f"{step.node}: {_fmt(step.scores)}" for step in report.fallbacks))
    return _done(report, model, scores, len(candidates), clock() - start)


def _unmet(metric: TaskMetric, bars: Mapping[str, float], fallen: int, steps: str) -> NoReturn:
    raise QuantizationError(
        f"{metric.name} bars {dict(bars)} not met even with all {fallen} quantized nodes back in FP32 "
        f"({steps}); check the metric and the held-out batches"
    )


def _done(report: SearchReport, model: onnx.ModelProto, scores: dict[str, float], candidates: int,
          seconds: float) -> tuple[onnx.ModelProto, SearchReport]:
    report.scores_after = scores
    report.seconds = round(seconds, 3)
    logger.info("accuracy search done (%s): %d of %d nodes back in FP32, %d evaluations, %.1f s", report.strategy,
                len(report.fallbacks), candidates, report.evaluations, report.seconds)
    return model, report


def _paired_fallback(
    report: SearchReport, reference: list[np.ndarray], validation: Sequence[Batch], ranking: Sequence[Batch],
    metric: TaskMetric, candidates: list[str], without: Callable[[Sequence[str]], onnx.ModelProto],
    quantized: onnx.ModelProto, shifts: Mapping[str, np.ndarray] | None, clock: Callable[[], float],
    start: float, out_of_time: Callable[[], bool],
) -> tuple[onnx.ModelProto, SearchReport]:
    """The ``paired`` strategy (module doc): rank by one probe run, find the shortest passing prefix, then return
    what of that prefix the bars do not need to INT8."""
    op_types = {node.name: node.op_type for node in quantized.graph.node}
    bars, count = report.bars, len(candidates)
    measured: dict[frozenset[str], dict[str, float]] = {}
    measured[frozenset()] = report.scores_before  # the all-INT8 graph, measured by the caller
    best: list[Any] = []  # [nodes back, graph, scores] of the smallest passing set: each graph is a whole model

    def trial(back: Sequence[str], phase: str) -> bool:
        key = frozenset(back)
        if key in measured:  # e.g. a refinement set that is also a prefix already measured
            return not failures(measured[key], bars)
        model = without(back)
        scores = metric.scores(reference, evaluate(model, validation, metric))
        report.evaluations += 1
        met = not failures(scores, bars)
        measured[key] = scores
        if (met or len(back) == count) and (not best or len(back) <= len(best[0])):
            best[:] = [list(back), model, scores]
        report.trials.append({"fallen": len(back), "phase": phase, "scores": scores, "met": met})
        logger.info("%s: %d of %d nodes back in FP32: %s", phase, len(back), count, _fmt(scores))
        shown.update(1)
        return met

    order = list(candidates)
    passing: int | None = None
    refined = 0
    with bar(total=None, desc="accuracy search") as shown:
        if out_of_time():
            report.budget_reached = "ranking"
        else:
            harm = paired_errors(without(candidates), quantized, candidates, ranking, shifts)
            report.evaluations += 1
            shown.update(1)
            report.harm = {name: round(value, 10) for name, value in sorted(harm.items(), key=lambda item: -item[1])}
            order = list(report.harm)
            failing, length = 0, 1  # doubling, then bisection between a failing and a passing prefix length
            while passing is None:
                if out_of_time():
                    report.budget_reached = "falling back"
                    break
                if trial(order[:length], "prefix"):
                    passing = length
                elif length == count:
                    break
                else:
                    failing, length = length, min(2 * length, count)
            while passing is not None and passing - failing > 1:
                if out_of_time():
                    report.budget_reached = "falling back"
                    break
                middle = (failing + passing) // 2
                if trial(order[:middle], "prefix"):
                    passing = middle
                else:
                    failing = middle
            if passing is not None and not report.budget_reached:
                refined = _refine(best, trial, clock, start, out_of_time)
                report.budget_reached = "refining" if out_of_time() else None
    if passing is None and report.budget_reached:  # out of time with no passing prefix measured: all back
        logger.warning("accuracy search: the %g s budget ran out (%s) before a passing set was found; all %d "
                       "nodes go back to FP32", report.budget_s, report.budget_reached, count)
        trial(order, "all back")
        reason = ("not ranked: the search's time budget ran out" if report.budget_reached == "ranking"
                  else "not tried: the search's time budget ran out")
    elif passing is None:
        _unmet(metric, bars, count, "; ".join(f"{t['fallen']} back: {_fmt(t['scores'])}" for t in report.trials))
    else:
        reason = (f"needed by the bars: of the shortest passing prefix ({passing}) of the paired-error ranking, "
                  f"{refined} went back to INT8") + (f" before the search's time budget ran out ({report.budget_reached})"
                                                    if report.budget_reached else "")
    back, model, scores = best
    if failures(scores, bars):
        _unmet(metric, bars, len(back), "; ".join(f"{t['fallen']} back: {_fmt(t['scores'])}" for t in report.trials))
    for name in back:
        known = report.harm.get(name)
        report.fallbacks.append(FallbackStep(name, op_types[name], known, scores, reason))
    return _done(report, model, scores, count, clock() - start)


REFINE_SHARE = 1.0
"""The refinement may take at most this share of what the search took before it (1.0: it at most doubles the
search's time), and never past the budget."""


def _refine(best: list[Any], trial: Callable[[Sequence[str], str], bool], clock: Callable[[], float], start: float,
            out_of_time: Callable[[], bool]) -> int:
    """Return to INT8 what the passing set ``best[0]`` (most harmful first) does not need: groups from its least
    harmful end, halving in size (the complement tests of delta debugging), each kept only if every bar still holds
    on every held-out batch. Returns how many nodes went back to INT8; ``best`` is updated by ``trial``."""
    prefix = len(best[0])
    now = clock()
    deadline = now + REFINE_SHARE * (now - start)
    size = prefix // 2
    while size >= 1:
        end = len(best[0])
        while end > 0:
            if out_of_time() or clock() > deadline:
                return prefix - len(best[0])
            kept = best[0]
            group = kept[max(0, end - size) : end]
            rest = [name for name in kept if name not in group]
            trial(rest, "refine")  # passing: best is now rest; either way the next group ends where this one began
            end -= len(group)
        size //= 2
    return prefix - len(best[0])


def _fmt(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())

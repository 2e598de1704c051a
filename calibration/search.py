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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np
import onnx

from calibration.metrics import TaskMetric, failures, relative_error
from calibration.probe import paired_errors
from calibration.search_core import (  # noqa: F401  (the search's public names, in one place)
    STRATEGIES,
    Batch,
    FallbackStep,
    SearchReport,
    cpu_session,
    drop_unused_initializers,
    evaluate,
    fall_back,
    is_large,
    quantized_nodes,
)
from graphs.core.errors import QuantizationError
from graphs.core.progress import bar

logger = logging.getLogger(__name__)

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
    engine: str = "onnxruntime",
    refine_share: float | None = None,
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
        engine: what runs the candidate graphs (``onnxruntime``, or ``openvino`` at the f32 hint: a file made
            for OpenVINO is judged where it will run); the FP32 reference and the probe run on onnxruntime.
        refine_share: ``paired`` only: the refinement may take at most this share of what the search took before
            it (default :data:`REFINE_SHARE`), and never past the budget.

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
    current = evaluate(quantized, validation, metric, engine)
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
        engine=engine,
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
                                shifts, clock, start, out_of_time, engine, refine_share)

    harm: dict[str, float] = {}
    for name in bar(candidates, desc="ranking INT8 nodes"):
        if out_of_time():
            report.budget_reached = "ranking"
            break
        trial = evaluate(without([name]), ranking, metric, engine)
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
        scores = metric.scores(reference, evaluate(model, validation, metric, engine))
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
    start: float, out_of_time: Callable[[], bool], engine: str = "onnxruntime", refine_share: float | None = None,
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
        scores = metric.scores(reference, evaluate(model, validation, metric, engine))
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
                refined = _refine(best, trial, clock, start, out_of_time, refine_share)
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
            out_of_time: Callable[[], bool], share: float | None = None) -> int:
    """Return to INT8 what the passing set ``best[0]`` (most harmful first) does not need: groups from its least
    harmful end, halving in size (the complement tests of delta debugging), each kept only if every bar still holds
    on every held-out batch, within `share` (default :data:`REFINE_SHARE`) of the time the search took before it.
    Returns how many nodes went back to INT8; ``best`` is updated by ``trial``."""
    prefix = len(best[0])
    now = clock()
    deadline = now + (REFINE_SHARE if share is None else share) * (now - start)
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

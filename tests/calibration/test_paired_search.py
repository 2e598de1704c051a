"""The paired search (calibration.search, strategy "paired"): its probe measures each node's own INT8 error exactly
as a graph with only that node INT8 computes it, its fallback is the shortest passing prefix of that ranking, found
in a few evaluations, and it stops on a time budget with every node back and the reason recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, sample_texts
from calibration.fused import FusedPlan, plan_fused
from calibration.metrics import failures
from calibration.probe import paired_errors, probe_graph
from calibration.search import evaluate, search_fallback
from graphs.core.errors import QuantizationError
from graphs.fusion import FusionConfig, GraphPlan, fuse_graph
from tests.calibration.conftest import tokenize
from tests.calibration.test_search import CosineMetric, _Clock


@pytest.fixture(scope="module")
def fused_plan(sensitive_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, FusedPlan]:
    out = tmp_path_factory.mktemp("paired") / "model_optimized.onnx"
    fuse_graph(sensitive_bert, out, GraphPlan((4, 4), 64, "bert"), FusionConfig())
    model = onnx.load(str(out))
    calibration, _ = split_texts(builtin_texts())
    sample, _ = sample_texts(calibration, 16, 0)
    plan = plan_fused(model, TextCalibrationReader(sample, tokenize, 8), ("MatMul", "Attention"), (), "minmax", None,
                      per_token_ffn=True, bias_correction=True, weight_rounding="gptq")
    return model, plan


@pytest.fixture(scope="module")
def validation() -> list[dict[str, np.ndarray]]:
    heldout = split_texts(builtin_texts())[1]
    return [tokenize(heldout[i : i + 16]) for i in range(0, 96, 16)]


def _node_output(model: onnx.ModelProto, node: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of the node named ``node`` in ``model`` (exposed as a graph output)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    tensor = next(n.output[0] for n in model.graph.node if n.name == node)
    if any(n.name == f"{node}_rescale" for n in model.graph.node):  # per-token: the output after the rescale
        tensor = next(n.output[0] for n in model.graph.node if n.name == f"{node}_rescale")
    model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run([tensor], {k: v for k, v in feeds.items() if k in names})[0]


def _shifts(plan: FusedPlan) -> dict[str, np.ndarray]:
    return {name: shift for name, (reader, _, shift) in plan.corrections.items() if reader != name}


def test_the_probe_measures_what_a_graph_with_only_that_node_int8_computes(
    fused_plan: tuple[onnx.ModelProto, FusedPlan], validation: list[dict[str, np.ndarray]]
) -> None:
    """For every target (QAttention, static and per-token MatMulIntegerToFloat, with bias corrections), the probe's
    error equals the relative squared error, over real tokens, of the node's output in build([node]) (the only
    INT8 node, so it reads the float activation) against build([]): one run gives what one run per node gives."""
    _, plan = fused_plan
    names = [target.name for target in plan.targets]
    assert {t.op_type for t in plan.targets} == {"Attention", "MatMul"} and any(p.per_token for p in plan.plans.values())
    shifts = _shifts(plan)
    assert shifts, "bias corrections of MatMuls must be part of the check"
    float_twin, quantized = plan.build([]), plan.build(names)
    measured = paired_errors(plan.build([]), quantized, names, validation[:2], shifts)
    for name in names:
        error = reference = 0.0
        single = plan.build([name])
        for feeds in validation[:2]:
            exact = _node_output(float_twin, name, feeds).astype(np.float64)
            int8 = _node_output(single, name, feeds).astype(np.float64) + shifts.get(name, 0.0)
            mask = feeds["attention_mask"][..., None]
            error += float((((int8 - exact) ** 2) * mask).sum())
            reference += float(((exact**2) * mask).sum())
        assert measured[name] == pytest.approx(error / reference, rel=1e-3), name
        assert measured[name] > 0.0
    # Distinct nodes get distinct errors (the islands are not mixed up)
    assert len({round(value, 12) for value in measured.values()}) == len(names)


def test_the_probe_of_a_node_missing_from_the_fp32_graph_is_refused(
    fused_plan: tuple[onnx.ModelProto, FusedPlan],
) -> None:
    _, plan = fused_plan
    with pytest.raises(QuantizationError, match="not in the FP32 graph"):
        probe_graph(plan.build([]), plan.build([plan.targets[0].name]), ["no-such-node"])


def test_paired_search_falls_back_a_refined_passing_prefix_in_few_evaluations(
    fused_plan: tuple[onnx.ModelProto, FusedPlan], validation: list[dict[str, np.ndarray]]
) -> None:
    model, plan = fused_plan
    names = [target.name for target in plan.targets]
    metric = CosineMetric()
    reference = evaluate(model, validation, metric)
    before = metric.scores(reference, evaluate(plan.build(names), validation, metric))["mean_cosine"]
    drop = (1.0 - before) / 4  # a bar a quarter of the INT8 graph's error: several nodes must go back
    result, report = search_fallback(model, plan.build(names), validation, metric, drop, 2, build=plan.build,
                                     candidates=names, shifts=_shifts(plan))
    assert report.strategy == "paired"
    back = report.fallback_nodes
    assert 1 <= len(back) < len(names)
    order = list(report.harm)
    assert sorted(report.harm.values(), reverse=True) == list(report.harm.values())
    assert not failures(report.scores_after, report.bars)
    # Doubling then bisection over the ranking's prefixes: at most 2 log2(n) + 1 trials, the shortest passing one
    # has a failing prefix one node shorter, and what goes back is a subset of it, in ranking order.
    prefixes = {trial["fallen"]: trial["met"] for trial in report.trials if trial["phase"] == "prefix"}
    assert [t["fallen"] for t in report.trials][0] == 1 and len(prefixes) <= 2 * int(np.ceil(np.log2(len(names)))) + 1
    shortest = min(length for length, met in prefixes.items() if met)
    assert prefixes.get(shortest - 1, shortest == 1) is False or shortest == 1
    assert back == [name for name in order[:shortest] if name in back]
    # Every refinement trial is a subset of the prefix; the result is the smallest passing set measured.
    refine = [trial for trial in report.trials if trial["phase"] == "refine"]
    assert all(trial["fallen"] < shortest for trial in refine)
    assert len(back) == min(trial["fallen"] for trial in report.trials if trial["met"])
    assert (len(back) < shortest) == any(trial["met"] for trial in refine)
    assert report.evaluations == 3 + len(report.trials)  # FP32, all INT8, the probe, the trials
    # The written graph meets the bar when measured again; with its least harmful node INT8 again it does not
    # (the refinement tried that set last, unless the time share ran out first).
    assert not failures(metric.scores(reference, evaluate(result, validation, metric)), report.bars)
    shorter = [name for name in names if name not in back[:-1]]
    assert failures(metric.scores(reference, evaluate(plan.build(shorter), validation, metric)), report.bars)

    _, leave_one_out = search_fallback(model, plan.build(names), validation, metric, drop, 2, build=plan.build,
                                       candidates=names, strategy="leave-one-out")
    assert report.evaluations < leave_one_out.evaluations
    assert len(back) <= len(leave_one_out.fallback_nodes) + 1


@pytest.mark.parametrize(("needed", "prefix"), [({"n6"}, 8), ({"n1", "n5"}, 8), ({"n0", "n1", "n2"}, 3),
                                                  ({"n3"}, 5)])
def test_the_refinement_returns_to_int8_every_node_the_bars_do_not_need(needed: set[str], prefix: int) -> None:
    """A fake metric that passes exactly when every ``needed`` node is back: from a passing prefix the
    refinement ends at exactly the needed nodes, in ranking order, every set it tries a subset of the best so far
    (a set met again is answered from the search's cache there, as here)."""
    from calibration.search import _refine

    order = [f"n{i}" for i in range(prefix)]
    best: list = [order, "graph", {}]
    seen: list[frozenset[str]] = []

    def trial(back: list[str], phase: str) -> bool:
        assert phase == "refine" and set(back) < set(best[0])
        if frozenset(back) not in seen:
            seen.append(frozenset(back))
        met = needed <= set(back)
        if met:
            best[:] = [list(back), "graph", {}]
        return met

    returned = _refine(best, trial, _Clock(0.001), -1000.0, lambda: False)  # time to spare
    assert best[0] == [name for name in order if name in needed]
    assert returned == prefix - len(needed)
    assert len(seen) <= 2 * prefix


def test_the_refinement_stops_at_its_share_of_the_search_time() -> None:
    """The clock reads one second per call and the search before took 3 s, so the refinement gets 3 s: three
    trials (one clock reading each). Only the most harmful node is needed; after three trials half the prefix went
    back to INT8 and what was not tried stays FP32."""
    from calibration.search import _refine

    order = [f"n{i}" for i in range(16)]
    best: list = [order, "graph", {}]
    calls: list[int] = []

    def trial(back: list[str], phase: str) -> bool:
        calls.append(len(back))
        met = "n0" in back
        if met:
            best[:] = [list(back), "graph", {}]
        return met

    clock = _Clock(1.0)
    clock.now = 2.0
    returned = _refine(best, trial, clock, 0.0, lambda: False)
    assert calls == [8, 0, 4] and best[0] == order[:4] and returned == 12
    best[:] = [order, "graph", {}]
    assert _refine(best, trial, _Clock(1.0), 0.0, lambda: True) == 0 and best[0] == order  # out of budget: none
    # At half that share (the OpenVINO file's search) the refinement gets 1.5 s: one trial, then the deadline.
    best[:], calls[:] = [order, "graph", {}], []
    clock = _Clock(1.0)
    clock.now = 2.0
    assert _refine(best, trial, clock, 0.0, lambda: False, share=0.5) == 8 and calls == [8] and best[0] == order[:8]


def test_paired_search_out_of_time_puts_every_node_back_and_says_so(
    fused_plan: tuple[onnx.ModelProto, FusedPlan], validation: list[dict[str, np.ndarray]]
) -> None:
    """Fake clock, one second per reading: the budget runs out after the probe and the first trial (which fails),
    so every node goes back, one evaluation records it, and each step says why."""
    model, plan = fused_plan
    names = [target.name for target in plan.targets]
    metric = CosineMetric()
    _, report = search_fallback(model, plan.build(names), validation, metric, 1e-6, 2, build=plan.build,
                                candidates=names, budget_s=3.5, clock=_Clock(1.0))
    assert report.budget_reached == "falling back"
    assert report.fallback_nodes == list(report.harm) and len(report.fallback_nodes) == len(names)
    assert all(step.reason == "not tried: the search's time budget ran out" for step in report.fallbacks)
    assert not failures(report.scores_after, report.bars)


def test_an_unknown_strategy_is_refused(validation: list[dict[str, np.ndarray]],
                                        fused_plan: tuple[onnx.ModelProto, FusedPlan]) -> None:
    model, plan = fused_plan
    with pytest.raises(QuantizationError, match="strategy"):
        search_fallback(model, plan.build([]), validation, CosineMetric(), 0.01, strategy="greedy")

"""Static INT8 on the fused graph (calibration/fused.py) on a tiny seeded BERT fused in the test: SmoothQuant's
FP32 twin is exact, the INT8 graph is QAttention + MatMulIntegerToFloat once onnxruntime loads it, it stays
close to FP32, and the accuracy search falls nodes back by building them FP32."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.transformers.onnx_model import OnnxModel

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, sample_texts
from calibration.fused import build_int8, foldable_attention, plan_fused
from calibration.metrics import EmbeddingMetric
from calibration.quantize import QuantizationConfig, quantize_model
from calibration.ranges import ActivationStats, _emulated, _gptq, _quantize_weight, find_targets, plan_inputs
from graphs.core.errors import QuantizationError
from graphs.fusion import FusionConfig, GraphPlan, fuse_graph
from graphs.graph_view import GraphView
from tests.calibration.conftest import tokenize

ORT_OPTIMIZED = "optimized.onnx"


@pytest.fixture(scope="module")
def fused_bert(sensitive_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "model_optimized.onnx"
    fuse_graph(sensitive_bert, out, GraphPlan((4, 4), 64, "bert"), FusionConfig())
    return out


def _reader(samples: int = 32) -> tuple[TextCalibrationReader, str]:
    calibration, _ = split_texts(builtin_texts())
    sample, digest = sample_texts(calibration, samples, 0)
    return TextCalibrationReader(sample, tokenize, 8), digest


def _heldout() -> dict[str, np.ndarray]:
    return tokenize(split_texts(builtin_texts())[1][:48])


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], dump: Path | None = None) -> np.ndarray:
    options = ort.SessionOptions()
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_targets_are_attention_and_weight_matmuls(fused_bert: Path) -> None:
    targets = find_targets(onnx.load(str(fused_bert)), ("MatMul", "Attention"), ())
    assert sorted(t.op_type for t in targets) == ["Attention"] * 2 + ["MatMul"] * 6
    kept = find_targets(onnx.load(str(fused_bert)), ("MatMul", "Attention"), ("intermediate",))
    assert len(kept) == 6 and not any("intermediate" in t.name for t in kept)


def test_smoothed_twin_is_the_fp32_graph(fused_bert: Path) -> None:
    model = onnx.load(str(fused_bert))
    plan = plan_fused(model, _reader()[0], ("MatMul", "Attention"), (), "minmax", smooth_alpha=0.8)
    feeds = _heldout()
    # Per layer the QKV input, the FFN input and the GELU output get a Mul; the attention context's division is
    # folded into V.
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in plan.smoothed.graph.node) == 6
    attention = [n for n in plan.smoothed.graph.node if n.op_type == "Attention"]
    assert all(n.input[1].endswith("_v_folded") and n.input[2].endswith("_v_folded") for n in attention)
    assert all(p.alpha == 0.8 and p.smooth.max() > 1.0 for p in plan.plans.values())
    np.testing.assert_allclose(_run(plan.smoothed, feeds), _run(fused_bert, feeds), atol=1e-4)
    # Building with no node quantized is the twin itself: what a fallback of every node gives.
    np.testing.assert_allclose(_run(plan.build([]), feeds), _run(plan.smoothed, feeds), atol=1e-6)


def test_int8_graph_runs_as_integer_kernels_and_stays_close(fused_bert: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fused_bert))
    plan = plan_fused(model, _reader()[0], ("MatMul", "Attention"), (), "minmax", smooth_alpha=None)
    int8 = plan.build([t.name for t in plan.targets])
    feeds = _heldout()
    out = _run(int8, feeds, dump=tmp_path / ORT_OPTIMIZED)
    ops = [n.op_type for n in onnx.load(str(tmp_path / ORT_OPTIMIZED)).graph.node]
    assert ops.count("QAttention") == 2 and ops.count("MatMulIntegerToFloat") == 6
    assert "Attention" not in ops and "MatMul" not in ops  # nothing left in float but the cheap ops
    reference = _run(fused_bert, feeds)
    assert _cosine(out, reference) > 0.99
    assert 0 < float(np.abs(out - reference).max())  # it really is quantized


def test_auto_alpha_moves_an_outlier_channel_into_the_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 32)).astype(np.float32)
    x[:, 3] *= 40.0  # one outlier channel, as BERT's LayerNorm outputs have
    weight = rng.normal(size=(32, 16)).astype(np.float32)
    stats = ActivationStats.first(x)
    stats.update(x, rng, 512, 512)
    auto = plan_inputs({"x": stats}, {"x": [weight]}, "minmax", None)["x"]
    off = plan_inputs({"x": stats}, {"x": [weight]}, "minmax", 0.0)["x"]

    def error(plan: object) -> float:
        s, scale, zero = plan.smooth, plan.scale, plan.zero_point  # type: ignore[attr-defined]
        xq = (np.clip(np.round(x / s / scale) + zero, 0, 255) - zero) * scale
        w = weight * s[:, None]
        ws = np.abs(w).max(0) / 127
        return float(np.mean((xq @ (np.round(w / ws) * ws) - x @ weight) ** 2))

    assert auto.alpha > 0.0 and off.alpha == 0.0
    assert auto.smooth[3] == auto.smooth.max()
    assert error(auto) < 0.5 * error(off)


class CosineMetric(EmbeddingMetric):
    """Mean cosine only: a random-weight model's top-1 neighbours are near ties that flip on any noise."""

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        return {"mean_cosine": 1.0 - max_accuracy_drop}


def test_quantize_model_fused_route_and_search(fused_bert: Path, tmp_path: Path) -> None:
    reader, digest = _reader(16)
    heldout = split_texts(builtin_texts())[1]
    validation = [tokenize(heldout[i : i + 16]) for i in range(0, 64, 16)]
    lax = quantize_model(fused_bert, tmp_path / "lax.onnx", reader, QuantizationConfig(samples=16, max_accuracy_drop=0.2),
                         digest, validation=validation)
    assert lax.graph == "fused" and lax.fallback_nodes == []
    assert lax.quantized_op_counts == {"Attention": 2, "MatMul": 6} and len(lax.smoothing) == 8  # 4 inputs per layer
    before = lax.search["scores_before"]["mean_cosine"]  # type: ignore[index]
    drop = (1.0 - before) / 2  # a bar half the INT8 graph's error: some nodes must go back, not all
    strict = quantize_model(fused_bert, tmp_path / "strict.onnx", reader,
                            QuantizationConfig(samples=16, max_accuracy_drop=drop, search_ranking_batches=2),
                            digest, validation=validation, metric=CosineMetric())
    assert strict.fallback_nodes, "a bar at half the INT8 error must put nodes back in FP32"
    assert strict.quantized_nodes == 8 - len(strict.fallback_nodes)
    assert set(strict.fallback_nodes) <= set(strict.float_nodes_kept)
    # the recorded last step meets every bar
    assert strict.search is not None
    last = strict.search["fallbacks"][-1]["scores"]
    assert all(last[name] >= bar for name, bar in strict.search["bars"].items())


def test_histogram_methods_and_other_formats_route_to_the_unfused_graph() -> None:
    assert QuantizationConfig().uses_fused_graph
    assert not QuantizationConfig(method="entropy").uses_fused_graph
    assert not QuantizationConfig.from_preset("cpu-avx512-vnni-unfused").uses_fused_graph
    assert not QuantizationConfig.from_preset("gpu-tensorrt-s8s8").uses_fused_graph
    with pytest.raises(ValueError, match="fused graph is quantized only as U8S8"):
        dataclasses.replace(QuantizationConfig(), format="QOperator")
    with pytest.raises(ValueError, match="smooth_alpha"):
        QuantizationConfig(smooth_alpha=1.5)


def test_per_token_ffn_quantizes_only_gelu_outputs_and_runs_as_integer_kernels(fused_bert: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fused_bert))
    plan = plan_fused(model, _reader()[0], ("MatMul", "Attention"), (), "minmax", None, per_token_ffn=True)
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    per_token = [tensor for tensor, p in plan.plans.items() if p.per_token]
    assert len(per_token) == 2 and {producers[t] for t in per_token} == {"BiasGelu"}
    report = plan.smoothing_report()
    assert all(report[t]["per_token"] and report[t]["alpha"] == 0.0 and report[t]["zero_point"] > 0 for t in per_token)
    assert all(report[t]["zero_point"] * report[t]["min_step"] >= 0.1 for t in per_token)  # GELU's minimum fits
    out = _run(plan.build([t.name for t in plan.targets]), _heldout(), dump=tmp_path / ORT_OPTIMIZED)
    ops = [n.op_type for n in onnx.load(str(tmp_path / ORT_OPTIMIZED)).graph.node]
    assert ops.count("QAttention") == 2 and ops.count("MatMulIntegerToFloat") == 6 and ops.count("ReduceMax") == 2
    assert "MatMul" not in ops
    assert _cosine(out, _run(fused_bert, _heldout())) > 0.99


class _Feeds:
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches, self.position = batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        self.position += 1
        return self.batches[self.position - 1] if self.position <= len(self.batches) else None

    def rewind(self) -> None:
        self.position = 0


def test_per_token_beats_a_static_range_when_token_sizes_vary() -> None:
    """GELU outputs whose per-token maxima differ 100x, as MiniLM's do about 10x: one static range wastes most
    levels on the small tokens, a per-token scale does not. (100x rather than 30x: with 7-bit weights, which
    CPUs without VNNI need, the weights' own rounding error is twice as large and hid a 30x spread's gain.)"""
    rng = np.random.default_rng(0)
    hidden, width = 32, 64
    inits = [onnx.numpy_helper.from_array(rng.normal(size=width).astype(np.float32) * 0.1, "b"),
             onnx.numpy_helper.from_array(rng.normal(size=(width, hidden)).astype(np.float32), "W")]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("BiasGelu", ["x", "b"], ["g"], "gelu", domain="com.microsoft"),
         onnx.helper.make_node("MatMul", ["g", "W"], ["y"], "ffn_out")], "ffn",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", width])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17),
                                                         onnx.helper.make_opsetid("com.microsoft", 1)], ir_version=8)

    def batch(seed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        sizes = np.exp(r.uniform(np.log(0.03), np.log(3.0), size=(4, 16, 1)))
        return {"x": (r.normal(size=(4, 16, width)) * sizes).astype(np.float32)}

    reader = _Feeds([batch(seed) for seed in range(8)])
    test = batch(99)
    reference = _run(model, test)
    errors = {}
    for per_token in (False, True):
        plan = plan_fused(model, reader, ("MatMul",), (), "minmax", 0.0, per_token_ffn=per_token)
        assert plan.plans["g"].per_token is per_token
        errors[per_token] = float(np.mean((_run(plan.build(["ffn_out"]), test) - reference) ** 2))
    assert 0 < errors[True] < 0.5 * errors[False]


def _linear_model(tap: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W) -> Add(b) -> y, with x's channels far from zero on average (as BERT's LayerNorm outlier
    channels are): rounding W to int8 then shifts every output by the same amount. ``tap`` also makes the
    MatMul output a graph output (its bias can then not absorb a correction)."""
    rng = np.random.default_rng(1)
    width, hidden = 48, 16
    inits = [onnx.numpy_helper.from_array(rng.normal(size=(width, hidden)).astype(np.float32), "W"),
             onnx.numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "b")]
    outputs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", hidden])]
    if tap:
        outputs.append(onnx.helper.make_tensor_value_info("xw", onnx.TensorProto.FLOAT, ["batch", "seq", hidden]))
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["xw"], "linear"),
         onnx.helper.make_node("Add", ["xw", "b"], ["y"], "bias")], "linear",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", width])], outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def _offset_batch(seed: int) -> dict[str, np.ndarray]:
    means = np.random.default_rng(7).uniform(-3.0, 3.0, size=48)
    return {"x": (np.random.default_rng(seed).normal(size=(4, 16, 48)) * 0.2 + means).astype(np.float32)}


def test_bias_correction_removes_the_systematic_shift_of_int8_weights() -> None:
    model = _linear_model()
    reader = _Feeds([_offset_batch(seed) for seed in range(8)])
    test = _offset_batch(99)
    reference = _run(model, test)
    plain = plan_fused(model, reader, ("MatMul",), (), "minmax", 0.0)
    corrected = plan_fused(model, reader, ("MatMul",), (), "minmax", 0.0, bias_correction=True)
    assert plain.corrections == {} and list(corrected.corrections) == ["linear"]
    reader_name, slot, shift = corrected.corrections["linear"]
    assert (reader_name, slot) == ("bias", 1) and shift.shape == (16,)
    # The shift is what the emulated INT8 product misses on average, and onnxruntime computes that product.
    rows = test["x"].reshape(-1, 48).astype(np.float64)
    emulated = (_emulated(rows, plain.plans["x"], plain.int8["linear"])
                + onnx.numpy_helper.to_array(model.graph.initializer[1]))
    np.testing.assert_allclose(_run(plain.build(["linear"]), test).reshape(-1, 16), emulated, atol=2e-3)
    error = {name: float(np.mean((_run(plan.build(["linear"]), test) - reference) ** 2))
             for name, plan in (("plain", plain), ("corrected", corrected))}
    assert 0 < error["corrected"] < 0.5 * error["plain"], error
    # Back in FP32 the node keeps its own bias: the correction belongs to the INT8 node only.
    np.testing.assert_allclose(_run(corrected.build([]), test), reference, atol=1e-5)
    assert not any("corrected" in init.name for init in corrected.build([]).graph.initializer)


def test_gptq_already_removes_the_shift_that_bias_correction_removes_after_nearest_rounding() -> None:
    """GPTQ minimises ``||X W - X Wq||`` with the uncentred ``X^T X``: the mean of ``X`` is part of it, so the
    systematic shift bias correction removes after rounding to nearest is mostly gone before any correction."""
    model = _linear_model()
    reader = _Feeds([_offset_batch(seed) for seed in range(8)])
    test = _offset_batch(99)
    reference = _run(model, test)
    error = {}
    for rounding in ("nearest", "gptq"):
        for correct in (False, True):
            plan = plan_fused(model, reader, ("MatMul",), (), "minmax", 0.0, bias_correction=correct,
                              weight_rounding=rounding)
            error[rounding, correct] = float(np.mean((_run(plan.build(["linear"]), test) - reference) ** 2))
    assert error["gptq", False] < 0.5 * error["nearest", False], error
    assert error["gptq", True] <= 1.01 * error["gptq", False], error  # the correction does not undo GPTQ's choice


def test_bias_correction_leaves_a_matmul_whose_output_is_read_elsewhere() -> None:
    model = _linear_model(tap=True)
    plan = plan_fused(model, _Feeds([_offset_batch(seed) for seed in range(2)]), ("MatMul",), (), "minmax", 0.0,
                      bias_correction=True)
    assert plan.corrections == {}


def test_bias_correction_finds_every_bias_of_a_fused_bert(fused_bert: Path) -> None:
    """QKV bias of Attention, BiasGelu's bias, and the bias term of the residual Sum (graphs/residual_sum.py)."""
    model = onnx.load(str(fused_bert))
    plan = plan_fused(model, _reader(16)[0], ("MatMul", "Attention"), (), "minmax", None, bias_correction=True)
    readers = {name: node.op_type for node in model.graph.node for name in [node.name]}
    kinds = sorted(readers[reader] for reader, _, _ in plan.corrections.values())
    assert kinds == ["Attention"] * 2 + ["BiasGelu"] * 2 + ["Sum"] * 4
    feeds = _heldout()
    reference = _run(fused_bert, feeds)
    names = [t.name for t in plan.targets]
    assert _cosine(_run(plan.build(names), feeds), reference) > 0.99


def test_context_division_stays_a_mul_when_the_attention_output_is_read_elsewhere(fused_bert: Path) -> None:
    model = onnx.load(str(fused_bert))
    targets = find_targets(model, ("MatMul", "Attention"), ())
    readers = {t.name for t in targets}
    context = next(t.activation for t in targets if "attention/output/dense" in t.name)
    view = GraphView(OnnxModel(model))
    assert foldable_attention(view, context, readers) is not None
    assert foldable_attention(view, context, readers - {next(t.name for t in targets if t.activation == context)}) is None
    model.graph.output.append(onnx.helper.make_tensor_value_info(context, onnx.TensorProto.FLOAT, None))
    assert foldable_attention(GraphView(OnnxModel(model)), context, readers) is None
    plan = plan_fused(model, _reader(16)[0], ("MatMul", "Attention"), (), "minmax", smooth_alpha=0.8)
    assert sum(n.op_type == "Mul" and n.name.endswith("_smooth") for n in plan.smoothed.graph.node) == 7
    feeds = _heldout()
    np.testing.assert_allclose(_run(plan.smoothed, feeds), _run(fused_bert, feeds), atol=1e-4)


def _correlated_batch(seed: int) -> dict[str, np.ndarray]:
    """48 input channels driven by 6 shared factors, as a layer's activations are: far from independent."""
    mixing = np.random.default_rng(5).normal(size=(6, 48))
    r = np.random.default_rng(seed)
    return {"x": (r.normal(size=(4, 16, 6)) @ mixing + 0.05 * r.normal(size=(4, 16, 48))).astype(np.float32)}


def test_gptq_rounding_lowers_the_product_error_on_unseen_inputs() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(48, 16))
    rows = np.concatenate([_correlated_batch(seed)["x"].reshape(-1, 48) for seed in range(8)]).astype(np.float64)
    unseen = _correlated_batch(99)["x"].reshape(-1, 48).astype(np.float64)
    (nearest, scale), (gptq, gptq_scale) = _quantize_weight(weight), _gptq(weight, rows.T @ rows)
    np.testing.assert_array_equal(scale, gptq_scale)  # same levels, other rounding
    assert gptq.dtype == np.int8 and np.abs(gptq.astype(int)).max() <= 127 and (gptq != nearest).any()
    assert np.abs(gptq.astype(int) - nearest).max() <= 3  # a rounding choice, not another weight
    error = {name: float(np.mean((unseen @ (q * s) - unseen @ weight) ** 2))
             for name, q, s in (("nearest", nearest, scale), ("gptq", gptq, gptq_scale))}
    assert error["gptq"] < 0.5 * error["nearest"], error
    # an input channel that is always zero (a pruned unit) leaves the rest well defined
    rows[:, 7] = 0.0
    assert np.isfinite(_gptq(weight, rows.T @ rows)[0].astype(float)).all()


def test_gptq_weights_are_what_the_int8_graph_computes() -> None:
    model = _linear_model()
    reader = _Feeds([_correlated_batch(seed) for seed in range(8)])
    test = _correlated_batch(99)
    reference = _run(model, test)
    plans = {rounding: plan_fused(model, reader, ("MatMul",), (), "minmax", 0.0, weight_rounding=rounding)
             for rounding in ("nearest", "gptq")}
    rows = test["x"].reshape(-1, 48).astype(np.float64)
    bias = onnx.numpy_helper.to_array(model.graph.initializer[1])
    error = {}
    for rounding, plan in plans.items():
        got = _run(plan.build(["linear"]), test)
        np.testing.assert_allclose(got.reshape(-1, 16), _emulated(rows, plan.plans["x"], plan.int8["linear"]) + bias,
                                   atol=2e-3)
        error[rounding] = float(np.mean((got - reference) ** 2))
    assert error["gptq"] < 0.9 * error["nearest"], error  # 0.83x here: the input's own u8 rounding is the rest


def test_gram_sums_real_tokens_of_every_batch_and_leaves_the_sampled_rows_alone() -> None:
    batches = [np.random.default_rng(seed).normal(size=(2, 5, 3)).astype(np.float32) for seed in range(3)]
    masks = [np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) for _ in batches]

    def fold(gram_rows: int) -> ActivationStats:
        stat = ActivationStats.first(batches[0])
        rng, gram_rng = np.random.default_rng(0), np.random.default_rng(1)  # as collect_stats: two streams
        for x, mask in zip(batches, masks, strict=True):
            stat.update(x, rng, 4, 100, mask, gram_rows, gram_rng)
        return stat

    every, capped, none = fold(64), fold(5), fold(0)
    real = [x.reshape(-1, 3)[mask.reshape(-1) > 0] for x, mask in zip(batches, masks, strict=True)]
    whole = np.concatenate(real).astype(np.float64)
    np.testing.assert_allclose(every.gram, whole.T @ whole, rtol=1e-5)
    # 5 of the 8 real tokens of each batch: the draws of the Gram's own stream
    gram_rng = np.random.default_rng(1)
    picked = np.concatenate([r[gram_rng.choice(len(r), 5, replace=False)] for r in real]).astype(np.float64)
    np.testing.assert_allclose(capped.gram, picked.T @ picked, rtol=1e-5)
    assert none.gram is None
    for stat in (every, capped):  # the rows sampled for the other choices are the same with or without a Gram
        np.testing.assert_array_equal(np.concatenate(stat.rows), np.concatenate(none.rows))


def test_gptq_on_a_fused_bert_with_per_token_inputs_folded_v_and_corrections(fused_bert: Path) -> None:
    """Every kind of target at once: QAttention (its V columns divided by the next smoothing), static and
    per-token MatMuls, bias corrections; the built graph carries exactly the GPTQ weights of the plan."""
    model = onnx.load(str(fused_bert))
    plans = {rounding: plan_fused(model, _reader(16)[0], ("MatMul", "Attention"), (), "minmax", None,
                                  per_token_ffn=True, bias_correction=True, weight_rounding=rounding)
             for rounding in ("nearest", "gptq")}
    plan = plans["gptq"]
    assert any(p.per_token for p in plan.plans.values()) and any(p.alpha > 0 for p in plan.plans.values())
    assert any(init.name.endswith("_v_folded") for init in plan.smoothed.graph.initializer)
    names = [t.name for t in plan.targets]
    assert set(plan.int8) == set(names) and len(plan.corrections) == 8
    built = {init.name: init for init in plan.build(names).graph.initializer}
    for name in names:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(built[f"{name}_weight_s8"]), plan.int8[name][0])
    differs = [name for name in names if (plan.int8[name][0] != plans["nearest"].int8[name][0]).any()]
    assert len(differs) == len(names)
    feeds = _heldout()
    reference = _run(fused_bert, feeds)
    error = {rounding: 1.0 - _cosine(_run(p.build(names), feeds), reference) for rounding, p in plans.items()}
    assert error["gptq"] < error["nearest"], error


def test_reduced_int8_weights_stay_in_seven_bits_and_full_ones_use_eight(fused_bert: Path) -> None:
    model = onnx.load(str(fused_bert))
    for bits, qmax in ((7, 63), (8, 127)):
        plan = plan_fused(model, _reader()[0], ("MatMul", "Attention"), (), "minmax", None, weight_bits=bits)
        largest = max(int(np.abs(q.astype(int)).max()) for q, _ in plan.int8.values())
        assert largest == qmax  # each column's largest weight sits at the edge of its range


def _with_attention_bias(model: onnx.ModelProto, scale: float = 0.3) -> onnx.ModelProto:
    """`model` whose first Attention also reads an ``attention_bias`` (batch, 1, seq, seq) that grows with the key's
    position (a constant per row would cancel in the softmax): the input MPNet's relative position bias and
    ModernBERT's band mask arrive through."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    model.graph.initializer.extend([numpy_helper.from_array(np.array([1, 3], np.int64), "bias_axes_q"),
                                    numpy_helper.from_array(np.array([1, 2], np.int64), "bias_axes_k"),
                                    numpy_helper.from_array(np.array(1, np.int64), "bias_axis"),
                                    numpy_helper.from_array(np.array(scale, np.float32), "bias_scale")])
    nodes = [helper.make_node("Cast", ["attention_mask"], ["bias_mask"], "bias_cast", to=onnx.TensorProto.FLOAT),
             helper.make_node("CumSum", ["bias_mask", "bias_axis"], ["bias_position"], "bias_position"),
             helper.make_node("Mul", ["bias_position", "bias_scale"], ["bias_ramp"], "bias_ramp"),
             helper.make_node("Unsqueeze", ["bias_mask", "bias_axes_q"], ["bias_q"], "bias_unsqueeze_q"),
             helper.make_node("Unsqueeze", ["bias_ramp", "bias_axes_k"], ["bias_k"], "bias_unsqueeze_k"),
             helper.make_node("Mul", ["bias_q", "bias_k"], ["attention_bias"], "bias_band")]
    while len(attention.input) < 5:
        attention.input.append("")
    attention.input.append("attention_bias")
    position = list(model.graph.node).index(attention)
    for offset, node in enumerate(nodes):
        model.graph.node.insert(position + offset, node)
    return model


def test_an_attention_bias_survives_quantization(fused_bert: Path) -> None:
    """An Attention with an ``attention_bias`` stays float (QAttention has no slot for it), bias attached; the rest
    is INT8. Before the guard it became a QAttention of inputs 0-3 and the bias was silently gone."""
    plain = onnx.load(str(fused_bert))
    biased = _with_attention_bias(plain)
    feeds = _heldout()
    with_bias, without_bias = _run(biased, feeds), _run(plain, feeds)
    assert float(np.abs(with_bias - without_bias).max()) > 0.1  # the bias matters
    plan = plan_fused(biased, _reader()[0], ("MatMul", "Attention"), (), "minmax", smooth_alpha=None)
    int8 = plan.build([t.name for t in plan.targets])
    out = _run(int8, feeds)
    assert float(np.abs(out - with_bias).mean()) < 0.5 * float(np.abs(out - without_bias).mean()), "bias lost"
    assert _cosine(out, with_bias) > 0.99
    kept = [n for n in int8.graph.node if n.op_type == "Attention"]
    assert len(kept) == 1 and kept[0].input[5] == "attention_bias"
    assert sum(n.op_type == "QAttention" for n in int8.graph.node) == 1
    assert sorted(t.op_type for t in plan.targets) == ["Attention"] + ["MatMul"] * 6
    with pytest.raises(QuantizationError, match="no slot for its inputs"):  # asked for directly: refused
        build_int8(plan.smoothed, plan.targets, plan.plans, [kept[0].name], plan.int8)


def test_an_attention_bias_keeps_its_projections_int8_through_multiheadattention(fused_bert: Path) -> None:
    """The INT8 route's rewrite of such an Attention (calibration.unpack): packed QKV MatMul + Add + Split +
    MultiHeadAttention with the same mask and bias, equal to the Attention in FP32; then the QKV MatMul is INT8 and
    the bias still counts."""
    from calibration.unpack import unpack_biased_attention

    plain = onnx.load(str(fused_bert))
    biased = _with_attention_bias(plain)
    feeds = _heldout()
    with_bias, without_bias = _run(biased, feeds), _run(plain, feeds)
    unpacked = onnx.ModelProto()
    unpacked.CopyFrom(biased)
    made = unpack_biased_attention(unpacked)
    assert len(made) == 1
    assert float(np.abs(_run(unpacked, feeds) - with_bias).max()) < 1e-4
    plan = plan_fused(unpacked, _reader()[0], ("MatMul", "Attention"), (), "minmax", smooth_alpha=None)
    assert made[0] in {t.name for t in plan.targets}
    int8 = plan.build([t.name for t in plan.targets])
    out = _run(int8, feeds)
    assert float(np.abs(out - with_bias).mean()) < 0.5 * float(np.abs(out - without_bias).mean()), "bias lost"
    assert _cosine(out, with_bias) > 0.99
    attention = [n for n in int8.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention) == 1 and attention[0].input[5] == "attention_bias"
    assert not [n for n in int8.graph.node if n.op_type == "Attention"]

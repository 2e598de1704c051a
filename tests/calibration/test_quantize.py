"""Static INT8 on a tiny seeded BERT exported in the test: nodes get quantized, the sensitive ones stay float,
and the INT8 graph still computes what the FP32 graph computes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, sample_texts
from calibration.quantize import PRESETS, QuantizationConfig, QuantizationReport, quantize_model
from graphs.core.errors import QuantizationError
from tests.calibration.conftest import tokenize


def _embed(path: Path, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = tokenize(texts)
    hidden = session.run(None, feeds)[0]
    mask = feeds["attention_mask"][..., None]
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _quantize(model: Path, out: Path, config: QuantizationConfig) -> QuantizationReport:
    calibration, _ = split_texts(builtin_texts())
    sample, digest = sample_texts(calibration, config.samples, config.seed)
    reader = TextCalibrationReader(sample, tokenize, config.batch_size)
    return quantize_model(model, out, reader, config, sample_sha256=digest)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_default_preset_quantizes_weight_matmuls_and_keeps_accuracy(
    tiny_bert: Path, tmp_path: Path, method: str
) -> None:
    config = QuantizationConfig(samples=32, method=method, graph="unfused")
    out = tmp_path / "model_int8.onnx"
    report = _quantize(tiny_bert, out, config)

    # 2 layers x (Q, K, V, attention output, FFN input, FFN output); the two activation MatMuls stay float.
    assert report.quantized_nodes == 12
    assert report.quantized_op_counts == {"MatMul": 12}
    assert len(report.float_nodes_kept) == 4
    assert report.fallback_nodes == [] and report.search is None
    assert report.format == "QDQ" and report.samples == 32 and len(report.sample_sha256) == 64
    graph = onnx.load(str(out)).graph
    # Per layer: 6 weights, plus 4 activations (Q/K/V share their input).
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 20
    producers = {output: node.op_type for node in graph.node for output in node.output}
    for node in graph.node:  # Softmax, LayerNorm, GELU, residual Adds and Gather read float tensors
        if node.op_type in {"Softmax", "LayerNormalization", "Erf", "Gather", "Add", "Div", "Mul"}:
            assert all(producers.get(name) != "DequantizeLinear" for name in node.input), node.name

    _, heldout = split_texts(builtin_texts())
    reference, quantized = _embed(tiny_bert, heldout[:64]), _embed(out, heldout[:64])
    assert float((reference * quantized).sum(1).mean()) >= 0.99
    json.dumps(report.to_dict())


def test_quantizing_every_matmul_output_is_what_hurts(tiny_bert: Path, tmp_path: Path) -> None:
    """The QOperator preset re-quantizes outputs; it still quantizes, but differs more from FP32."""
    config = QuantizationConfig.from_preset("cpu-qoperator-u8s8", samples=16)
    report = _quantize(tiny_bert, tmp_path / "qop.onnx", config)
    assert report.quantized_op_counts == {"QLinearMatMul": 12}


def test_tensorrt_preset_is_symmetric_s8s8_qdq(tiny_bert: Path, tmp_path: Path) -> None:
    config = QuantizationConfig.from_preset("gpu-tensorrt-s8s8", samples=16)
    assert config.activation_type == config.weight_type == "int8" and config.activation_symmetric
    out = tmp_path / "trt.onnx"
    report = _quantize(tiny_bert, out, config)
    assert report.quantized_nodes == 12
    zero_points = [
        init for init in onnx.load(str(out)).graph.initializer if init.name.endswith("_zero_point")
    ]
    assert zero_points and all(init.data_type == onnx.TensorProto.INT8 for init in zero_points)
    assert all(not onnx.numpy_helper.to_array(init).any() for init in zero_points)


def test_excluding_everything_is_an_error(tiny_bert: Path, tmp_path: Path) -> None:
    config = QuantizationConfig(samples=8, exclude_nodes=("MatMul",), graph="unfused")
    with pytest.raises(QuantizationError, match="no node of"):
        _quantize(tiny_bert, tmp_path / "none.onnx", config)


def test_missing_model_is_a_quantization_error(tmp_path: Path) -> None:
    reader = TextCalibrationReader(["a b c"], tokenize)
    with pytest.raises(QuantizationError, match="does not exist"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "out.onnx", reader)


def test_config_validation_and_presets() -> None:
    with pytest.raises(ValueError, match="method 'nope'"):
        QuantizationConfig(method="nope")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        QuantizationConfig(max_accuracy_drop=1.5)
    with pytest.raises(ValueError, match="unknown quantization preset"):
        QuantizationConfig.from_preset("nope")
    assert {"cpu-avx512-vnni", "gpu-tensorrt-s8s8"} <= set(PRESETS)
    assert PRESETS["cpu-avx512-vnni"] == QuantizationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantizationConfig().samples = 3  # type: ignore[misc]


def test_float_before_activation_keeps_ffn_input_float(tiny_bert: Path, tmp_path: Path) -> None:
    report = _quantize(tiny_bert, tmp_path / "ffi.onnx", QuantizationConfig(samples=16, float_before_activation=True, graph="unfused"))
    assert report.quantized_nodes == 10
    assert sum("intermediate/dense" in name for name in report.float_nodes_kept) == 2


def _matmul_integer_error(weight_max: int) -> int:
    """Largest |onnxruntime - exact| of a u8 x s8 MatMulInteger with large activations and weights near
    ``weight_max``: where the CPU's kernel adds product pairs in int16 (AVX2 without VNNI), full range saturates."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.integers(200, 256, (8, 64)).astype(np.uint8)
    b = rng.integers(weight_max - 10, weight_max + 1, (64, 16)).astype(np.int8)
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [8, 16])],
                              [numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    return int(np.abs(got.astype(np.int64) - a.astype(np.int64) @ b.astype(np.int64)).max())


def test_int8_weight_range_is_exact_on_this_cpu() -> None:
    """7-bit weights are exact on every CPU; "auto" picks full range only where full range is exact here."""
    from calibration.cpu import int8_weight_bits

    assert _matmul_integer_error(63) == 0
    bits = int8_weight_bits("auto")
    if bits == 8:
        assert _matmul_integer_error(127) == 0, "auto chose full-range weights, which this CPU computes wrongly"
    assert int8_weight_bits("reduced") == 7 and int8_weight_bits("full") == 8
    assert QuantizationConfig().weight_bits == bits
    with pytest.raises(ValueError, match="int8_weights"):
        QuantizationConfig(int8_weights="6bit")

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
from exporter.errors import QuantizationError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
SEQ = 16
VOCAB = 200


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """A deterministic stand-in for a tokenizer: word ids by character sum, right padding to SEQ."""
    ids = np.zeros((len(texts), SEQ), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        words = [101] + [2 + sum(map(ord, word)) % (VOCAB - 2) for word in text.split()][: SEQ - 2] + [102]
        ids[row, : len(words)] = [w % VOCAB for w in words]
        mask[row, : len(words)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    feeds = tokenize(["a small example", "another one here"])
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    axes = {name: {0: "batch", 1: "seq"} for name in [*INPUTS, "last_hidden_state"]}
    torch.onnx.export(
        model,
        tuple(torch.from_numpy(feeds[name]) for name in INPUTS),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=INPUTS,
        output_names=["last_hidden_state"],
        dynamic_axes=axes,
    )
    return path


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
    config = QuantizationConfig(samples=32, method=method)
    out = tmp_path / "model_int8.onnx"
    report = _quantize(tiny_bert, out, config)

    # 2 layers x (Q, K, V, attention output, FFN output); FFN input and the two activation MatMuls stay float.
    assert report.quantized_nodes == 10
    assert report.quantized_op_counts == {"MatMul": 10}
    assert sum("intermediate/dense" in name for name in report.float_nodes_kept) == 2
    assert len(report.float_nodes_kept) == 6
    assert report.format == "QDQ" and report.samples == 32 and len(report.sample_sha256) == 64
    graph = onnx.load(str(out)).graph
    # Per layer: 5 weights, plus 3 activations (Q/K/V share their input).
    assert sum(node.op_type == "DequantizeLinear" for node in graph.node) == 16
    for node in graph.node:  # Softmax, LayerNorm, GELU and Gather must read float tensors
        if node.op_type in {"Softmax", "LayerNormalization", "Erf", "Gather"}:
            producers = {n.output[0]: n.op_type for n in graph.node}
            assert all(producers.get(name) != "DequantizeLinear" for name in node.input)

    _, heldout = split_texts(builtin_texts())
    reference, quantized = _embed(tiny_bert, heldout[:64]), _embed(out, heldout[:64])
    assert float((reference * quantized).sum(1).mean()) >= 0.99
    json.dumps(report.to_dict())


def test_quantizing_every_matmul_output_is_what_hurts(tiny_bert: Path, tmp_path: Path) -> None:
    """The QOperator preset re-quantizes outputs; it still quantizes, but differs more from FP32."""
    config = QuantizationConfig.from_preset("cpu-qoperator-u8s8", samples=16)
    report = _quantize(tiny_bert, tmp_path / "qop.onnx", config)
    assert report.quantized_op_counts == {"QLinearMatMul": 10}


def test_tensorrt_preset_is_symmetric_s8s8_qdq(tiny_bert: Path, tmp_path: Path) -> None:
    config = QuantizationConfig.from_preset("gpu-tensorrt-s8s8", samples=16)
    assert config.activation_type == config.weight_type == "int8" and config.activation_symmetric
    out = tmp_path / "trt.onnx"
    report = _quantize(tiny_bert, out, config)
    assert report.quantized_nodes == 10
    zero_points = [
        init for init in onnx.load(str(out)).graph.initializer if init.name.endswith("_zero_point")
    ]
    assert zero_points and all(init.data_type == onnx.TensorProto.INT8 for init in zero_points)
    assert all(not onnx.numpy_helper.to_array(init).any() for init in zero_points)


def test_excluding_everything_is_an_error(tiny_bert: Path, tmp_path: Path) -> None:
    config = QuantizationConfig(samples=8, exclude_nodes=("MatMul",))
    with pytest.raises(QuantizationError, match="no node of"):
        _quantize(tiny_bert, tmp_path / "none.onnx", config)


def test_missing_model_is_a_quantization_error(tmp_path: Path) -> None:
    reader = TextCalibrationReader(["a b c"], tokenize)
    with pytest.raises(QuantizationError, match="does not exist"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "out.onnx", reader)


def test_config_validation_and_presets() -> None:
    with pytest.raises(ValueError, match="method 'nope'"):
        QuantizationConfig(method="nope")
    with pytest.raises(ValueError, match="unknown quantization preset"):
        QuantizationConfig.from_preset("nope")
    assert {"cpu-avx512-vnni", "gpu-tensorrt-s8s8"} <= set(PRESETS)
    assert PRESETS["cpu-avx512-vnni"] == QuantizationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantizationConfig().samples = 3  # type: ignore[misc]

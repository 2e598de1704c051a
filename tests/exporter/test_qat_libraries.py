"""Cross-checks against the quantization libraries themselves, where they install (skipped, saying why, where
not): a checkpoint the library writes is imported as the library means it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import load as onnx_load
from onnx import numpy_helper

from exporter.cli import main
from exporter.loading import load_checkpoint
from tests.qat_checkpoints import _base, _input_ranges


def test_a_compressed_tensors_checkpoint_written_by_the_library(tmp_path: Path) -> None:
    """compressed-tensors' own apply_quantization_config + ModelCompressor (int-quantized, W8A8 static): the
    loader's float weights equal the library's dequantize, and the INT8 file holds the library's int8 weights,
    weight scales and input scales."""
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    folder = tmp_path / "ct"
    model, _ = _base(folder, 0)
    ranges, _ = _input_ranges(model, 0)
    args = {"num_bits": 8, "type": "int", "symmetric": True}
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args, strategy="channel"),
                                input_activations=QuantizationArgs(**args, strategy="tensor", dynamic=False))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["classifier", "bert.pooler.dense"]))
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.copy_(module.weight.abs().amax(1, keepdim=True) / 127)
                module.input_scale.copy_(torch.tensor([ranges[name] / 127]).reshape(module.input_scale.shape))
                module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["version"] == ct.__version__
    import safetensors.torch

    stored = safetensors.torch.load_file(str(folder / "model.safetensors"))
    checkpoint = load_checkpoint(folder)
    assert checkpoint.qat is not None and checkpoint.qat.format == "compressed-tensors"
    assert len(checkpoint.qat.linears) == 18
    weights = checkpoint.model.state_dict()
    for name in checkpoint.qat.linears:
        expected = dequantize(stored[f"{name}.weight"], stored[f"{name}.weight_scale"],
                              args=QuantizationArgs(**args, strategy="channel"))
        assert torch.equal(weights[f"{name}.weight"], expected.to(torch.float32)), name
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--output", str(out), "--latency", "off"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    inits = {i.name: numpy_helper.to_array(i) for i in onnx_load(str(out / "model_quantized.onnx")).graph.initializer}
    for node, modules in manifest["qat"]["int8"]["modules"].items():
        names = modules.split(" | ")
        weight = np.concatenate([stored[f"{n}.weight"].T.numpy() for n in names], 1)
        scale = np.concatenate([stored[f"{n}.weight_scale"].reshape(-1).numpy() for n in names])
        assert np.array_equal(inits[f"{node}_weight_s8"], weight), node
        assert np.array_equal(inits[f"{node}_weight_scale"], scale), node
    assert manifest["quantization"]["samples"] == 0


_MODELOPT_CHILD = """
import sys
from pathlib import Path
import numpy as np, torch
import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
from tests.qat_checkpoints import _base, sample_ids
folder = Path(sys.argv[1])
model, _ = _base(folder, 0)
mto.enable_huggingface_checkpointing()
model = mtq.quantize(model, mtq.INT8_SMOOTHQUANT_CFG, lambda m: m(**sample_ids(0)))
model.save_pretrained(folder)
feeds = sample_ids(5)
for pattern in ("*LayerNorm*", "*bmm_quantizer", "*pooler*input_quantizer", "*classifier*input_quantizer"):
    mtq.disable_quantizer(model, pattern)
with torch.no_grad():
    trained = model(**feeds).logits.numpy()
    mtq.disable_quantizer(model, "*")
    unquantized = model(**feeds).logits.numpy()
np.savez(folder.parent / "expected.npz", trained=trained, unquantized=unquantized)
"""


def test_a_modelopt_smoothquant_checkpoint_written_by_the_library(tmp_path: Path) -> None:
    """nvidia-modelopt's own mtq.quantize(INT8_SMOOTHQUANT_CFG) and save_pretrained (modelopt_state.pth beside
    the weights), in a child process (ModelOpt patches transformers' save and load for the whole process):
    model.onnx equals ModelOpt's model with every quantizer off, and the INT8 file equals its fake-quantized model
    with the quantizers the graph does not implement off (the LayerNorm inputs, the attention BMMs, the pooler's
    and classifier's inputs), run as written."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    import subprocess
    import sys

    from graphs.core.sessions import open_session
    from tests.qat_checkpoints import sample_ids

    folder = tmp_path / "mo"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", _MODELOPT_CHILD, str(folder)], check=True, cwd=root, timeout=600)
    assert (folder / "modelopt_state.pth").is_file()
    expected = np.load(tmp_path / "expected.npz")
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--output", str(out), "--latency", "off"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qat"]["format"] == "modelopt" and manifest["quantization"]["samples"] == 0
    numpy_feeds = {k: v.numpy() for k, v in sample_ids(5).items()}
    found = open_session(out / "model_quantized.onnx", optimize=False).run(["logits"], numpy_feeds)[0]
    assert np.abs(found - expected["trained"]).max() < 1e-5
    fp32 = open_session(out / "model.onnx").run(["logits"], numpy_feeds)[0]
    assert np.abs(fp32 - expected["unquantized"]).max() < 1e-5

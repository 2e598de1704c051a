"""Quantization-aware-trained checkpoints: each format recognised at load, its learned scales imported, the float
model the training meant (SmoothQuant multiplied back, int8 dequantized), and unmappable schemes refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
import torch

from exporter.cli import main
from exporter.loading import load_checkpoint
from graphs.core.errors import CheckpointError
from tests.hardening.conftest import assert_refused, run_cli
from tests.qat_checkpoints import (
    compressed_tensors_checkpoint,
    modelopt_checkpoint,
    sample_ids,
)


def _max_weight_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    found, expected = model.state_dict(), reference.state_dict()
    return max(float((found[k] - expected[k]).abs().max()) for k in expected if k in found)


def test_modelopt_scales_are_imported_per_linear(tmp_path: Path) -> None:
    truth = modelopt_checkpoint(tmp_path / "m")
    checkpoint = load_checkpoint(tmp_path / "m")
    qat = checkpoint.qat
    assert qat is not None and qat.format == "modelopt"
    assert sorted(qat.linears) == sorted(truth.input_amax)
    for name, scales in qat.linears.items():
        assert scales.input_scale == pytest.approx(truth.input_amax[name] / 127.0, rel=1e-6)
        torch.testing.assert_close(scales.weight_scale, truth.weight_amax[name] / 127.0, rtol=1e-6, atol=0)
        assert scales.pre_quant_scale is None
    assert len(qat.consumed) == 2 * len(truth.input_amax)  # every quantizer tensor accounted for
    assert (tmp_path / "m" / "modelopt_state.pth") in checkpoint.files_read
    assert _max_weight_error(checkpoint.model, truth.float_model) == 0.0


def test_modelopt_smoothquant_weights_are_multiplied_back(tmp_path: Path) -> None:
    truth = modelopt_checkpoint(tmp_path / "m", smooth=True)
    checkpoint = load_checkpoint(tmp_path / "m")
    assert checkpoint.qat is not None and len(checkpoint.qat.restored) == len(truth.pre_quant_scale)
    # the stored weights are far from the float ones: the test would see them loaded as they are
    stored_error = max(float((truth.stored_weight[n] - truth.float_model.get_submodule(n).weight).abs().max())
                       for n in truth.pre_quant_scale)
    assert stored_error > 0.05
    assert _max_weight_error(checkpoint.model, truth.float_model) < 1e-6
    with torch.no_grad():
        found = checkpoint.model(**sample_ids(1)).logits
        expected = truth.float_model(**sample_ids(1)).logits
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


def test_compressed_tensors_int8_weights_are_dequantized(tmp_path: Path) -> None:
    truth = compressed_tensors_checkpoint(tmp_path / "c")
    checkpoint = load_checkpoint(tmp_path / "c")
    qat = checkpoint.qat
    assert qat is not None and qat.format == "compressed-tensors"
    assert len(qat.linears) == len(truth.input_amax) == len(qat.restored)
    for name, scales in qat.linears.items():
        assert scales.input_scale == pytest.approx(truth.input_amax[name] / 127.0, rel=1e-6)
    assert _max_weight_error(checkpoint.model, truth.float_model) == 0.0


@pytest.fixture(scope="module")
def smoothquant_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("sq")
    truth = modelopt_checkpoint(root / "ckpt", smooth=True)
    out = root / "out"
    assert main(["--model", str(root / "ckpt"), "--output", str(out), "--calibration-samples", "8",
                 "--latency", "off"]) == 0
    return out, truth


def test_smoothquant_model_onnx_is_the_unsmoothed_model(smoothquant_export: tuple[Path, object]) -> None:
    """model.onnx within 1e-4 of the float model the training meant (the weights as stored would be off by
    about 1e-1 of the logits)."""
    out, truth = smoothquant_export
    feeds = sample_ids(3)
    with torch.no_grad():
        expected = truth.float_model(**feeds).logits.numpy()  # type: ignore[attr-defined]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    found = session.run(["logits"], {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    assert np.abs(found - expected).max() < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qat"]["format"] == "modelopt"
    assert len(manifest["qat"]["restored_weights"]) == 18


@pytest.mark.parametrize(("case", "phrase"), [
    ("int4", "4-bit"), ("fp8", "FP8"), ("blocks", "block"), ("ct-dynamic", "dynamic"), ("fx", "FX"),
    ("unknown", "quantizer tensors"), ("inc", "Neural Compressor"),
])
def test_unsupported_schemes_exit_2_with_one_line_and_nothing_written(
        case: str, phrase: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "ckpt"
    if case == "int4":
        modelopt_checkpoint(folder, num_bits=4)
    elif case == "fp8":
        modelopt_checkpoint(folder, num_bits=(4, 3))
    elif case == "blocks":
        modelopt_checkpoint(folder, block_sizes={-1: 128})
    elif case == "ct-dynamic":
        compressed_tensors_checkpoint(folder, dynamic=True)
    else:
        compressed_tensors_checkpoint(folder)  # then rewritten as another form below
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config))
        state = safetensors.torch.load_file(folder / "model.safetensors")
        state = {k: v for k, v in state.items() if not k.endswith(("_scale",))}
        state = {k: (v.float() if v.dtype == torch.int8 else v) for k, v in state.items()}
        if case == "fx":
            state["activation_post_process_0.scale"] = torch.tensor([0.1])
        elif case == "unknown":
            state["bert.encoder.layer.0.attention.self.query.my_quantizer.clip"] = torch.tensor([0.1])
        else:
            (folder / "best_configure.json").write_text("{}")
        safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    run = run_cli(["--model", str(folder), "--latency", "off"], tmp_path / "out", capsys)
    assert_refused(run, phrase)

"""The benchmark's quantization-aware trainer: its fake quantizer is the one the export implements, and what it
saves is a ModelOpt checkpoint whose learned scales the export imports with nothing calibrated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from benchmarks.qat_finetune import FakeQuantLinear, encoder_linears, fake_quantize, qat_finetune
from exporter.cli import main
from exporter.loading import load_checkpoint
from exporter.qat_reference import fake_quantize as reference_fake_quantize
from tests.checkpoints import tiny_checkpoint


def test_fake_quantize_rounds_as_the_export_and_passes_gradients_straight_through() -> None:
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    amax = torch.tensor(4.0, requires_grad=True)
    y = fake_quantize(x, amax)
    torch.testing.assert_close(y, reference_fake_quantize(x.detach(), 4.0 / 127, -128, 127), atol=1e-6, rtol=0)
    assert len(torch.unique(torch.round(y.detach() / (4.0 / 127)))) <= 256
    y.sum().backward()
    inside = (x.detach() / (4.0 / 127) > -128) & (x.detach() / (4.0 / 127) < 127)
    assert bool((~inside).any()) and bool(inside.any())
    assert torch.equal(x.grad, inside.float())  # straight through in range, stopped where clamped
    assert amax.grad is not None and float(amax.grad) != 0.0  # the clamp hands amax its gradient


def test_fake_quant_linear_off_is_the_float_linear() -> None:
    linear = torch.nn.Linear(8, 4)
    module = FakeQuantLinear(linear, 2.0)
    x = torch.randn(3, 8)
    module.enabled = False
    torch.testing.assert_close(module(x), linear(x))
    module.enabled = True
    with torch.no_grad():
        assert float((module(x) - linear(x)).abs().max()) > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qat")
    base = tiny_checkpoint(root / "base", "bert", "text-classification", pruned_heads={}, dead=False).path
    return base, qat_finetune(root / "qat", base, steps=2, calibration_batches=1, log=False)


def test_the_trained_folder_is_a_modelopt_checkpoint_of_every_encoder_linear(trained: tuple[Path, Path]) -> None:
    base, out = trained
    linears = encoder_linears(load_checkpoint(base).model)
    checkpoint = load_checkpoint(out)
    qat = checkpoint.qat
    assert qat is not None and qat.format == "modelopt"
    assert len(qat.linears) == len(linears) == 18  # 3 layers x 6 linears
    state = safetensors.torch.load_file(str(out / "model.safetensors"))
    for name, scales in qat.linears.items():
        assert state[f"{name}.input_quantizer._amax"].shape == ()
        assert state[f"{name}.weight_quantizer._amax"].shape == (state[f"{name}.weight"].shape[0], 1)
        assert scales.input_scale == pytest.approx(float(state[f"{name}.input_quantizer._amax"]) / 127, rel=1e-6)
    for layer in range(3):  # one tensor, one step: the fused Attention quantizes it once
        steps = {qat.linears[f"bert.encoder.layer.{layer}.attention.self.{p}"].input_scale for p in ("query", "key", "value")}
        assert len(steps) == 1
    record = json.loads((out / "finetune.json").read_text())
    assert record["input_amax_relative_change_max"] > 0  # the amax were trained, not only calibrated
    assert (out / "modelopt_state.pth") in checkpoint.files_read


def test_the_export_builds_its_int8_from_the_learned_scales(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = trained
    assert main(["--model", str(out), "--output", str(tmp_path / "art"), "--latency", "off"]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "learned" and manifest["quantization"]["samples"] == 0
    sources = manifest["qat"]["int8"]["scale_source"]
    assert sum(source == "checkpoint" for source in sources.values()) == 12  # 3 Attention + 9 MatMul


def test_a_trained_folder_is_reused(trained: tuple[Path, Path]) -> None:
    base, out = trained
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert qat_finetune(out, base, steps=2, calibration_batches=1, log=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == before

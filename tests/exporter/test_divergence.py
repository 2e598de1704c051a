"""A fault injected into one layer of a graph: the parity failure names that layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import exporter.pipeline as pipeline
from exporter.cli import main
from tests import checkpoints


def _corrupt_layer(path: Path, layer: int) -> str:
    """Scale the FFN output weight of `layer` by 1.5 in place; returns the node's name."""
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node
                if f"/layer.{layer}/output/dense/MatMul" in n.name and any(i in initializers for i in n.input))
    weight = initializers[next(i for i in node.input if i in initializers)]
    array = numpy_helper.to_array(weight) * np.float32(1.5)
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))
    return node.name


@pytest.mark.parametrize("layer", [0, 2])
def test_fault_in_one_layer_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture, layer: int) -> None:
    truth = checkpoints.tiny_checkpoint(tmp_path / "ckpt", "bert", "feature-extraction")
    real_fuse = pipeline.fuse_graph

    def fuse_then_break(model_path: Path, output_path: Path, *args: object, **kwargs: object) -> object:
        report = real_fuse(model_path, output_path, *args, **kwargs)
        _corrupt_layer(output_path, layer)  # after fusion's own checks: only parity can catch it
        return report

    monkeypatch.setattr(pipeline, "fuse_graph", fuse_then_break)
    out = tmp_path / "out"
    assert main(["--model", str(truth.path), "--output", str(out), "--calibration-samples", "8"]) == 3
    err = capsys.readouterr().err
    assert "model_optimized.onnx" in err and f"first diverging: layer {layer} " in err
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in manifest["parity"]
                 if e["file"] == "model_optimized.onnx" and e["provider"] == "CPUExecutionProvider")
    assert entry["status"] == "fail" and entry["first_divergence"].startswith(f"first diverging: layer {layer} ")
    clean = next(e for e in manifest["parity"] if e["file"] == "model.onnx" and e["provider"] == "CPUExecutionProvider")
    assert clean["status"] == "pass" and clean["first_divergence"] is None

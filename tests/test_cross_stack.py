"""Checkpoints saved by the other transformers line export exactly (issue 13, must-show 2).

The folders come from `python -m tests.cross_stack save DIR` run under the other stack (CI does it both ways);
`EXPORT_MODEL_CROSS_STACK_DIR` names DIR. The test also runs on folders saved by the installed stack, so it
holds on its own where only one stack is at hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import transformers

from exporter.cli import main
from tests import cross_stack

_DIR = os.environ.get("EXPORT_MODEL_CROSS_STACK_DIR")


def _folders() -> list[Path]:
    found = sorted(Path(_DIR).glob("transformers-*/*/truth.json")) if _DIR else []
    return [p.parent for p in found]


def _check(folder: Path, out: Path) -> None:
    truth = json.loads((folder / "truth.json").read_text())
    reference = np.load(folder / "reference.npz")
    # The claim here is the FP32 files and the fusion. INT8's accuracy bar is not: on this random LayerNorm model
    # every text's embedding is nearly the same, so nearest-neighbour agreement is a coin toss even with every
    # node back in FP32, and the search would refuse the model. The INT8 file is still built and parity-checked.
    code = main(["--model", str(folder), "--output", str(out), "--calibration-samples", "16",
                 "--max-accuracy-drop", "0.99"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["deployable"]
    feeds = {name: reference[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
    mask = feeds["attention_mask"].astype(bool)
    for name in ("model.onnx", "model_optimized.onnx"):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        got = session.run(["last_hidden_state"], feeds)[0]
        error = float(np.abs(got[mask] - reference["last_hidden_state"][mask]).max())
        assert error <= 1e-4, f"{name}: max abs error {error:.2e} vs the saving stack's PyTorch model"
    graph = onnx.load(str(out / "model_optimized.onnx"), load_external_data=False).graph
    heads = [next(a.i for a in node.attribute if a.name == "num_heads")
             for node in graph.node if node.op_type == "Attention"]
    assert heads == [len(truth["heads_kept"][str(layer)]) for layer in range(cross_stack.LAYERS)]


@pytest.mark.slow
def test_checkpoints_saved_by_the_other_stack_export_exactly(tmp_path: Path) -> None:
    folders = [f for f in _folders()
               if json.loads((f / "truth.json").read_text())["transformers"].split(".")[0]
               != transformers.__version__.split(".")[0]]
    if not folders:
        pytest.skip("no checkpoints saved by the other transformers line: set EXPORT_MODEL_CROSS_STACK_DIR to a "
                    "folder filled by `python -m tests.cross_stack save DIR` under it (CI does)")
    for folder in folders:
        _check(folder, tmp_path / f"{folder.parent.name}-{folder.name}")


@pytest.mark.slow
def test_checkpoints_saved_by_this_stack_export_exactly(tmp_path: Path) -> None:
    for folder in cross_stack.save(tmp_path / "saved"):
        _check(folder, tmp_path / f"out-{folder.name}")

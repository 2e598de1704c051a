"""Export the compacted PyTorch model to ONNX with dynamic batch and sequence axes, named as optimum does.

The TorchScript exporter (`dynamo=False`) is used on purpose: with transformers 4.57's eager attention each
layer's Reshape carries that layer's head count as a constant, which is what onnxruntime's fusion reads per
layer. The dynamo exporter's graphs do not fuse (FACTS.md, onnxruntime 1.31).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from exporter.architectures import TASK_OUTPUTS, Architecture

log = logging.getLogger(__name__)

OPSET = 17
_TWO_GB = 2**31


@dataclass
class ExportReport:
    inputs: dict[str, list[str | int]]
    outputs: dict[str, list[str | int]]
    opset: int
    external_data: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": {k: {"dtype": "int64", "shape": v} for k, v in self.inputs.items()},
            "outputs": {k: {"dtype": "float32", "shape": v} for k, v in self.outputs.items()},
            "opset": self.opset,
            "external_data": self.external_data,
        }


class _Signature(nn.Module):
    """Positional inputs in a fixed order, a tuple of named outputs out: what the exporter traces."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, inputs, strict=True)), return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


def output_axes(task: str) -> dict[str, dict[int, str]]:
    token_level = {0: "batch_size", 1: "sequence_length"}
    if task == "text-classification":
        return {"logits": {0: "batch_size"}}
    return {name: dict(token_level) for name in TASK_OUTPUTS[task]}


def export_onnx(model: nn.Module, architecture: Architecture, task: str, path: Path) -> ExportReport:
    """Trace `model` (eval mode) into `path`; weights go to external data only past 2 GB."""
    start = time.perf_counter()
    input_names = architecture.input_names
    output_names = TASK_OUTPUTS[task]
    batch, length = 2, 16
    dummy = {
        "input_ids": torch.randint(5, 100, (batch, length), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }
    dummy["attention_mask"][1, length // 2 :] = 0  # a padded row, so no all-ones shortcut is traced
    args = tuple(dummy[name] for name in input_names)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in input_names} | output_axes(task)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapper = _Signature(model, input_names, output_names).eval()
    # Past 2 GB the exporter writes one file per tensor beside the graph: keep those in a scratch folder and
    # merge them into a single `<name>.data` below, so the artifact holds only files the manifest describes.
    scratch = path.parent / f".{path.stem}.export-scratch"
    scratch.mkdir(exist_ok=True)
    traced = scratch / path.name
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about python-int shapes are expected here
        torch.onnx.export(
            wrapper,
            args,
            str(traced),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    try:
        external = size >= _TWO_GB or len(list(scratch.iterdir())) > 1
        if external:
            onnx.save(onnx.load(str(traced)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data", size_threshold=1024)
        else:
            traced.replace(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    graph = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))
    report = ExportReport(
        inputs={i.name: _dims(i) for i in graph.graph.input},
        outputs={o.name: _dims(o) for o in graph.graph.output},
        opset=OPSET,
        external_data=external,
        seconds=time.perf_counter() - start,
    )
    log.info("export: %s (%d inputs, %d outputs, opset %d) in %.1fs", path.name, len(report.inputs),
             len(report.outputs), OPSET, report.seconds)
    return report


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

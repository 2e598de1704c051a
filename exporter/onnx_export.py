"""Export the compacted PyTorch model to ONNX with dynamic batch and sequence axes, named as optimum does.

The graph does not come from the installed transformers' forward code: during the trace every module runs the
project's own forward (``exporter.export_forward``), which computes what transformers 4.57's eager attention
computed, op for op, with each layer's head count a constant in its Q/K/V Reshapes. That is the graph
onnxruntime's fusion reads per layer (``graphs.fusion``), with transformers 4.57 and 5.x alike (5.x's own
attention reshapes with ``-1``: nothing fuses). The patched forward is checked against the model's own on the
dummy batch before tracing.

The TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, in torch 2.13 and 2.14) is used on purpose.
What moving to ``dynamo=True`` (``torch.export`` + onnxscript) would take:

- Dynamic axes become ``dynamic_shapes`` with ``torch.export.Dim`` objects (batch >= 1, sequence 2..max
  positions; torch.export specialises a dimension traced at size 1), and the dummy batch must not hit the
  data-dependent branches torch.export refuses (our forward has none; transformers' own mask code has some).
- The graph changes shape: ops come out as onnxscript's decompositions (e.g. ``softmax`` with a ``Cast``,
  ``scaled_dot_product_attention`` pieces, ``Expand``/``Where`` masks), opset 18+, with node names from the FX
  graph (``node_MatMul_12``) instead of module scopes, and the exporter's own optimizer folds constants and may
  merge the per-layer Reshape shape into a single initializer. onnxruntime 1.31's ``optimize_model`` does not fuse
  these graphs (onnxruntime targets TorchScript-exported graphs): fusion would move to ``onnxscript.rewriter.ort_fusions`` (``optimize_for_ort`` /
  ``fuse_xformers``), whose Attention/MultiHeadAttention rules and head-count detection need checking per layer
  for uneven heads, and our own passes (``graphs.fuse_distilbert_attention``, ``fuse_nonorm_attention``,
  ``fold_nonorm``, ``residual_sum``, ``inspection.attention_nodes``' layer mapping) would need the new patterns.
- INT8 (``calibration.fused``) targets fused ``Attention`` and weight ``MatMul`` nodes by name; it would need the
  node kinds ort_fusions emits (``MultiHeadAttention`` with separate Q/K/V weights has no ``QAttention``
  counterpart, so Q/K/V would have to be packed back into one ``Attention``).
- Parity and the ``GraphPlan`` head check stay as they are; they are what would prove such a move.
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
from exporter.export_forward import export_forward
from exporter.runtime.outputs import SENTENCE_OUTPUT, token_level
from exporter.runtime.outputs import output_names as outputs_of
from exporter.runtime.pooling import Pooling
from exporter.sentence import torch_pool
from graphs.core.errors import ExportError

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
    """Positional inputs in a fixed order, the task's outputs as a tuple: what the exporter traces. Inside
    ``export_forward`` the model's forward returns that tuple itself."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(**dict(zip(self.input_names, inputs, strict=True))))


def own_outputs(model: nn.Module, task: str, inputs: dict[str, torch.Tensor],
                pooling: Pooling | None = None) -> dict[str, torch.Tensor]:
    """The model's own forward (installed transformers' code) for `task`'s outputs; with `pooling`, its
    ``sentence_embedding`` too, pooled from ``last_hidden_state`` as sentence-transformers defines it."""
    own = model(**inputs, return_dict=True)
    result = {name: own[name] for name in TASK_OUTPUTS[task]}
    if pooling is not None:
        result[SENTENCE_OUTPUT] = torch_pool(own["last_hidden_state"], inputs["attention_mask"], pooling)
    return result


def check_export_forward(model: nn.Module, architecture: Architecture, task: str,
                         inputs: dict[str, torch.Tensor], pooling: Pooling | None = None
                         ) -> tuple[float, dict[str, tuple[int, ...]]]:
    """Largest difference between the model's own forward and the export forward on ``inputs`` (eval mode), and
    each output's shape there; ExportError beyond float rounding (1e-5 of the larger of 1 and the largest
    output)."""
    output_names = outputs_of(task, pooling is not None)
    with torch.no_grad(), architecture.own_forward(model):
        own = own_outputs(model, task, inputs, pooling)
        reference = [own[name] for name in output_names]
        with export_forward(model, architecture, task, pooling):
            ours = model(**inputs)
    worst = 0.0
    for name, want, got in zip(output_names, reference, ours, strict=True):
        if tuple(want.shape) != tuple(got.shape):
            raise ExportError(f"export forward gives {name} of shape {tuple(got.shape)}, the model {tuple(want.shape)}")
        diff = float((want - got).abs().max()) if want.numel() else 0.0
        bound = 1e-5 * max(1.0, float(want.abs().max()) if want.numel() else 0.0)
        if not diff <= bound:
            raise ExportError(
                f"the export forward differs from {type(model).__name__}'s own forward by {diff:.3g} on {name} "
                f"(allowed {bound:.3g}); this model is not the {architecture.name} the exporter describes"
            )
        worst = max(worst, diff)
    return worst, {name: tuple(got.shape) for name, got in zip(output_names, ours, strict=True)}


def output_axes(task: str, sentence: bool = False) -> dict[str, dict[int, str]]:
    return {name: {0: "batch_size", 1: "sequence_length"} if token_level(task, name) else {0: "batch_size"}
            for name in outputs_of(task, sentence)}


def export_onnx(model: nn.Module, architecture: Architecture, task: str, path: Path,
                pooling: Pooling | None = None) -> ExportReport:
    """Trace `model` (eval mode) into `path`; weights go to external data only past 2 GB. With `pooling` (a
    sentence-transformers folder), the graph also outputs ``sentence_embedding``."""
    start = time.perf_counter()
    input_names = architecture.input_names
    output_names = outputs_of(task, pooling is not None)
    batch, length = 2, 16
    dummy = {
        "input_ids": torch.randint(5, 100, (batch, length), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
    }
    dummy["attention_mask"][1, length // 2 :] = 0  # a padded row, so no all-ones shortcut is traced
    args = tuple(dummy[name] for name in input_names)
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in input_names} | output_axes(task, pooling is not None)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    wrapper = _Signature(model, input_names).eval()
    worst, shapes = check_export_forward(model, architecture, task, dict(zip(input_names, args, strict=True)), pooling)
    log.info("export forward matches %s's own forward to %.2g on the dummy batch", type(model).__name__, worst)
    # Past 2 GB the exporter writes one file per tensor beside the graph: keep those in a scratch folder and
    # merge them into a single `<name>.data` below, so the artifact holds only files the manifest describes.
    scratch = path.parent / f".{path.stem}.export-scratch"
    scratch.mkdir(exist_ok=True)
    traced = scratch / path.name
    with torch.no_grad(), warnings.catch_warnings(), export_forward(model, architecture, task, pooling):
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
    if pooling is not None:
        # The tracer leaves the pooled width symbolic (after the normalization's Div); it is hidden x modes.
        output = next(o for o in graph.graph.output if o.name == SENTENCE_OUTPUT)
        output.type.tensor_type.shape.dim[1].Clear()
        output.type.tensor_type.shape.dim[1].dim_value = shapes[SENTENCE_OUTPUT][-1]
        onnx.save(graph, str(path))  # external tensors (if any) stay references to the unchanged .data file
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

"""The fake-quantized PyTorch model a quantization-aware training computed, rebuilt from the imported scales
(no trainer package needed): each quantized linear rounds its input and its weight as the trainer's fake
quantizer does (``clamp(round(x / step), qmin, qmax) * step``, round half to even as ``torch.round``), after
ModelOpt's ``pre_quant_scale`` where the checkpoint has one.

``only`` restricts the quantizers switched on to the linears named (those the INT8 graph implements); parity
against that model is at float-noise level, parity against the model as trained (every quantizer on) says what
the quantizers the graph does not implement cost.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.qat_import import LinearScales, QatImport
from exporter.reference import reference_outputs
from exporter.runtime.parity import Batch, ParityConfig, check_file, session_entries
from exporter.runtime.pooling import Pooling


def fake_quantize(x: torch.Tensor, step: float, qmin: int, qmax: int, zero_point: int = 0) -> torch.Tensor:
    return (torch.clamp(torch.round(x / step) + zero_point, qmin, qmax) - zero_point) * step


class FakeQuantLinear(nn.Module):
    """``linear`` with its learned weight quantizer on, and its input quantizer (``inputs``, default True)."""

    def __init__(self, linear: nn.Linear, scales: LinearScales, inputs: bool = True) -> None:
        super().__init__()
        self.inputs = inputs
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.scales = scales
        pqs = scales.pre_quant_scale
        if scales.weight_int8 is not None and scales.weight_scale is not None:
            # weights the float model holds at zero (heads masked by --drop-heads) stay zero: round(0) is 0
            weight = scales.weight_int8.to(torch.float32) * scales.weight_scale[:, None] * (linear.weight != 0)
        else:  # the weight as the quantizer reads it: the stored (smoothed) one
            weight = linear.weight.detach() / (pqs[None, :] if pqs is not None else 1.0)
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scales
        if s.pre_quant_scale is not None:
            x = x * s.pre_quant_scale
        if s.input_scale is not None and self.inputs:
            x = fake_quantize(x, s.input_scale, s.input_qmin, s.input_qmax, s.input_zero_point)
        return nn.functional.linear(x, self.weight, self.bias)


def fake_quantized_model(model: nn.Module, qat: QatImport, only: Collection[str] | None = None,
                         weights_only: Collection[str] = ()) -> nn.Module:
    """A copy of ``model`` (the float model the checkpoint means) with the learned quantizers on: every imported
    linear, or those whose checkpoint name is in ``only``; those in ``weights_only`` with the weight quantizer
    alone. With every quantizer on (``only`` None), torch.ao's module output quantizers (``qat.outputs``) round
    each such module's output for all its readers, as in training; otherwise a module output is rounded only
    where a linear in ``only`` reads it as its input (:func:`exporter.qat_targets.map_output_ranges`), as the
    INT8 graph does."""
    result = copy.deepcopy(model)
    prefix = getattr(model, "base_model_prefix", "")
    for name, module in list(result.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        stored = next((c for c in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}."))
                       if c in qat.linears), None)
        if stored is None or (only is not None and stored not in only and stored not in weights_only):
            continue
        parent, _, attr = name.rpartition(".")
        replaced = FakeQuantLinear(module, qat.linears[stored], inputs=stored not in weights_only)
        setattr(result.get_submodule(parent) if parent else result, attr, replaced)
    for name, module in result.named_modules() if only is None else ():
        stored = next((c for c in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}."))
                       if c in qat.outputs), None)
        if stored is not None:
            r = qat.outputs[stored]
            module.register_forward_hook(lambda _m, _a, out, r=r: fake_quantize(out, r.scale, r.qmin, r.qmax,
                                                                                 r.zero_point))
    return result.eval()


def qat_parity(model: nn.Module, qat: QatImport, imported: dict[str, Any], path: Path, task: str,
               batches: Sequence[Batch], names: Sequence[str], pooling: Pooling | None,
               config: ParityConfig) -> dict[str, Any]:
    """The INT8 file against the fake-quantized model twice: ``as_trained`` (every imported quantizer on) and
    ``implemented`` (only the quantizers of the nodes the file runs in INT8 from the checkpoint). Per provider:
    max / mean abs error and cosines (the INT8 pass bar of ParityConfig applies to both)."""
    def modules(kind: str) -> set[str]:
        return {name for node, found in imported["modules"].items()
                if imported["scale_source"].get(node, "").startswith(kind) for name in found.split(" | ")}

    implemented, weights_only = modules("checkpoint"), modules("float (fake-quantized")
    result: dict[str, Any] = {}
    for label, only in (("as_trained", None), ("implemented", implemented)):
        model_q = fake_quantized_model(model, qat, only, weights_only if only is not None else ())
        expected = reference_outputs(model_q, batches, names, pooling)
        entries = check_file(path, "int8", task, batches, expected, config,
                             options=session_entries({"qat": {"int8": imported}}, path.name))
        result[label] = [{k: e.to_dict()[k] for k in ("provider", "status", "max_abs_error", "mean_abs_error",
                                                       "mean_cosine", "min_cosine", "reason")} for e in entries]
    result["quantizers_not_in_graph"] = sorted(set(qat.linears) - implemented) + sorted(qat.other)
    result["weight_quantizers_only"] = sorted(weights_only)
    return result

"""The learned INT8 of each linear of the compacted model, keyed the way the fused graph's nodes are found.

Compaction removes heads (Q/K/V rows, output-projection columns) and FFN units (input rows, output columns) by
copying the surviving rows and columns into new modules. The learned per-output-channel weight steps and the
int8 weights follow the same slicing: the surviving rows of each row-sliced linear are found in the original
(uncompacted) weight, in order, and the output projections take the columns of the V rows / FFN rows that stayed.
Each entry is keyed by :func:`calibration.learned.fingerprint` of the compacted float weight in the fused graph's
layout (``W.T``; Q|K|V packed for the fused ``Attention``), so the graph side finds it whatever the node names.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from calibration.learned import LearnedLinear, fingerprint
from exporter.architectures import Architecture
from exporter.qat_import import LinearScales, QatImport
from graphs.core.errors import CheckpointError

log = logging.getLogger(__name__)

ROW_SLICED = ("query", "key", "value", "ffn_in")
COLUMNS_OF = {"output": "value", "ffn_out": "ffn_in"}
PARTS = ("query", "key", "value", "output", "ffn_in", "ffn_out")


def surviving_rows(original: torch.Tensor, compacted: torch.Tensor) -> torch.Tensor:
    """Indices into ``original``'s rows of ``compacted``'s rows (a subsequence of them, in order)."""
    found, start = [], 0
    for row in compacted:
        while start < len(original) and not torch.equal(original[start], row):
            start += 1
        if start == len(original):
            raise CheckpointError("a compacted weight row is not a row of the checkpoint's weight; the learned "
                                  "scales cannot follow compaction: pass --drop-heads '' or the float model")
        found.append(start)
        start += 1
    return torch.tensor(found, dtype=torch.long)


def _scales_for(qat: QatImport, name: str, prefix: str) -> LinearScales | None:
    for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
        if candidate in qat.linears:
            return qat.linears[candidate]
    return None


def _learned(scales: LinearScales, rows: torch.Tensor | None, columns: torch.Tensor | None) -> LearnedLinear | None:
    if scales.weight_int8 is None or scales.weight_scale is None:
        return None
    weight, step = scales.weight_int8, scales.weight_scale
    pqs = scales.pre_quant_scale
    if rows is not None:
        weight, step = weight[rows], step[rows]
    if columns is not None:
        weight = weight[:, columns]
        pqs = None if pqs is None else pqs[columns]
    return LearnedLinear(weight_int8=weight.T.contiguous().numpy().astype(np.int8),
                         weight_scale=step.to(torch.float32).numpy(), input_scale=scales.input_scale,
                         smooth=None if pqs is None else (1.0 / pqs.to(torch.float64)).to(torch.float32).numpy(),
                         name=scales.module, input_qmin=scales.input_qmin)


def _packed(parts: list[LearnedLinear]) -> LearnedLinear:
    """Q|K|V as the fused Attention packs them: one input, so one input step and one smoothing."""
    inputs = {(p.input_scale, p.input_qmin) for p in parts}
    smooths = [p.smooth for p in parts]
    if len(inputs) != 1 or any((s is None) != (smooths[0] is None) for s in smooths) or (
            smooths[0] is not None and not all(np.array_equal(s, smooths[0]) for s in smooths)):
        log.warning("Q, K and V of %s learned different input ranges or smoothing %s; the fused Attention reads one "
                    "quantized input, so it stays float with fake-quantized weights", parts[0].name, sorted(
                        str(i) for i in inputs))
        inputs = {(None, -128)}
    scale, qmin = next(iter(inputs)) if len(inputs) == 1 else (None, -128)
    return LearnedLinear(np.concatenate([p.weight_int8 for p in parts], 1),
                         np.concatenate([p.weight_scale for p in parts]), scale, smooths[0],
                         " | ".join(p.name for p in parts), qmin)


def learned_linears(original: nn.Module, compacted: nn.Module, architecture: Architecture,
                    qat: QatImport) -> dict[str, LearnedLinear] | None:
    """{fingerprint of the compacted weight as the fused graph holds it: learned INT8} for every encoder linear
    the checkpoint quantized (each Q/K/V alone too, for a graph where attention did not fuse); None when no linear
    has a learned input range the graph can use (torch.ao eager QAT learns output ranges: not mapped yet)."""
    names = {id(module): name for name, module in original.named_modules()}
    prefix = getattr(original, "base_model_prefix", "")
    result: dict[str, LearnedLinear] = {}
    for before, after in zip(architecture.layers(original), architecture.layers(compacted), strict=True):
        rows = {part: surviving_rows(getattr(before, part).weight.detach(), getattr(after, part).weight.detach())
                for part in ROW_SLICED}
        entries: dict[str, LearnedLinear] = {}
        for part in PARTS:
            scales = _scales_for(qat, names[id(getattr(before, part))], prefix)
            column_part = COLUMNS_OF.get(part)
            entry = None if scales is None else _learned(scales, rows.get(part),
                                                         rows[column_part] if column_part else None)
            if entry is None:
                continue
            entries[part] = entry
            result[fingerprint(getattr(after, part).weight.detach().numpy().T)] = entry
        if all(part in entries for part in ("query", "key", "value")):
            packed = _packed([entries[p] for p in ("query", "key", "value")])
            weight = torch.cat([getattr(after, p).weight.detach() for p in ("query", "key", "value")]).numpy().T
            result[fingerprint(weight)] = packed
    encoder = {id(getattr(view, part)) for view in architecture.layers(compacted) for part in PARTS}
    for name, module in compacted.named_modules():  # the pooler, the task head: not compacted
        scales = _scales_for(qat, name, prefix) if isinstance(module, nn.Linear) and id(module) not in encoder else None
        entry = None if scales is None else _learned(scales, None, None)
        if entry is not None:
            result[fingerprint(module.weight.detach().numpy().T)] = entry
    return result if any(entry.input_scale is not None for entry in result.values()) else None

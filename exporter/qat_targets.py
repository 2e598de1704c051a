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
from collections.abc import Collection

import numpy as np
import torch
from torch import nn

from calibration.learned import LearnedLinear, fingerprint
from exporter.architectures import Architecture
from exporter.qat_import import LinearScales, OutputRange, QatImport
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
                         name=scales.module, input_qmin=scales.input_qmin, input_qmax=scales.input_qmax,
                         input_zero_point=scales.input_zero_point)


def _packed(parts: list[LearnedLinear]) -> LearnedLinear:
    """Q|K|V as the fused Attention packs them: one input, so one input step and one smoothing."""
    inputs = {(p.input_scale, p.input_zero_point, p.input_qmin, p.input_qmax) for p in parts}
    smooths = [p.smooth for p in parts]
    if len(inputs) != 1 or any((s is None) != (smooths[0] is None) for s in smooths) or (
            smooths[0] is not None and not all(np.array_equal(s, smooths[0]) for s in smooths)):
        log.warning("Q, K and V of %s learned different input ranges or smoothing %s; the fused Attention reads one "
                    "quantized input, so it stays float with fake-quantized weights", parts[0].name, sorted(
                        str(i) for i in inputs))
        inputs = {(None, 0, -128, 127)}
    scale, zero, qmin, qmax = next(iter(inputs))
    return LearnedLinear(np.concatenate([p.weight_int8 for p in parts], 1),
                         np.concatenate([p.weight_scale for p in parts]), scale, smooths[0],
                         " | ".join(p.name for p in parts), qmin, qmax, zero)


def _stored(name: str, prefix: str, stored: Collection[str]) -> str | None:
    return next((c for c in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if c in stored), None)


def map_output_ranges(model: nn.Module, qat: QatImport) -> None:
    """torch.ao eager QAT learns module *output* ranges (``activation_post_process``; under a whole-model qconfig
    the LayerNorms get one too). A linear whose input is exactly such an output (BERT's Q/K/V read the previous
    LayerNorm's, the FFN input the attention LayerNorm's) read a tensor training rounded: that range becomes its
    learned input range (``scales.input_from`` names the module). Found by running ``model`` once on a few seeded
    ids and comparing each linear's input with the quantized modules' outputs, value for value, so no family's
    module names are assumed. Other linears keep no input range."""
    if not qat.outputs:
        return
    prefix = getattr(model, "base_model_prefix", "")
    produced: list[tuple[str, torch.Tensor]] = []
    read: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        output_of = _stored(name, prefix, qat.outputs)
        if output_of is not None:
            hooks.append(module.register_forward_hook(
                lambda _m, _a, out, key=output_of: produced.append((key, out.detach()))))
        linear = _stored(name, prefix, qat.linears) if isinstance(module, nn.Linear) else None
        if linear is not None:
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, key=linear: read.__setitem__(key, args[0].detach())))
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in hooks:
            handle.remove()
    fed: dict[str, list[str]] = {}
    for linear, x in read.items():
        sources = {key for key, out in produced if out.shape == x.shape and torch.equal(out, x)}
        ranges: set[OutputRange] = {qat.outputs[key] for key in sources}
        scales = qat.linears[linear]
        if len(ranges) != 1 or scales.input_scale is not None:
            continue
        learned, source = next(iter(ranges)), min(sources)
        scales.input_scale, scales.input_zero_point = learned.scale, learned.zero_point
        scales.input_qmin, scales.input_qmax, scales.input_from = learned.qmin, learned.qmax, source
        fed.setdefault(source, []).append(linear)
    for source, linears in fed.items():
        qat.other[f"{source}.activation_post_process"] = (
            f"rounds the input of {', '.join(sorted(linears))} (the graph does, there); its other readers (e.g. the "
            "residual connection) read it unrounded in the graph")
    log.info("torch.ao: %d linears read a module output training fake-quantized (their learned input range)",
             sum(len(v) for v in fed.values()))


def learned_linears(original: nn.Module, compacted: nn.Module, architecture: Architecture,
                    qat: QatImport) -> dict[str, LearnedLinear] | None:
    """{fingerprint of the compacted weight as the fused graph holds it: learned INT8} for every encoder linear
    the checkpoint quantized (each Q/K/V alone too, for a graph where attention did not fuse); None when no linear
    has a learned input range the graph can use (a torch.ao checkpoint whose only quantized modules are linears:
    their output ranges feed no linear, see :func:`map_output_ranges`)."""
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

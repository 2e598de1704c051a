"""Exact compaction of a pruned encoder, done on the modules themselves (transformers 5 removed `prune_heads`).

Heads (per layer, in the order the live module holds them)::

    head h is dead  <=>  V[h] rows all zero  or  O[:, h] columns all zero
    V[h] == 0  ->  context_h = softmax(.) @ (0*x + b_v[h]) = b_v[h]        (rows of softmax sum to 1)
               ->  contribution O[:, h] @ b_v[h] is a constant: folded into O's bias, head removed
    O[:, h] == 0 -> contribution is zero: head removed
    Q[h] == 0 or K[h] == 0 alone -> NOT dead (scores still depend on the other side): kept, reported

FFN units (W_in: [I, H] rows, W_out: [H, I] columns)::

    W_in[i] == 0     -> unit output act(b_in[i]) is constant: W_out[:, i] * act(b_in[i]) folded into b_out
    W_out[:, i] == 0 -> contribution zero
    either way the unit leaves both matrices

A layer cannot have zero heads or zero FFN units in the exported graph (the Reshape needs a head), so when
everything in a layer is dead one head/unit stays with its constant folded and its output zeroed: still exact.
The head count each layer keeps is set on the attention module, so the exported Reshape carries it as a constant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from exporter.architectures import Architecture, LayerView
from graphs.core.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class LayerCompaction:
    """What compaction did to one encoder layer. Head indices are the checkpoint's original indices."""

    layer: int
    heads_config: int
    heads_before: list[int]
    heads_after: list[int]
    removed: dict[int, str] = field(default_factory=dict)  # head -> why
    kept_notes: dict[int, str] = field(default_factory=dict)  # head -> why it looks pruned but stays
    ffn_before: int = 0
    ffn_after: int = 0
    ffn_zero_input: int = 0
    ffn_zero_output: int = 0
    folded_attention_constant: float = 0.0  # L2 norm of the constant folded into O's bias
    folded_ffn_constant: float = 0.0  # L2 norm of the constant folded into the FFN output bias
    params_before: int = 0
    params_after: int = 0


@dataclass
class CompactionReport:
    layers: list[LayerCompaction]
    requested_drops: dict[int, list[int]]
    seconds: float = 0.0

    @property
    def heads_per_layer(self) -> tuple[int, ...]:
        return tuple(len(layer.heads_after) for layer in self.layers)

    @property
    def pruned_heads(self) -> dict[int, list[int]]:
        """`config.pruned_heads` of the compacted model: every original head index no longer present."""
        result = {}
        for layer in self.layers:
            gone = sorted(set(range(layer.heads_config)) - set(layer.heads_after))
            if gone:
                result[layer.layer] = gone
        return result

    def totals(self) -> dict[str, int]:
        return {
            "heads_config": sum(layer.heads_config for layer in self.layers),
            "heads_in_checkpoint": sum(len(layer.heads_before) for layer in self.layers),
            "heads_after": sum(len(layer.heads_after) for layer in self.layers),
            "ffn_before": sum(layer.ffn_before for layer in self.layers),
            "ffn_after": sum(layer.ffn_after for layer in self.layers),
            "encoder_params_before": sum(layer.params_before for layer in self.layers),
            "encoder_params_after": sum(layer.params_after for layer in self.layers),
        }

    def summary(self) -> str:
        t = self.totals()
        removed = t["heads_config"] - t["heads_after"]
        share = 100.0 * (1 - t["encoder_params_after"] / max(t["encoder_params_before"], 1))
        return (
            f"{removed} of {t['heads_config']} heads removed ({t['heads_config'] - t['heads_in_checkpoint']} "
            f"already in pruned_heads), FFN {t['ffn_before']} -> {t['ffn_after']} units, encoder params "
            f"{t['encoder_params_before'] / 1e6:.2f}M -> {t['encoder_params_after'] / 1e6:.2f}M (-{share:.1f}%)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "totals": self.totals(),
            "heads_per_layer": list(self.heads_per_layer),
            "requested_drops": {str(k): v for k, v in self.requested_drops.items()},
            "layers": [asdict(layer) for layer in self.layers],
        }


def parse_drop_heads(spec: str) -> dict[int, list[int]]:
    """Parse `"0:3,5;2:1"` into `{0: [3, 5], 2: [1]}` (original head indices per layer)."""
    result: dict[int, list[int]] = {}
    for chunk in filter(None, (part.strip() for part in spec.split(";"))):
        layer_text, sep, heads_text = chunk.partition(":")
        try:
            if not sep:
                raise ValueError(chunk)
            layer = int(layer_text)
            heads = sorted({int(h) for h in heads_text.split(",") if h.strip()})
        except ValueError:
            raise UsageError(
                f"--drop-heads {spec!r}: cannot read {chunk!r}; expected LAYER:HEAD[,HEAD...] separated by ';', "
                "e.g. '0:3,5;2:1'"
            ) from None
        if layer < 0 or not heads or min(heads) < 0:
            raise UsageError(f"--drop-heads {spec!r}: {chunk!r} names no valid layer/heads; indices start at 0")
        result.setdefault(layer, [])
        result[layer] = sorted(set(result[layer]) | set(heads))
    return result


def present_heads(config: Any, architecture: Architecture, layer: int) -> list[int]:
    """Original indices of the heads the checkpoint still holds in `layer`, in module order."""
    pruned = {int(k): set(v) for k, v in (getattr(config, "pruned_heads", None) or {}).items()}
    return [h for h in range(architecture.num_heads(config)) if h not in pruned.get(layer, set())]


def mask_heads(model: nn.Module, architecture: Architecture, config: Any, drops: dict[int, list[int]]) -> None:
    """Make the requested heads contribute nothing, in place: zero their output-projection columns.

    This is exactly `head_mask` with those heads at 0 (the head's context, bias included, never reaches the
    output), and compaction then removes them as dead with nothing to fold.
    """
    views = architecture.layers(model)
    for layer, heads in drops.items():
        if layer >= len(views):
            raise UsageError(f"--drop-heads names layer {layer}; the model has layers 0-{len(views) - 1}")
        present = present_heads(config, architecture, layer)
        for head in heads:
            if head not in present:
                raise UsageError(
                    f"--drop-heads names head {head} of layer {layer}, which the checkpoint does not hold "
                    f"(present: {present}); name one of those"
                )
        view = views[layer]
        size = architecture.head_size(view.attention)
        with torch.no_grad():
            for head in heads:
                position = present.index(head)
                view.output.weight[:, position * size : (position + 1) * size] = 0.0


def compact_model(
    model: nn.Module, architecture: Architecture, config: Any, requested: dict[int, list[int]] | None = None
) -> CompactionReport:
    """Remove dead heads and FFN units from `model` in place, folding their constants into biases.

    `requested` names heads (original indices) removed at the user's request; they must already be masked
    (see `mask_heads`) and are reported as requested rather than dead. Returns the per-layer report.
    """
    start = time.perf_counter()
    requested = requested or {}
    reports = []
    with torch.no_grad():
        for view in architecture.layers(model):
            params_before = sum(p.numel() for p in view.layer.parameters())
            report = LayerCompaction(
                layer=view.index,
                heads_config=architecture.num_heads(config),
                heads_before=present_heads(config, architecture, view.index),
                heads_after=[],
                params_before=params_before,
            )
            _compact_heads(view, architecture, report, set(requested.get(view.index, [])))
            if view.ffn_gate is not None:
                _compact_gated_ffn(view, report)
            else:
                _compact_ffn(view, report)
            report.params_after = sum(p.numel() for p in view.layer.parameters())
            reports.append(report)
    result = CompactionReport(reports, requested, time.perf_counter() - start)
    log.info("compaction: %s", result.summary())
    return result


def _compact_heads(view: LayerView, architecture: Architecture, report: LayerCompaction, requested: set[int]) -> None:
    size = architecture.head_size(view.attention)
    count = architecture.heads(view.attention)
    original = report.heads_before
    if len(original) != count:
        raise UsageError(
            f"layer {view.index} holds {count} heads but config.pruned_heads implies {len(original)}; "
            "the checkpoint's pruned_heads disagree with its weights"
        )
    hidden = view.output.weight.shape[0]
    wq = view.query.weight.reshape(count, size, -1)
    wk = view.key.weight.reshape(count, size, -1)
    wv = view.value.weight.reshape(count, size, -1)
    wo = view.output.weight.reshape(hidden, count, size)
    bv = view.value.bias.reshape(count, size) if view.value.bias is not None else torch.zeros(count, size)

    def all_zero(t: torch.Tensor) -> bool:
        return not bool(t.any())

    dead = []
    for position, head in enumerate(original):
        v_zero, o_zero = all_zero(wv[position]), all_zero(wo[:, position])
        if v_zero or o_zero:
            dead.append(position)
            if head in requested:
                report.removed[head] = "requested (--drop-heads)"
            else:
                report.removed[head] = "value weights zero" if v_zero else "output columns zero"
        elif all_zero(wq[position]) or all_zero(wk[position]):
            which = "query" if all_zero(wq[position]) else "key"
            report.kept_notes[head] = f"{which} weights zero: attention still depends on the input, kept"
    # Constant contributions of the dead heads: sum_h O[:, h] @ b_v[h]  (zero when O[:, h] is zero).
    constant = torch.zeros(hidden, dtype=torch.float64)
    for position in dead:
        constant += wo[:, position].double() @ bv[position].double()
    keep = [p for p in range(count) if p not in dead]
    if not keep:
        # A Reshape cannot take 0 heads: keep one, its constant already folded, its output zeroed.
        survivor = dead[0]
        report.kept_notes[original[survivor]] = "every head of the layer is dead: kept with zero output (graph needs one)"
        del report.removed[original[survivor]]
        keep = [survivor]
        view.output.weight.reshape(hidden, count, size)[:, survivor] = 0.0
    report.folded_attention_constant = float(constant.norm())
    if view.output.bias is not None:
        view.output.bias += constant.to(view.output.bias.dtype)
    elif bool(constant.any()):
        raise UsageError(f"layer {view.index}: dead heads add a constant but the output projection has no bias")
    report.heads_after = [original[p] for p in keep]
    if len(keep) == count:
        return
    index = torch.cat([torch.arange(p * size, (p + 1) * size) for p in keep])
    for part in ("query", "key", "value"):
        view.replace(part, _select_rows(getattr(view, part), index))
    view.replace("output", _select_columns(view.output, index))
    architecture.set_heads(view.attention, len(keep), keep)


def _compact_ffn(view: LayerView, report: LayerCompaction) -> None:
    w_in, w_out = view.ffn_in.weight, view.ffn_out.weight
    width = w_in.shape[0]
    zero_in = ~w_in.any(dim=1)
    zero_out = ~w_out.any(dim=0)
    dead = zero_in | zero_out
    report.ffn_before = width
    report.ffn_zero_input = int(zero_in.sum())
    report.ffn_zero_output = int((zero_out & ~zero_in).sum())
    fold = zero_in & ~zero_out
    if view.ffn_in.bias is not None and bool(fold.any()):
        # W_out[:, i] * act(b_in[i]) for every unit whose input weights are zero.
        constant_in = view.activation(view.ffn_in.bias[fold].double())
        constant = w_out[:, fold].double() @ constant_in
    else:
        constant = torch.zeros(w_out.shape[0], dtype=torch.float64)
    keep = (~dead).nonzero().flatten()
    if keep.numel() == 0:
        survivor = int(fold.nonzero()[0]) if bool(fold.any()) else 0
        keep = torch.tensor([survivor])
        w_out[:, survivor] = 0.0  # its constant is folded above
    _remove_ffn_units(view, report, keep, constant)


def _remove_ffn_units(view: LayerView, report: LayerCompaction, keep: torch.Tensor, constant: torch.Tensor) -> None:
    """Fold the dead units' `constant` into the FFN output bias and keep only the units `keep` (input rows, gate rows
    where the FFN is gated, output columns)."""
    report.folded_ffn_constant = float(constant.norm())
    if view.ffn_out.bias is not None:
        view.ffn_out.bias += constant.to(view.ffn_out.bias.dtype)
    elif bool(constant.any()):
        raise UsageError(f"layer {view.index}: dead FFN units add a constant but the FFN output has no bias")
    report.ffn_after = int(keep.numel())
    if report.ffn_after == report.ffn_before:
        return
    view.replace("ffn_in", _select_rows(view.ffn_in, keep))
    if view.ffn_gate is not None:
        view.replace("ffn_gate", _select_rows(view.ffn_gate, keep))
    view.replace("ffn_out", _select_columns(view.ffn_out, keep))


def _compact_gated_ffn(view: LayerView, report: LayerCompaction) -> None:
    """A gated (GeGLU) feed-forward: unit i is ``W_out[:, i] * act(in_i(x)) * gate_i(x)``. It contributes exactly
    0 when its output column is zero, its input row is zero and ``act(b_in_i)`` is 0 (always without a bias), or its
    gate row is zero and ``b_gate_i`` is 0; with both rows zero it is the constant ``W_out[:, i] act(b_in_i)
    b_gate_i``, folded into the output bias. Otherwise it depends on the input and stays."""
    assert view.ffn_gate is not None
    w_in, w_gate, w_out = view.ffn_in.weight, view.ffn_gate.weight, view.ffn_out.weight
    width = w_in.shape[0]
    zero_in, zero_gate, zero_out = ~w_in.any(dim=1), ~w_gate.any(dim=1), ~w_out.any(dim=0)
    b_in = view.ffn_in.bias.double() if view.ffn_in.bias is not None else torch.zeros(width, dtype=torch.float64)
    b_gate = view.ffn_gate.bias.double() if view.ffn_gate.bias is not None else torch.zeros(width, dtype=torch.float64)
    act_in = view.activation(b_in)
    silent = zero_out | (zero_in & (act_in == 0)) | (zero_gate & (b_gate == 0))
    fold = zero_in & zero_gate & ~silent
    report.ffn_before = width
    report.ffn_zero_input = int((zero_in | zero_gate).sum())
    report.ffn_zero_output = int((zero_out & ~(zero_in | zero_gate)).sum())
    constant = w_out[:, fold].double() @ (act_in[fold] * b_gate[fold])
    keep = (~(silent | fold)).nonzero().flatten()
    if keep.numel() == 0:
        keep = torch.tensor([0])
        w_out[:, 0] = 0.0  # its constant, if any, is folded above
    _remove_ffn_units(view, report, keep, constant)


def _select_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, int(index.numel()), bias=linear.bias is not None)
    new = new.to(dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.copy_(linear.weight[index])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[index])
    return new


def _select_columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    new = nn.Linear(int(index.numel()), linear.out_features, bias=linear.bias is not None)
    new = new.to(dtype=linear.weight.dtype, device=linear.weight.device)
    new.weight.copy_(linear.weight[:, index])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new

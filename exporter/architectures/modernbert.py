"""ModernBERT (gte-modernbert, modernbert-embed, the classifiers fine-tuned from answerdotai/ModernBERT): a
pre-LayerNorm encoder with rotary positions, a fused ``Wqkv`` projection, a GeGLU feed-forward and a sliding window
on most layers.

- ``attn.Wqkv`` holds Q, K and V as three thirds of its rows, head ``h`` being rows ``h`` of each third; ``attn.Wo``
  columns ``h``. After loading, ``prepare`` splits it into three Linears (``Wqkv.q/k/v``, whose concatenation is the
  original output), so compaction, export and quantization see the same Q/K/V parts as in BERT.
- ``mlp.Wi`` gives ``2 x intermediate`` features: unit ``i`` is ``act(input_i) * gate_i`` with input row ``i`` and
  gate row ``I + i``, and ``mlp.Wo`` column ``i``. ``prepare`` splits it into ``Wi.input`` and ``Wi.gate``; a unit
  dies with either zero row (no biases: its product is exactly 0) or its zero output column (compaction's gated
  rules, exporter/compaction.py).
- Rotary positions (theta per layer type: 160,000 on global layers, 10,000 on sliding ones), positions 0..S-1
  whatever the padding; layers whose type is ``sliding_attention`` see keys within ``local_attention // 2`` tokens.
- ``embeddings.norm``, ``attn_norm`` (Identity on layer 0), ``mlp_norm`` and ``final_norm`` are LayerNorms,
  commonly without bias.
- The classification head is ``dense -> act -> norm`` on the CLS token or the masked mean
  (``classifier_pooling``), then ``classifier``; token classification and QA put the same head on every token.

transformers 4.57 keeps one rotary module per attention (``attn.rotary_emb``) and 5.x one per model with a buffer per
layer type; the export reads the inverse frequencies from whichever the live model holds. The fused graph runs each
layer as ``RotaryEmbedding`` x 2 + ``MultiHeadAttention`` with the padding (and band) mask as its
``attention_bias`` (graphs/fuse_rotary_attention.py), the CPU ``Attention`` kernel having no rotary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from exporter.architectures.base import Architecture, register
from exporter.forward_parts import Forward
from graphs.core.errors import CheckpointError

GLOBAL, SLIDING = "full_attention", "sliding_attention"


class SplitLinear(nn.Module):
    """A Linear stored as row blocks (``parts``), computed as the concatenation of their outputs: the same function
    as the fused Linear it came from, with each block a module compaction can narrow on its own."""

    def __init__(self, linear: nn.Linear, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        size = linear.out_features // len(names)
        for index, name in enumerate(names):
            part = nn.Linear(linear.in_features, size, bias=linear.bias is not None)
            part = part.to(dtype=linear.weight.dtype, device=linear.weight.device)
            with torch.no_grad():
                part.weight.copy_(linear.weight[index * size:(index + 1) * size])
                if linear.bias is not None:
                    part.bias.copy_(linear.bias[index * size:(index + 1) * size])
            setattr(self, name, part)

    @property
    def in_features(self) -> int:
        return int(getattr(self, self.names[0]).in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)


@register
class ModernBertArchitecture(Architecture):
    name = "modernbert"
    model_types = ("modernbert",)
    class_prefix = "ModernBert"
    input_names = ("input_ids", "attention_mask")
    layer_paths: ClassVar[dict[str, str]] = {
        "attention": "attn",
        "query": "attn.Wqkv.q",
        "key": "attn.Wqkv.k",
        "value": "attn.Wqkv.v",
        "output": "attn.Wo",
        "ffn_in": "mlp.Wi.input",
        "ffn_gate": "mlp.Wi.gate",
        "ffn_out": "mlp.Wo",
    }
    layers_path = "layers"
    activation_key = "hidden_activation"
    gated_ffn = True
    pre_norm = True
    config_names: ClassVar[dict[str, str]] = {
        "layers": "num_hidden_layers", "hidden": "hidden_size", "embedding": "hidden_size", "vocab": "vocab_size",
        "positions": "max_position_embeddings",
    }

    def parameter_estimate(self, config: Any) -> int:
        hidden, inter = self.hidden_size(config), self.intermediate_size(config)
        return self.vocab_size(config) * hidden + self.num_layers(config) * (4 * hidden * hidden + 3 * hidden * inter)

    def prepare(self, model: nn.Module) -> None:
        for layer in model.base_model.layers:
            if isinstance(layer.attn.Wqkv, nn.Linear):
                layer.attn.Wqkv = SplitLinear(layer.attn.Wqkv, ("q", "k", "v"))
            if isinstance(layer.mlp.Wi, nn.Linear):
                layer.mlp.Wi = SplitLinear(layer.mlp.Wi, ("input", "gate"))

    def activation(self, layer: nn.Module) -> Callable[[Any], Any]:
        return layer.mlp.act

    def heads(self, attention: nn.Module) -> int:
        return int(getattr(attention, "num_heads", None) or attention.config.num_attention_heads)

    def head_size(self, attention: nn.Module) -> int:
        return int(attention.head_dim)

    def set_heads(self, attention: nn.Module, heads: int, kept: Sequence[int] | None = None) -> None:
        # 4.57's forward reshapes with num_heads and all_head_size; 5.x's with -1 (either way the live forward
        # follows the narrowed Wqkv)
        attention.num_heads = heads
        attention.all_head_size = heads * attention.head_dim

    def check_pruned(self, config: Any) -> None:
        if any((getattr(config, "pruned_heads", None) or {}).values()):
            raise CheckpointError(
                "a ModernBERT checkpoint with config.pruned_heads: transformers has no head pruning for ModernBERT "
                "and its Wqkv cannot be narrowed per head from the config alone; export the unpruned checkpoint with "
                "the dead heads' weights zeroed, which export-model removes exactly")

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings)

    def task_head(self, model: nn.Module, task: str) -> tuple[tuple[str, ...], Forward] | None:
        if task == "feature-extraction":
            return None
        if not isinstance(getattr(model, "head", None), nn.Module):
            return None
        if task == "text-classification":
            return ("classifier",), _classification(str(getattr(model.config, "classifier_pooling", "cls")))
        if task == "token-classification":
            return ("classifier",), _token_classification
        return ("classifier",), _question_answering  # two labels: start and end logits

    # --- export forward -----------------------------------------------------------------------------------
    def export_patches(self, model: nn.Module, heads: tuple[int, ...],
                       own_activation: Callable[[object], None]) -> list[tuple[nn.Module, Forward]]:
        base, config = model.base_model, model.config
        types = layer_types(config)
        window = int(config.local_attention) // 2
        patches: list[tuple[nn.Module, Forward]] = [
            (base, _model(types, window, _inverse_frequencies(base, types))),
            (base.embeddings, _embeddings)]
        for view, count in zip(self.layers(model), heads, strict=True):
            layer = view.layer
            patches += [(layer, _layer), (layer.attn, _attention(count, self.head_size(view.attention))),
                        (layer.mlp, _mlp)]
            own_activation(layer.mlp.act)
        if getattr(model, "head", None) is not None:
            patches.append((model.head, _prediction_head))
            if getattr(config, "classifier_activation", None) == self.activation_name(config):
                own_activation(model.head.act)  # else the head's own activation module runs
        return patches

    def attention_pass(self, layer_norm: str) -> str | None:
        return "rotary"


def layer_types(config: Any) -> list[str]:
    """Each layer's attention type: ``config.layer_types`` (5.x), else every ``global_attn_every_n_layers``-th
    layer global (4.57)."""
    types = getattr(config, "layer_types", None)
    if types:
        return [str(t) for t in types]
    every = int(getattr(config, "global_attn_every_n_layers", 1) or 1)
    return [GLOBAL if i % every == 0 else SLIDING for i in range(int(config.num_hidden_layers))]


def _inverse_frequencies(base: nn.Module, types: list[str]) -> dict[str, torch.Tensor]:
    """Rotary inverse frequencies per layer type, read from the live model (5.x: one module, a buffer per type;
    4.57: one module per attention)."""
    rotary = getattr(base, "rotary_emb", None)
    found: dict[str, torch.Tensor] = {}
    for index, kind in enumerate(types):
        if kind in found:
            continue
        if rotary is not None and hasattr(rotary, f"{kind}_inv_freq"):
            found[kind] = getattr(rotary, f"{kind}_inv_freq").detach().float().clone()
            scaling = float(getattr(rotary, f"{kind}_attention_scaling", 1.0))
        else:
            own = base.layers[index].attn.rotary_emb
            found[kind] = own.inv_freq.detach().float().clone()
            scaling = float(getattr(own, "attention_scaling", 1.0))
        if scaling != 1.0:
            raise CheckpointError(f"rotary attention scaling {scaling} ({kind} layers): only default rotary exports")
    return found


# --- the forward ModernBERT's modules run during the trace (transformers' eager computation, op for op) -------


def rotary_tables(inv_freq: torch.Tensor, length: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, head_size) of positions 0..length-1, as ModernBertRotaryEmbedding computes them."""
    positions = torch.arange(length, dtype=torch.long)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _model(types: list[str], window: int, inv_freq: dict[str, torch.Tensor]) -> Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        hidden_states = self.embeddings(input_ids)
        length = input_ids.shape[1]
        dtype = hidden_states.dtype
        keep = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, S): which keys a query may see
        positions = torch.arange(length, dtype=torch.long)
        band = (positions[None, :] - positions[:, None]).abs() <= window  # (S, S)
        fill = torch.finfo(dtype).min
        masks = {GLOBAL: torch.where(keep.expand(-1, -1, length, -1), 0.0, fill).to(dtype),
                 SLIDING: torch.where(keep & band[None, None], 0.0, fill).to(dtype)}
        tables = {kind: rotary_tables(frequencies, length) for kind, frequencies in inv_freq.items()}
        for layer_module, kind in zip(self.layers, types, strict=True):
            cos, sin = tables[kind]
            hidden_states = layer_module(hidden_states, masks[kind], cos, sin)
        return self.final_norm(hidden_states), None

    return forward


def _embeddings(self: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return self.norm(self.tok_embeddings(input_ids))


def _layer(self: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> torch.Tensor:
    hidden_states = hidden_states + self.attn(self.attn_norm(hidden_states), mask, cos, sin)
    return hidden_states + self.mlp(self.mlp_norm(hidden_states))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(heads: int, head_size: int) -> Forward:
    width, scale = heads * head_size, head_size**-0.5

    def forward(self: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        qkv = self.Wqkv
        query = qkv.q(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        key = qkv.k(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        value = qkv.v(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        scores = scores + mask
        probs = nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return self.Wo(context.view(batch_size, -1, width))

    return forward


def _mlp(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.Wo(self.act(self.Wi.input(hidden_states)) * self.Wi.gate(hidden_states))


def _prediction_head(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.norm(self.act(self.dense(hidden_states)))


def _classification(pooling: str) -> Forward:
    if pooling not in ("cls", "mean"):
        raise CheckpointError(f"classifier_pooling {pooling!r}: expected 'cls' or 'mean'")

    def forward(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if pooling == "cls":
            features = sequence[:, 0]
        else:
            weights = attention_mask.unsqueeze(-1).to(sequence.dtype)
            features = (sequence * weights).sum(dim=1) / attention_mask.sum(dim=1, keepdim=True).to(sequence.dtype)
        return (self.classifier(self.head(features)),)

    forward.needs_mask = True  # type: ignore[attr-defined]
    return forward


def _token_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None
                          ) -> tuple[torch.Tensor, ...]:
    return (self.classifier(self.head(sequence)),)


def _question_answering(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None
                        ) -> tuple[torch.Tensor, ...]:
    logits = self.classifier(self.head(sequence))
    start_logits, end_logits = logits.split(1, dim=-1)
    return start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()

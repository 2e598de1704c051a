"""BERT (and the registry template for families that share its module layout)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from exporter.architectures.base import Architecture, register
from exporter.forward_parts import (
    Forward,
    buffer,
    intermediate,
    layers_in_order,
    pooler,
    residual_output,
)
from exporter.forward_parts import (
    position_ids as buffered_position_ids,
)

_BERT_LAYER_PATHS = {
    "attention": "attention.self",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "output": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}


@register
class BertArchitecture(Architecture):
    name = "bert"
    model_types = ("bert",)
    class_prefix = "Bert"
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    layer_paths = _BERT_LAYER_PATHS
    layers_path = "encoder.layer"

    def activation(self, layer: nn.Module) -> Callable[[Any], Any]:
        return layer.intermediate.intermediate_act_fn

    def heads(self, attention: nn.Module) -> int:
        return int(attention.num_attention_heads)

    def head_size(self, attention: nn.Module) -> int:
        return int(attention.attention_head_size)

    def set_heads(self, attention: nn.Module, heads: int, kept: Sequence[int] | None = None) -> None:
        attention.num_attention_heads = heads
        attention.all_head_size = heads * attention.attention_head_size

    def model_kwargs(self, task: str) -> dict[str, Any]:
        # The pooler is not part of optimum's feature-extraction output; leaving it out keeps it out of the graph.
        return {"add_pooling_layer": False} if task == "feature-extraction" else {}

    # --- export forward (exporter/export_forward.py) ---------------------------------------------------------
    def embeddings_forward(self, config: Any) -> Forward:
        return _bert_embeddings

    def base_forward(self) -> Forward:
        """The base model's forward: embeddings, the additive mask, the layers (and the pooler where present)."""
        return _bert_model

    def export_patches(self, model: nn.Module, heads: tuple[int, ...],
                       own_activation: Callable[[object], None]) -> list[tuple[nn.Module, Forward]]:
        base = model.base_model
        patches: list[tuple[nn.Module, Forward]] = [(base, self.base_forward()),
                                                    (base.embeddings, self.embeddings_forward(model.config)),
                                                    (base.encoder, layers_in_order)]
        for view, count in zip(self.layers(model), heads, strict=True):
            layer = view.layer
            patches += [
                (layer, _bert_layer),
                (layer.attention, _bert_attention),
                (layer.attention.self, _bert_self_attention(count, self.head_size(view.attention))),
                (layer.attention.output, residual_output),
                (layer.intermediate, intermediate),
                (layer.output, residual_output),
            ]
            own_activation(layer.intermediate.intermediate_act_fn)
        if getattr(base, "pooler", None) is not None:
            patches.append((base.pooler, pooler))
        return patches


# --- the forward BERT's modules run during the trace (transformers 4.57's eager computation, op for op) -----------


def _bert_model(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    input_shape = input_ids.size()
    batch_size, seq_length = input_shape
    if token_type_ids is None:  # RoBERTa's signature: zeros sliced from a constant, made here as 4.57 made them
        zeros = buffer(self.embeddings, "token_type_ids",
                        lambda: torch.zeros((1, self.embeddings.position_embeddings.num_embeddings), dtype=torch.long))
        token_type_ids = zeros[:, :seq_length].expand(batch_size, seq_length)
    embedding_output = self.embeddings(input_ids, token_type_ids)
    sequence_output = self.encoder(embedding_output, additive_mask(attention_mask, embedding_output.dtype))
    pooler = getattr(self, "pooler", None)
    pooled_output = pooler(sequence_output) if pooler is not None else None
    return sequence_output, pooled_output


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """get_extended_attention_mask of 4.57: one additive mask, computed once, added by every layer's scores."""
    extended_attention_mask = attention_mask[:, None, None, :]
    extended_attention_mask = extended_attention_mask.to(dtype=dtype)
    return (1.0 - extended_attention_mask) * torch.finfo(dtype).min


def _bert_embeddings(self: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
    input_shape = input_ids.size()
    seq_length = input_shape[1]
    position_ids = buffered_position_ids(self)[:, 0:seq_length]
    return summed_embeddings(self, input_ids, token_type_ids, position_ids)


def summed_embeddings(self: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                      position_ids: torch.Tensor) -> torch.Tensor:
    """word + token type + position embeddings, then the LayerNorm, in 4.57's order (what EmbedLayerNormalization
    fuses)."""
    inputs_embeds = self.word_embeddings(input_ids)
    token_type_embeddings = self.token_type_embeddings(token_type_ids)
    embeddings = inputs_embeds + token_type_embeddings
    position_embeddings = self.position_embeddings(position_ids)
    embeddings = embeddings + position_embeddings
    return self.LayerNorm(embeddings)


def _bert_layer(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    attention_output = self.attention(hidden_states, attention_mask)
    intermediate_output = self.intermediate(attention_output)
    return self.output(intermediate_output, attention_output)


def _bert_attention(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    context = self.self(hidden_states, attention_mask)
    return self.output(context, hidden_states)


def _bert_self_attention(heads: int, head_size: int) -> Forward:
    width = heads * head_size

    def forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch_size, seq_length, _ = hidden_states.shape
        query_layer = self.query(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        key_layer = self.key(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        value_layer = self.value(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(head_size)
        attention_scores = attention_scores + attention_mask
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (width,)
        return context_layer.view(new_context_layer_shape)

    return forward

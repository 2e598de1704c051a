"""DistilBERT: its own config names and module names."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from exporter.architectures.base import Architecture, register
from exporter.forward_parts import Forward, layers_in_order
from exporter.forward_parts import position_ids as buffered_position_ids


@register
class DistilBertArchitecture(Architecture):
    name = "distilbert"
    model_types = ("distilbert",)
    class_prefix = "DistilBert"
    input_names = ("input_ids", "attention_mask")
    layer_paths = {
        "attention": "attention",
        "query": "attention.q_lin",
        "key": "attention.k_lin",
        "value": "attention.v_lin",
        "output": "attention.out_lin",
        "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2",
    }
    layers_path = "transformer.layer"

    def num_layers(self, config: Any) -> int:
        return int(config.n_layers)

    def num_heads(self, config: Any) -> int:
        return int(config.n_heads)

    def hidden_size(self, config: Any) -> int:
        return int(config.dim)

    config_names: ClassVar[dict[str, str]] = {
        "layers": "n_layers", "hidden": "dim", "embedding": "dim", "vocab": "vocab_size",
        "positions": "max_position_embeddings",
    }

    def intermediate_size(self, config: Any) -> int:
        return int(config.hidden_dim)

    activation_key = "activation"

    def activation(self, layer: nn.Module) -> Callable[[Any], Any]:
        return layer.ffn.activation

    def heads(self, attention: nn.Module) -> int:
        return int(attention.n_heads)

    def head_size(self, attention: nn.Module) -> int:
        return int(attention.attention_head_size)

    def set_heads(self, attention: nn.Module, heads: int, kept: Sequence[int] | None = None) -> None:
        # forward() derives dim_per_head = dim // n_heads, so both must move together.
        attention.n_heads = heads
        attention.dim = heads * attention.attention_head_size

    # --- export forward (exporter/export_forward.py) ---------------------------------------------------------
    def export_patches(self, model: nn.Module, heads: tuple[int, ...],
                       own_activation: Callable[[object], None]) -> list[tuple[nn.Module, Forward]]:
        base = model.base_model
        patches: list[tuple[nn.Module, Forward]] = [(base, _distilbert_model), (base.embeddings, _distilbert_embeddings),
                                                    (base.transformer, layers_in_order)]
        for view, count in zip(self.layers(model), heads, strict=True):
            block = view.layer
            patches += [
                (block, _distilbert_block),
                (block.attention, _distilbert_attention(count, self.head_size(view.attention))),
                (block.ffn, _distilbert_ffn),
            ]
            own_activation(block.ffn.activation)
        return patches

    def classification_head(self, model: nn.Module) -> tuple[tuple[str, ...], Forward] | None:
        return ("pre_classifier", "classifier"), _distilbert_classification

    def attention_pass(self, layer_norm: str) -> str | None:
        return "distilbert"


# --- the forward DistilBERT's modules run during the trace (transformers 4.57's eager computation) --------------


def _distilbert_model(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    embeddings = self.embeddings(input_ids)
    return self.transformer(embeddings, attention_mask), None


def _distilbert_embeddings(self: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    input_embeds = self.word_embeddings(input_ids)
    seq_length = input_embeds.size(1)
    position_ids = buffered_position_ids(self)[:, :seq_length]
    position_embeddings = self.position_embeddings(position_ids)
    embeddings = input_embeds + position_embeddings
    return self.LayerNorm(embeddings)


def _distilbert_block(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    sa_output = self.attention(x, attn_mask)
    sa_output = self.sa_layer_norm(sa_output + x)
    ffn_output = self.ffn(sa_output)
    return self.output_layer_norm(ffn_output + sa_output)


def _distilbert_ffn(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.lin2(self.activation(self.lin1(x)))


def _distilbert_attention(heads: int, head_size: int) -> Forward:
    width = heads * head_size

    def forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bs, q_length, dim = x.size()
        k_length = x.size(1)
        mask_reshp = (bs, 1, 1, k_length)

        def shape(t: torch.Tensor) -> torch.Tensor:
            return t.view(bs, -1, heads, head_size).transpose(1, 2)

        q = shape(self.q_lin(x))
        k = shape(self.k_lin(x))
        v = shape(self.v_lin(x))
        q = q / math.sqrt(head_size)
        scores = torch.matmul(q, k.transpose(2, 3))
        masked = (mask == 0).view(mask_reshp).expand_as(scores)
        scores = scores.masked_fill(masked, torch.tensor(torch.finfo(scores.dtype).min))
        weights = nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(weights, v)
        context = context.transpose(1, 2).contiguous().view(bs, -1, width)
        return self.out_lin(context)

    return forward
def _distilbert_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    pooled_output = sequence[:, 0]
    pooled_output = self.pre_classifier(pooled_output)
    pooled_output = nn.ReLU()(pooled_output)
    return (self.classifier(pooled_output),)

"""DistilBERT: its own config names and module names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from exporter.architectures.base import Architecture, register


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
        "layers": "n_layers", "hidden": "dim", "vocab": "vocab_size", "positions": "max_position_embeddings",
    }

    def intermediate_size(self, config: Any) -> int:
        return int(config.hidden_dim)

    def activation_name(self, config: Any) -> str:
        return str(config.activation)

    def activation(self, layer: nn.Module) -> Callable[[Any], Any]:
        return layer.ffn.activation

    def heads(self, attention: nn.Module) -> int:
        return int(attention.n_heads)

    def head_size(self, attention: nn.Module) -> int:
        return int(attention.attention_head_size)

    def set_heads(self, attention: nn.Module, heads: int) -> None:
        # forward() derives dim_per_head = dim // n_heads, so both must move together.
        attention.n_heads = heads
        attention.dim = heads * attention.attention_head_size

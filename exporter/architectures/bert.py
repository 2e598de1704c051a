"""BERT (and the registry template for families that share its module layout)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from exporter.architectures.base import Architecture, register

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

    def set_heads(self, attention: nn.Module, heads: int) -> None:
        attention.num_attention_heads = heads
        attention.all_head_size = heads * attention.attention_head_size

    def model_kwargs(self, task: str) -> dict[str, Any]:
        # The pooler is not part of optimum's feature-extraction output; leaving it out keeps it out of the graph.
        return {"add_pooling_layer": False} if task == "feature-extraction" else {}

"""ELECTRA (the discriminators behind ELECTRA rerankers and classifiers): BERT's layers, an embedding table
narrower than the hidden size projected up by ``embeddings_project`` (electra-small: 128 -> 256), no pooler, and a
classification head of dense -> GELU -> out_proj on the first token."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from exporter.architectures.base import register
from exporter.architectures.bert import BertArchitecture, additive_mask
from exporter.forward_parts import Forward


@register
class ElectraArchitecture(BertArchitecture):
    name = "electra"
    model_types = ("electra",)
    class_prefix = "Electra"
    config_names: ClassVar[dict[str, str]] = {
        "layers": "num_hidden_layers", "hidden": "hidden_size", "embedding": "embedding_size",
        "vocab": "vocab_size", "positions": "max_position_embeddings",
    }

    def embedding_size(self, config: Any) -> int:
        return int(getattr(config, "embedding_size", None) or self.hidden_size(config))

    def model_kwargs(self, task: str) -> dict[str, Any]:
        return {}  # no pooler to leave out

    def base_forward(self) -> Forward:
        return _electra_model

    def classification_head(self, model: nn.Module) -> tuple[tuple[str, ...], Forward] | None:
        head = getattr(model, "classifier", None)
        if not all(isinstance(getattr(head, name, None), nn.Linear) for name in ("dense", "out_proj")):
            return None
        return (), _electra_classification


def _electra_model(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
    """BERT's base forward, with the embeddings projected up to the hidden size (where the table is narrower) and
    no pooler."""
    embedding_output = self.embeddings(input_ids, token_type_ids)
    project = getattr(self, "embeddings_project", None)
    if project is not None:
        embedding_output = project(embedding_output)
    return self.encoder(embedding_output, additive_mask(attention_mask, embedding_output.dtype)), None


def _electra_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None
                            ) -> tuple[torch.Tensor, ...]:
    x = sequence[:, 0, :]
    x = self.classifier.dense(x)
    x = nn.functional.gelu(x)
    return (self.classifier.out_proj(x),)

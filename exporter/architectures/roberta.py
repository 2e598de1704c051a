"""RoBERTa: BERT's module layout; no token type input in optimum's signature."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exporter.architectures.base import register
from exporter.architectures.bert import BertArchitecture
from exporter.forward_parts import Forward


@register
class RobertaArchitecture(BertArchitecture):
    name = "roberta"
    model_types = ("roberta",)
    class_prefix = "Roberta"
    input_names = ("input_ids", "attention_mask")

    def max_positions(self, config: object) -> int:
        # RoBERTa offsets positions by padding_idx + 1.
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1

    def embeddings_forward(self, config: Any) -> Forward:
        return _roberta_embeddings(int(config.pad_token_id))


def _roberta_embeddings(padding_idx: int) -> Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # create_position_ids_from_input_ids of 4.57: padding keeps padding_idx, tokens count from padding_idx + 1.
        mask = input_ids.ne(padding_idx).int()
        incremental_indices = (torch.cumsum(mask, dim=1).type_as(mask) + 0) * mask
        position_ids = incremental_indices.long() + padding_idx
        inputs_embeds = self.word_embeddings(input_ids)
        token_type_embeddings = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + token_type_embeddings
        position_embeddings = self.position_embeddings(position_ids)
        embeddings = embeddings + position_embeddings
        return self.LayerNorm(embeddings)

    return forward

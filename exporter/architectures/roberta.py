"""RoBERTa: BERT's module layout; no token type input in optimum's signature."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from exporter.architectures.base import register
from exporter.architectures.bert import BertArchitecture, summed_embeddings
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


def padded_position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """create_position_ids_from_input_ids of 4.57: padding keeps padding_idx, tokens count from padding_idx + 1."""
    mask = input_ids.ne(padding_idx).int()
    incremental_indices = (torch.cumsum(mask, dim=1).type_as(mask) + 0) * mask
    return incremental_indices.long() + padding_idx


def _roberta_embeddings(padding_idx: int) -> Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return summed_embeddings(self, input_ids, token_type_ids, padded_position_ids(input_ids, padding_idx))

    return forward

"""RoBERTa: BERT's module layout; no token type input in optimum's signature."""

from __future__ import annotations

from exporter.architectures.base import register
from exporter.architectures.bert import BertArchitecture


@register
class RobertaArchitecture(BertArchitecture):
    name = "roberta"
    model_types = ("roberta",)
    class_prefix = "Roberta"
    input_names = ("input_ids", "attention_mask")

    def max_positions(self, config: object) -> int:
        # RoBERTa offsets positions by padding_idx + 1.
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1

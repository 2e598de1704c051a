"""XLM-RoBERTa (multilingual-e5, bge-m3, bge-reranker-v2-m3): RoBERTa's modules and position offset under other
class names, with a SentencePiece (Unigram) tokenizer.json the runtime reads like any other."""

from __future__ import annotations

from exporter.architectures.base import register
from exporter.architectures.roberta import RobertaArchitecture


@register
class XLMRobertaArchitecture(RobertaArchitecture):
    name = "xlm-roberta"
    model_types = ("xlm-roberta",)
    class_prefix = "XLMRoberta"

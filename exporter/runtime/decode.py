"""Task outputs as a user wants them: labels and scores, answer spans, entity spans."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Label:
    label: str
    score: float


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float
    start: int  # character offsets into the context; 0, 0 for the empty (no) answer
    end: int


@dataclass(frozen=True)
class Entity:
    entity: str
    start: int  # character offsets into the text
    end: int
    score: float
    word: str


def softmax(values: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = np.exp(values - values.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def bio_tag(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label  # no B-/I- prefix: consecutive tokens of the label continue one entity


def group_entities(tokens: Sequence[tuple[str, float, int, int]], text: str) -> list[Entity]:
    """(label, score, start, end) per token -> entity spans (transformers' group_entities, "O" dropped)."""
    groups: list[list[tuple[str, float, int, int]]] = []
    for token in tokens:
        if groups:
            bi, tag = bio_tag(token[0])
            _, last_tag = bio_tag(groups[-1][-1][0])
            if tag == last_tag and bi != "B":
                groups[-1].append(token)
                continue
        groups.append([token])
    result = []
    for group in groups:
        entity = group[0][0].split("-", 1)[-1]
        if entity == "O":
            continue
        start, end = group[0][2], group[-1][3]
        result.append(Entity(entity, int(start), int(end), float(np.mean([t[1] for t in group])), text[start:end]))
    return result

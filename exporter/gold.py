"""Gold metrics on labelled data, as the usual references compute them (numpy only; no torch).

- classification: accuracy, and macro F1 over the labels that occur in the gold or the predictions (what
  scikit-learn's ``f1_score(average="macro")`` averages over);
- question answering: SQuAD exact match and F1 with the official evaluation scripts' normalization (lower case,
  punctuation and the articles a / an / the removed, whitespace collapsed), the best over each question's gold
  answers; an unanswerable question (SQuAD 2.0) has the single gold answer "" (so only an empty prediction
  scores); HasAns / NoAns breakdowns;
- token classification: entity-level precision / recall / F1 with seqeval's default (conlleval) chunking of
  IOB / IOBES tags, sequences joined as seqeval joins them;
- sentence similarity: Spearman rank correlation (ties get their average rank) of cosines with gold scores.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

# ----- classification -----


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / max(len(gold), 1)


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float:
    scores = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0


# ----- SQuAD -----

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 / v2.0 scripts' normalize_answer."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not wanted:  # SQuAD 2.0: an empty answer scores 1 only against an empty one
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """EM and F1 in percent (the scripts' scale), each the best over the question's gold answers ([] or [""] means
    unanswerable); with unanswerable questions present also HasAns_* / NoAns_* and their counts."""
    em, f1, has = [], [], []
    for prediction, golds in zip(predictions, answers, strict=True):
        golds = [g for g in golds if normalize_answer(g)] or [""]
        em.append(max(exact_match(prediction, g) for g in golds))
        f1.append(max(token_f1(prediction, g) for g in golds))
        has.append(golds != [""])
    result = {"exact_match": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1))}
    if not all(has):
        flags = np.array(has)
        for name, part in (("HasAns", flags), ("NoAns", ~flags)):
            result[f"{name}_total"] = int(part.sum())
            if part.any():
                result[f"{name}_exact_match"] = 100 * float(np.array(em)[part].mean())
                result[f"{name}_f1"] = 100 * float(np.array(f1)[part].mean())
    return result


# ----- entities (seqeval's default mode) -----


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(sequences: Sequence[Sequence[str]]) -> set[tuple[str, int, int]]:
    """(type, first, last) of every chunk, positions counted over the sequences joined with an "O" between them."""
    tags: list[str] = []
    for sequence in sequences:
        tags += [*sequence, "O"]
    found, prev_tag, prev_type, begin = set(), "O", "", 0
    for index, chunk in enumerate([*tags, "O"]):
        tag = chunk[0] if chunk else "O"
        type_ = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if chunk == "O":
            tag, type_ = "O", "_"
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            found.add((prev_type, begin, index - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = index
        prev_tag, prev_type = tag, type_
    return found


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    true, guessed = entities(gold), entities(predicted)
    correct = len(true & guessed)
    precision = correct / len(guessed) if guessed else 0.0
    recall = correct / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "entities": len(true)}


# ----- sentence similarity -----


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator else 0.0

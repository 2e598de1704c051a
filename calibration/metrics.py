"""Task metrics that compare an INT8 graph's outputs with its FP32 reference on held-out inputs.

A metric turns each batch of graph outputs into a small per-batch *summary* (pooled embeddings, logits), so an
accuracy check over many held-out batches holds summaries, never full hidden states. It then scores a
candidate's summaries against the reference's and states, per score, the minimum that a given
``max_accuracy_drop`` allows. :func:`relative_error` gives the continuous distance the fallback search ranks
nodes by; the scores are the pass/fail criterion.

=====================  ===========================================  ========================================
metric (task names)    scores                                       bars for ``max_accuracy_drop = d``
=====================  ===========================================  ========================================
embedding              mean_cosine, neighbour_agreement             cosine >= 1 - d, agreement >= 1 - 5 d
classification         argmax_agreement (+ accuracy_delta)          agreement >= 1 - d (delta >= -d)
question-answering     start/end_agreement, span_match              span_match >= 1 - d
token-classification   token_agreement                              agreement >= 1 - d
=====================  ===========================================  ========================================

Top-1 neighbour agreement gets five times the allowance because it is a rank decision over every held-out
text: a near tie between two neighbours flips on noise far below what changes any embedding measurably. At the
default ``d = 0.01`` the bars are the project's: cosine >= 0.99 and agreement >= 0.95.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]


class TaskMetric(ABC):
    """Compares candidate outputs with reference outputs; subclasses define the summary and the scores."""

    name: str = ""
    counted: str | None = None
    """The score that is the fraction of held-out examples whose decision agrees with FP32 (:meth:`agrees` gives it
    per example); None when no score counts examples."""

    @abstractmethod
    def summarize(self, outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
        """Reduce one batch's graph outputs (in graph output order) to the float32 summary the scores read."""

    @abstractmethod
    def scores(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
        """Scores of the candidate's per-batch summaries against the reference's (1.0 = identical)."""

    @abstractmethod
    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        """Minimum value per score that ``max_accuracy_drop`` (a fraction, 0.01 = 1%) allows."""

    def agrees(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
        """Per held-out example, whether the candidate makes the FP32 decision that :attr:`counted` counts."""
        raise NotImplementedError(f"the {self.name} metric counts no per-example decision")

    def min_examples(self, max_accuracy_drop: float) -> int:
        """Held-out examples needed before the bar on :attr:`counted` can allow one disagreement (0 when no
        score counts examples). With fewer, a 1% bar means none may change, and a search that falls nodes back
        until none does is chasing one or two near-tie examples, not the model's accuracy."""
        if self.counted is None:
            return 0
        allowance = 1.0 - self.bars(max_accuracy_drop)[self.counted]
        return math.ceil(1.0 / allowance - 1e-9) if allowance > 0 else 0


def failures(scores: Mapping[str, float], bars: Mapping[str, float]) -> list[str]:
    """Human-readable list of the scores below their bar (empty when every bar is met)."""
    return [f"{name} {scores[name]:.4f} < {bar:.4f}" for name, bar in bars.items() if scores[name] < bar]


def relative_error(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Squared distance of all summaries relative to the reference's squared norm (0.0 = identical).

    Non-finite reference entries (masked positions) are ignored.
    """
    error = norm = 0.0
    for ref, cand in zip(reference, candidate, strict=True):
        valid = np.isfinite(ref)
        error += float(np.square(cand[valid] - ref[valid]).sum())
        norm += float(np.square(ref[valid]).sum())
    return error / max(norm, 1e-30)


def _row_agrees(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    """Per row of the [rows, classes] summaries, whether the argmax agrees; rows that are all NaN (padding) are
    left out."""
    same = []
    for ref, cand in zip(reference, candidate, strict=True):
        valid = np.isfinite(ref).any(axis=-1)
        ref_max = np.nanargmax(np.where(np.isfinite(ref), ref, -np.inf), axis=-1)
        cand_max = np.nanargmax(np.where(np.isfinite(ref), cand, -np.inf), axis=-1)
        same.append((ref_max == cand_max)[valid])
    return np.concatenate(same) if same else np.zeros(0, bool)


def _fraction(agrees: np.ndarray) -> float:
    return float(agrees.sum()) / max(len(agrees), 1)


class EmbeddingMetric(TaskMetric):
    """Sentence embeddings: the graph's ``sentence_embedding`` (``outputs[1]``, the model's own pooling) where it
    has one, else mean pooling of ``outputs[0]`` over the attention mask; L2-normalised.

    Scores: ``mean_cosine`` between candidate and reference embeddings of the same text, and
    ``neighbour_agreement``, the fraction of texts whose nearest other held-out text (cosine) is the same
    under both. Needs at least 3 held-out texts for the agreement to mean anything.
    """

    name = "embedding"
    counted = "neighbour_agreement"

    def __init__(self, mask_input: str = "attention_mask") -> None:
        self.mask_input = mask_input

    def summarize(self, outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
        """[batch, 1 + seq, hidden]: row 0 the normalised pooled embedding; rows 1.. the unmasked token vectors
        scaled by 1 / (norm of the sample's token vectors), so a dot product of two summaries' token rows is
        the per-sample cosine that parity's INT8 gate measures (padded positions zero)."""
        hidden = outputs[0].astype(np.float32)
        if hidden.ndim == 2:  # already pooled (a sentence_embedding output)
            pooled = hidden / np.maximum(np.linalg.norm(hidden, axis=1, keepdims=True), 1e-12)
            return pooled[:, None, :]
        mask = feeds.get(self.mask_input)
        weights = np.ones(hidden.shape[:2], np.float32) if mask is None else mask.astype(np.float32)
        if len(outputs) > 1 and outputs[1].ndim == 2:  # the graph's sentence_embedding: judge on it
            pooled = outputs[1].astype(np.float32)
        else:
            pooled = (hidden * weights[..., None]).sum(1) / np.maximum(weights.sum(1, keepdims=True), 1.0)
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        tokens = hidden * weights[..., None]
        tokens /= np.maximum(np.sqrt((tokens**2).sum((1, 2), keepdims=True)), 1e-12)
        width = max(pooled.shape[-1], tokens.shape[-1])  # pooling several modes concatenates them: zero-pad
        pooled = np.pad(pooled, ((0, 0), (0, width - pooled.shape[-1])))  # (zeros change no dot product)
        tokens = np.pad(tokens, ((0, 0), (0, 0), (0, width - tokens.shape[-1])))
        return np.concatenate([pooled[:, None, :], tokens], axis=1)

    def agrees(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
        """Per text, whether its nearest other held-out text (pooled cosine) is the same under both."""
        ref_pooled, cand_pooled = np.concatenate(reference)[:, 0], np.concatenate(candidate)[:, 0]
        ref_sim, cand_sim = ref_pooled @ ref_pooled.T, cand_pooled @ cand_pooled.T
        np.fill_diagonal(ref_sim, -np.inf)
        np.fill_diagonal(cand_sim, -np.inf)
        return ref_sim.argmax(1) == cand_sim.argmax(1)

    def scores(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
        ref, cand = np.concatenate(reference), np.concatenate(candidate)
        cosine = float((ref[:, 0] * cand[:, 0]).sum(1).mean())
        scores = {"mean_cosine": cosine, "neighbour_agreement": float(self.agrees(reference, candidate).mean())}
        if ref.shape[1] > 1:
            scores["token_cosine"] = float((ref[:, 1:] * cand[:, 1:]).sum((1, 2)).mean())
        return scores

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        # token_cosine is the bar parity's INT8 gate applies to every token-level output.
        return {"mean_cosine": 1.0 - max_accuracy_drop, "neighbour_agreement": 1.0 - 5.0 * max_accuracy_drop,
                "token_cosine": 1.0 - max_accuracy_drop}


class ClassificationMetric(TaskMetric):
    """Sequence classification: ``outputs[0]`` are logits [batch, classes].

    Scores ``argmax_agreement``; with ``labels`` (one int per held-out example, in batch order) also
    ``accuracy_delta`` = candidate accuracy - reference accuracy, which must stay above ``-max_accuracy_drop``.
    """

    name = "classification"
    counted = "argmax_agreement"

    def __init__(self, labels: Sequence[int] | np.ndarray | None = None) -> None:
        self.labels = None if labels is None else np.asarray(labels)

    def summarize(self, outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
        return outputs[0].astype(np.float32)

    def agrees(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
        return _row_agrees(reference, candidate)

    def scores(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
        result = {"argmax_agreement": _fraction(self.agrees(reference, candidate))}
        if self.labels is not None:
            ref, cand = np.concatenate(reference).argmax(-1), np.concatenate(candidate).argmax(-1)
            if len(ref) != len(self.labels):
                raise ValueError(f"{len(self.labels)} labels for {len(ref)} held-out examples; pass one per example")
            # counts first: one changed decision in 100 is exactly -0.01, not -0.010000000000000009
            result["accuracy_delta"] = float(((cand == self.labels).sum() - (ref == self.labels).sum()) / len(ref))
        return result

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        bars = {"argmax_agreement": 1.0 - max_accuracy_drop}
        if self.labels is not None:
            bars["accuracy_delta"] = -max_accuracy_drop
        return bars


class QuestionAnsweringMetric(TaskMetric):
    """Extractive QA: ``outputs[0]`` / ``outputs[1]`` are start / end logits [batch, seq].

    Padding (attention mask 0) is excluded from the argmax. Scores ``start_agreement``, ``end_agreement`` and
    ``span_match`` (both agree: the exact-match of the predicted span against the FP32 span); the bar is on
    ``span_match``.
    """

    name = "question-answering"
    counted = "span_match"

    def __init__(self, mask_input: str = "attention_mask") -> None:
        self.mask_input = mask_input

    def summarize(self, outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
        logits = np.stack([outputs[0], outputs[1]], axis=1).astype(np.float32)  # [batch, 2, seq]
        mask = feeds.get(self.mask_input)
        if mask is not None:
            logits = np.where(mask[:, None, :] > 0, logits, np.nan)
        return logits

    @staticmethod
    def _same(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
        """[examples, 2]: whether the start / end argmax over unpadded positions agrees."""

        def argmax(batch: np.ndarray, like: np.ndarray) -> np.ndarray:
            return np.where(np.isfinite(like), batch, -np.inf).argmax(-1)  # [batch, 2]

        ref = np.concatenate([argmax(r, r) for r in reference])
        cand = np.concatenate([argmax(c, r) for r, c in zip(reference, candidate, strict=True)])
        return ref == cand

    def agrees(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
        return self._same(reference, candidate).all(1)

    def scores(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
        same = self._same(reference, candidate)
        return {
            "start_agreement": float(same[:, 0].mean()),
            "end_agreement": float(same[:, 1].mean()),
            "span_match": float(same.all(1).mean()),
        }

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        return {"span_match": 1.0 - max_accuracy_drop}


class TokenClassificationMetric(TaskMetric):
    """Token classification: ``outputs[0]`` are logits [batch, seq, labels]; ``token_agreement`` over real
    tokens (attention mask 1)."""

    name = "token-classification"

    def __init__(self, mask_input: str = "attention_mask") -> None:
        self.mask_input = mask_input

    def summarize(self, outputs: Sequence[np.ndarray], feeds: Feeds) -> np.ndarray:
        logits = outputs[0].astype(np.float32)
        mask = feeds.get(self.mask_input)
        return logits if mask is None else logits[mask > 0]  # [tokens, labels]

    def scores(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
        return {"token_agreement": _fraction(_row_agrees(reference, candidate))}

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        return {"token_agreement": 1.0 - max_accuracy_drop}


METRICS: dict[str, type[TaskMetric]] = {
    "embedding": EmbeddingMetric,
    "feature-extraction": EmbeddingMetric,
    "classification": ClassificationMetric,
    "text-classification": ClassificationMetric,
    "question-answering": QuestionAnsweringMetric,
    "token-classification": TokenClassificationMetric,
}
"""Metric per name; the pipeline's task names (``feature-extraction``, ``text-classification``, ...) work."""


def get_metric(metric: TaskMetric | str) -> TaskMetric:
    """``metric`` itself, or a default-constructed metric by name; raises ``ValueError`` naming the known ones."""
    if isinstance(metric, TaskMetric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown task metric {metric!r}; known: {sorted(METRICS)}")
    return METRICS[metric]()

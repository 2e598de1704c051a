"""Task metrics on hand-made outputs: each score moves when the thing it measures changes, padding is ignored."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.metrics import (
    ClassificationMetric,
    EmbeddingMetric,
    QuestionAnsweringMetric,
    TokenClassificationMetric,
    failures,
    get_metric,
    relative_error,
)
from calibration.quantize import QuantizationConfig


def test_classification_agreement_and_accuracy() -> None:
    metric = ClassificationMetric(labels=[0, 1, 1, 0])
    reference = [metric.summarize([np.array([[2.0, 1.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])], {})]
    candidate = [reference[0].copy()]
    candidate[0][3] = [0.0, 1.0]  # one of four flips, from right to wrong
    scores = metric.scores(reference, candidate)
    assert scores == {"argmax_agreement": 0.75, "accuracy_delta": -0.25}
    assert len(failures(scores, metric.bars(0.01))) == 2
    assert not failures(metric.scores(reference, reference), metric.bars(0.01))


def test_question_answering_ignores_padding() -> None:
    metric = QuestionAnsweringMetric()
    feeds = {"attention_mask": np.array([[1, 1, 1, 0], [1, 1, 1, 1]])}
    start = np.array([[0.0, 3.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    end = np.array([[0.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    reference = [metric.summarize([start, end], feeds)]
    start_q = start.copy()
    start_q[0, 3] = 99.0  # padding: must not count
    end_q = end.copy()
    end_q[1] = [0.0, 0.0, 6.0, 5.0]  # second example's end moves
    scores = metric.scores(reference, [metric.summarize([start_q, end_q], feeds)])
    assert scores == {"start_agreement": 1.0, "end_agreement": 0.5, "span_match": 0.5}
    assert failures(scores, metric.bars(0.01)) == ["span_match 0.5000 < 0.9900"]


def test_token_classification_counts_real_tokens_only() -> None:
    metric = TokenClassificationMetric()
    feeds = {"attention_mask": np.array([[1, 1, 0, 0]])}
    logits = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    flipped = logits.copy()
    flipped[0, 1] = [1.0, 0.0]  # a real token flips
    flipped[0, 3] = [0.0, 1.0]  # padding flips: ignored
    reference = [metric.summarize([logits], feeds)]
    assert metric.scores(reference, [metric.summarize([flipped], feeds)]) == {"token_agreement": 0.5}


def test_embedding_cosine_and_neighbour_agreement() -> None:
    metric = EmbeddingMetric()
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(6, 3, 8)).astype(np.float32)
    feeds = {"attention_mask": np.array([[1, 1, 0]] * 6)}
    reference = [metric.summarize([hidden], feeds)]
    padded = hidden.copy()
    padded[:, 2] += 100.0  # padding position: pooling ignores it
    assert metric.scores(reference, [metric.summarize([padded], feeds)]) == pytest.approx(
        {"mean_cosine": 1.0, "neighbour_agreement": 1.0, "token_cosine": 1.0}
    )
    swapped = hidden.copy()
    swapped[:, [0, 1]] = hidden[:, [1, 0]]  # same mean-pooled embedding, different tokens: only token_cosine sees it
    swap_scores = metric.scores(reference, [metric.summarize([swapped], feeds)])
    assert swap_scores["mean_cosine"] == pytest.approx(1.0) and swap_scores["token_cosine"] < 0.9
    noisy = [metric.summarize([hidden + rng.normal(scale=2.0, size=hidden.shape).astype(np.float32)], feeds)]
    scores = metric.scores(reference, noisy)
    assert scores["mean_cosine"] < 0.9 and failures(scores, metric.bars(0.01))
    assert metric.bars(0.01) == pytest.approx({"mean_cosine": 0.99, "neighbour_agreement": 0.95, "token_cosine": 0.99})
    assert relative_error(reference, reference) == 0.0 < relative_error(reference, noisy)


def test_get_metric_by_task_name() -> None:
    assert isinstance(get_metric("feature-extraction"), EmbeddingMetric)
    assert isinstance(get_metric("question-answering"), QuestionAnsweringMetric)
    with pytest.raises(ValueError, match="unknown task metric 'nope'"):
        get_metric("nope")


def test_bars_on_a_fraction_of_examples_get_enough_examples_to_allow_one_disagreement() -> None:
    for task in ("question-answering", "text-classification"):
        metric = get_metric(task)
        assert metric.min_examples(0.01) == 100
        bar = metric.bars(0.01)[next(iter(metric.bars(0.01)))]
        assert 1 - 1 / metric.min_examples(0.01) >= bar > 1 - 1 / (metric.min_examples(0.01) - 1)
        assert QuantizationConfig().validation_count(task) == 100
        assert QuantizationConfig(max_accuracy_drop=0.05).validation_count(task) == 64  # 20 < the default 64
        assert QuantizationConfig(validation_samples=128).validation_count(task) == 128
    assert get_metric("token-classification").min_examples(0.01) == 0  # counts tokens: thousands in 64 texts
    for task in ("feature-extraction", "token-classification"):
        assert QuantizationConfig().validation_count(task) == 64


def test_one_changed_label_in_a_hundred_is_exactly_a_one_percent_accuracy_drop() -> None:
    labels = np.arange(100) % 3
    for correct in range(1, 100):  # every reference accuracy
        reference = np.where(np.arange(100) < correct, labels, (labels + 1) % 3)
        candidate = reference.copy()
        candidate[0] = (candidate[0] + 1) % 3  # one right answer made wrong
        metric = ClassificationMetric(labels)
        scores = metric.scores([np.eye(3)[reference]], [np.eye(3)[candidate]])
        assert scores["accuracy_delta"] == -0.01
        assert not failures({"accuracy_delta": scores["accuracy_delta"]}, {"accuracy_delta": -0.01})


def test_embedding_search_size_follows_the_neighbour_bar() -> None:
    assert get_metric("feature-extraction").min_examples(0.01) == 20
    assert get_metric("feature-extraction").min_examples(0.002) == 100
    assert QuantizationConfig(max_accuracy_drop=0.002).validation_count("feature-extraction") == 100


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.array(rows, np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True))[:, None, :]  # [texts, 1, hidden]: pooled row only


def test_neighbour_agreement_per_text_is_the_nearest_other_text_under_both() -> None:
    rng = np.random.default_rng(0)
    reference = _unit(rng.normal(size=(12, 4)).tolist())
    candidate = _unit((reference[:, 0] + rng.normal(scale=0.3, size=(12, 4))).tolist())

    def nearest(x: np.ndarray, i: int) -> int:
        return max((j for j in range(len(x)) if j != i), key=lambda j: float(x[i, 0] @ x[j, 0]))

    expected = [nearest(reference, i) == nearest(candidate, i) for i in range(12)]
    assert 0 < sum(expected) < 12
    agrees = EmbeddingMetric().agrees([reference[:5], reference[5:]], [candidate[:5], candidate[5:]])
    np.testing.assert_array_equal(agrees, expected)
    assert EmbeddingMetric().agrees([reference], [reference]).all()


def test_span_agreement_ignores_padding_and_needs_start_and_end() -> None:
    nan = np.nan
    reference = np.array([[[1, 3, 2, nan], [0, 1, 5, nan]], [[4, 1, 0, 0], [0, 0, 1, 2]]], np.float32)
    candidate = np.array([[[1, 3, 2, 9], [0, 1, 5, 9]], [[4, 1, 0, 0], [0, 3, 1, 2]]], np.float32)
    np.testing.assert_array_equal(QuestionAnsweringMetric().agrees([reference], [candidate]), [True, False])

"""Accuracy-aware fallback on a tiny seeded BERT: a strict bar makes nodes go back to FP32 (recorded), the result
meets the bar, a lax bar changes nothing, and falling back every node gives the FP32 graph back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, sample_texts
from calibration.metrics import EmbeddingMetric, failures
from calibration.quantize import QuantizationConfig, QuantizationReport, quantize_model
from calibration.search import evaluate, fall_back, quantized_nodes
from graphs.core.errors import QuantizationError
from tests.calibration.conftest import tokenize


@pytest.fixture(scope="module")
def validation() -> list[dict[str, np.ndarray]]:
    _, heldout = split_texts(builtin_texts())
    return [tokenize(heldout[i : i + 16]) for i in range(0, 128, 16)]


class CosineMetric(EmbeddingMetric):
    """Mean cosine only: top-1 neighbours of a random-weight model's embeddings are near ties that flip on any
    noise, so the test's bar is on the continuous score."""

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        return {"mean_cosine": 1.0 - max_accuracy_drop}


def _quantize(
    model: Path,
    out: Path,
    config: QuantizationConfig,
    validation: list[dict[str, np.ndarray]] | None,
    metric: EmbeddingMetric | None = None,
) -> QuantizationReport:
    calibration, _ = split_texts(builtin_texts())
    sample, digest = sample_texts(calibration, config.samples, config.seed)
    reader = TextCalibrationReader(sample, tokenize, config.batch_size)
    return quantize_model(
        model, out, reader, config, digest, validation=validation, metric=metric or "embedding"
    )


@pytest.mark.parametrize("strategy", ["paired", "leave-one-out"])
def test_strict_bar_falls_back_the_most_harmful_nodes_until_met(
    sensitive_bert: Path, tmp_path: Path, validation: list[dict[str, np.ndarray]], strategy: str
) -> None:
    config = QuantizationConfig(samples=16, max_accuracy_drop=0.0003, search_ranking_batches=2, graph="unfused",
                                search_strategy=strategy)
    out = tmp_path / "strict.onnx"
    report = _quantize(sensitive_bert, out, config, validation, CosineMetric())

    search = report.search
    assert search is not None
    assert failures(search["scores_before"], search["bars"]), "the bar must be strict enough to force a fallback"
    assert search["metric"] == "embedding" and search["bars"] == {"mean_cosine": pytest.approx(0.9997)}
    assert 1 <= len(report.fallback_nodes) < 12
    assert report.fallback_nodes == [step["node"] for step in search["fallbacks"]]
    assert set(search["harm"]) == set(report.fallback_nodes) | set(quantized_nodes(onnx.load(str(out))))
    harms = [step["harm"] for step in search["fallbacks"]]
    assert harms == sorted(harms, reverse=True)  # most harmful first
    assert search["strategy"] == strategy
    assert report.quantized_nodes == 12 - len(report.fallback_nodes)
    assert set(report.fallback_nodes) <= set(report.float_nodes_kept)
    assert not failures(search["scores_after"], search["bars"])

    # Re-measure independently of the search: the written graph meets the bar against FP32.
    metric = CosineMetric()
    reference = evaluate(onnx.load(str(sensitive_bert)), validation, metric)
    written = evaluate(onnx.load(str(out)), validation, metric)
    assert not failures(metric.scores(reference, written), metric.bars(0.0003))


def test_lax_bar_falls_back_nothing(tiny_bert: Path, tmp_path: Path, validation: list[dict[str, np.ndarray]]) -> None:
    report = _quantize(tiny_bert, tmp_path / "lax.onnx", QuantizationConfig(samples=16, max_accuracy_drop=0.1, graph="unfused"),
                       validation)
    assert report.fallback_nodes == [] and report.quantized_nodes == 12
    assert report.search is not None and report.search["harm"] == {}


def test_falling_back_every_node_gives_the_fp32_graph(
    tiny_bert: Path, tmp_path: Path, validation: list[dict[str, np.ndarray]]
) -> None:
    out = tmp_path / "all.onnx"
    _quantize(tiny_bert, out, QuantizationConfig(samples=16, graph="unfused"), None)
    quantized, float_model = onnx.load(str(out)), onnx.load(str(tiny_bert))
    names = quantized_nodes(quantized)
    assert len(names) == 12
    restored = fall_back(quantized, float_model, names)
    assert not any(node.op_type in {"QuantizeLinear", "DequantizeLinear"} for node in restored.graph.node)
    metric = EmbeddingMetric()
    np.testing.assert_allclose(
        np.concatenate(evaluate(restored, validation[:2], metric)),
        np.concatenate(evaluate(float_model, validation[:2], metric)),
        atol=1e-5,
    )
    with pytest.raises(QuantizationError, match="not in both"):
        fall_back(quantized, float_model, ["no-such-node"])


class _Clock:
    """A fake time source: every reading is `step` seconds after the previous one."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("budget", [3.5, 12.5])
def test_a_search_out_of_time_puts_the_untested_nodes_back_and_says_so(
    sensitive_bert: Path, tmp_path: Path, validation: list[dict[str, np.ndarray]], budget: float
) -> None:
    """One clock reading per second: with 3.5 s the ranking stops after 3 of 12 nodes (the other 9 go back
    together, unranked); with 12.5 s every node is ranked, one fallback step is taken, and the time is up before
    the second: the other 11 go back at once. Either way the graph meets the bar and every step says why."""
    from calibration.search import search_fallback

    config = QuantizationConfig(samples=16, graph="unfused")
    out = tmp_path / "all.onnx"
    _quantize(sensitive_bert, out, config, None)
    quantized, float_model = onnx.load(str(out)), onnx.load(str(sensitive_bert))
    metric = CosineMetric()
    _, report = search_fallback(float_model, quantized, validation, metric, 0.0003, 2, budget_s=budget,
                                clock=_Clock(1.0), strategy="leave-one-out")
    assert failures(report.scores_before, report.bars)  # the strict bar forces a search
    assert not failures(report.scores_after, report.bars)
    reasons = [step.reason for step in report.fallbacks]
    if budget == 3.5:
        assert report.budget_reached == "ranking" and len(report.harm) == 3
        unranked = [step for step in report.fallbacks if step.harm is None]
        assert len(unranked) == 9 and all("not ranked" in r for r in reasons[:9])
    else:
        assert len(report.harm) == 12 and report.budget_reached == "falling back"
        assert reasons[0] == "most harmful node left" and reasons[1:] == ["not tried: the search's time budget "
                                                                          "ran out"] * 11
    assert report.to_dict()["budget_s"] == budget


def test_the_budget_is_validated() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="search_budget_s"):
            QuantizationConfig(search_budget_s=bad)

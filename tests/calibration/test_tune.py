"""--tune (calibration/tune.py): every CPU preset quantized, timed side by side, the fastest accurate one kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, sample_texts
from calibration.quantize import PRESETS, QuantizationConfig, QuantizationReport, quantize_model
from calibration.tune import CPU_CANDIDATES, candidate_config, tune_quantization
from graphs.core.errors import QuantizationError
from graphs.fusion import FusionConfig, GraphPlan, fuse_graph
from tests.calibration.conftest import tokenize


@pytest.fixture(scope="module")
def sources(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    fused = tmp_path_factory.mktemp("tune") / "model_optimized.onnx"
    fuse_graph(tiny_bert, fused, GraphPlan((4, 4), 64, "bert"), FusionConfig())
    return {"fused": fused, "unfused": tiny_bert}


def _reader() -> TextCalibrationReader:
    sample, _ = sample_texts(split_texts(builtin_texts())[0], 24, 0)
    return TextCalibrationReader(sample, tokenize, 8)


def _timing() -> dict[str, dict[str, np.ndarray]]:
    texts = split_texts(builtin_texts())[1]
    return {"b1": tokenize(texts[:1]), "b8": tokenize(texts[1:9])}


def test_candidate_keeps_the_users_options_and_takes_the_presets_own() -> None:
    base = QuantizationConfig(samples=300, seed=7, max_accuracy_drop=0.03, tune=True)
    config = candidate_config(base, "cpu-qoperator-u8s8")
    assert (config.samples, config.seed, config.max_accuracy_drop) == (300, 7, 0.03)
    assert (config.format, config.quantize_outputs, config.graph) == ("QOperator", True, "unfused")
    assert config.preset == "cpu-qoperator-u8s8" and not config.tune
    assert candidate_config(base, "cpu-avx512-vnni").uses_fused_graph
    # a recipe chosen for the run does not leak into the other candidates
    qoperator = QuantizationConfig.from_preset("cpu-qoperator-u8s8", samples=300, tune=True)
    default = candidate_config(qoperator, "cpu-avx512-vnni")
    assert default == dataclasses.replace(PRESETS["cpu-avx512-vnni"], samples=300)
    assert set(CPU_CANDIDATES) <= set(PRESETS) and "gpu-tensorrt-s8s8" not in CPU_CANDIDATES


def test_tune_times_every_candidate_and_keeps_the_fastest(sources: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "model_quantized.onnx"
    heldout = split_texts(builtin_texts())[1]
    validation = [tokenize(heldout[i : i + 16]) for i in range(0, 48, 16)]
    report, rows = tune_quantization(sources, out, _reader(), QuantizationConfig(tune=True), _timing(),
                                     validation=validation, metric="feature-extraction", rounds=3)
    assert [row["preset"] for row in rows] == list(CPU_CANDIDATES)
    timed = [row for row in rows if row["status"] == "ok"]
    assert len(timed) >= 2 and all(set(row["median_ms"]) == {"b1", "b8"} for row in timed)
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["preset"] == report.preset
    fastest = {label: min(row["median_ms"][label] for row in timed) for label in ("b1", "b8")}

    def score(row: dict) -> float:
        return sum(row["median_ms"][label] / fastest[label] for label in fastest)

    assert score(chosen[0]) == min(score(row) for row in timed)
    assert out.is_file() and onnx.load(str(out)).graph.node  # the chosen candidate's graph was written
    assert report.graph == chosen[0]["graph"]


def test_a_failing_candidate_is_recorded_not_chosen(sources: dict[str, Path], tmp_path: Path) -> None:
    def quantize(source: Path, output: Path, *args: object, **kwargs: object) -> QuantizationReport:
        config = args[1]
        if config.preset == "cpu-avx512-vnni":
            raise QuantizationError("refused for the test\nsecond line")
        return quantize_model(source, output, *args, **kwargs)

    report, rows = tune_quantization(sources, tmp_path / "q.onnx", _reader(), QuantizationConfig(tune=True),
                                     _timing(), rounds=1, quantize=quantize)
    failed = next(row for row in rows if row["preset"] == "cpu-avx512-vnni")
    assert failed == {"preset": "cpu-avx512-vnni", "graph": "fused", "status": "failed",
                      "reason": "refused for the test", "chosen": False}
    assert report.preset != "cpu-avx512-vnni"


def test_every_candidate_failing_is_one_error(sources: dict[str, Path], tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> QuantizationReport:
        raise QuantizationError("no")

    with pytest.raises(QuantizationError, match="every candidate preset failed"):
        tune_quantization(sources, tmp_path / "q.onnx", _reader(), dataclasses.replace(QuantizationConfig(), tune=True),
                          _timing(), quantize=refuse)
    assert not (tmp_path / "q.onnx").exists()


def test_an_onnxruntime_failure_in_a_candidate_is_recorded_not_fatal(sources: dict[str, Path], tmp_path: Path) -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    def quantize(source: Path, output: Path, *args: object, **kwargs: object) -> QuantizationReport:
        if args[1].preset == "cpu-avx512-vnni-unfused":
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : for the test")
        return quantize_model(source, output, *args, **kwargs)

    _, rows = tune_quantization(sources, tmp_path / "q.onnx", _reader(), QuantizationConfig(tune=True), _timing(),
                                rounds=1, quantize=quantize)
    failed = next(row for row in rows if row["preset"] == "cpu-avx512-vnni-unfused")
    assert failed["status"] == "failed" and "for the test" in failed["reason"] and not failed["chosen"]


def test_a_reader_without_rewind_is_refused_up_front(sources: dict[str, Path], tmp_path: Path) -> None:
    class OneShot:
        def get_next(self) -> None:
            return None

    with pytest.raises(QuantizationError, match="rewind"):
        tune_quantization(sources, tmp_path / "q.onnx", OneShot(), QuantizationConfig(tune=True), _timing())

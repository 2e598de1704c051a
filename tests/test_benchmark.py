"""The benchmark's bootstrap interval of an agreement and its paired latency ratios (benchmarks/benchmark.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.benchmark import _add_ratios, _interval, _ratio


def test_interval_brackets_the_mean_and_is_exact_when_all_agree() -> None:
    assert _interval(np.ones(50, bool)) == (1.0, 1.0)
    agrees = np.arange(200) % 10 != 0  # 0.9
    low, high = _interval(agrees)
    assert 0.84 < low < 0.9 < high < 0.95
    assert _interval(agrees) == (low, high)  # seeded


def test_ratios_pair_the_calls_of_each_round() -> None:
    # the machine slows down 3x for the last rounds: per round, the candidate always takes half the baseline's time
    base = [10.0, 10.0, 10.0, 30.0, 30.0]
    times = {"model.onnx": {1: base, 8: base}, "int8": {1: [b / 2 for b in base], 8: [b / 2 for b in base]}}
    rows = [{"variant": "model.onnx"}, {"variant": "int8"}, {"variant": "(export wall time s)"}]
    _add_ratios(rows, times, "model.onnx", "model_onnx")
    assert rows[1]["b1_vs_model_onnx"] == 0.5 and rows[1]["b8_vs_model_onnx_iqr"] == [0.5, 0.5]
    assert rows[0]["b1_vs_model_onnx"] == 1.0 and _ratio(rows[0], "b1_vs_model_onnx") == "1.00x"
    assert "b1_vs_model_onnx" not in rows[2]
    # one slow call of the candidate alone: the ratio of the medians would read 15 / 10 = 1.5x, the paired one 0.5x
    times["int8"][1] = [5.0, 5.0, 15.0, 15.0, 15.0]
    _add_ratios(rows, times, "model.onnx", "model_onnx")
    assert rows[1]["b1_vs_model_onnx"] == 0.5 and rows[1]["b1_vs_model_onnx_iqr"] == [0.5, 0.5]
    times["int8"][1] = [4.0, 5.0, 6.0, 15.0, 18.0]
    _add_ratios(rows, times, "model.onnx", "model_onnx")
    assert _ratio(rows[1], "b1_vs_model_onnx") == "0.50x (0.50-0.60)"
    _add_ratios(rows, times, "dense MiniLM model.onnx", "dense")  # not timed: no ratio
    assert "b1_vs_dense" not in rows[1]


def test_interval_resamples_whole_passages_when_questions_share_them() -> None:
    # 3 questions per passage that agree or fail together: 30 passages, not 90 independent examples
    agrees = np.repeat(np.arange(30) % 10 != 0, 3)
    passages = np.repeat(np.arange(30), 3)
    by_question, by_passage = _interval(agrees), _interval(agrees, groups=passages)
    assert by_passage[0] < by_question[0] and by_passage[1] >= by_question[1]
    assert _interval(np.ones(12, bool), groups=np.repeat(np.arange(4), 3)) == (1.0, 1.0)


def test_the_fine_tuned_kinds_get_labelled_rows_the_export_reads(tmp_path) -> None:  # noqa: ANN001
    from benchmarks.benchmark import labelled_file
    from benchmarks.finetune import TOPIC_GROUPS
    from exporter.eval_data import parse_fields, read_eval_data

    qa = read_eval_data(labelled_file("minilm-qa", tmp_path / "qa.jsonl"), "question-answering",
                        parse_fields("", "question-answering"), [])
    assert len(qa.examples) > 100 and qa.squad_version == "1.1"
    cls = read_eval_data(labelled_file("minilm-cls", tmp_path / "cls.jsonl"), "text-classification",
                         parse_fields("", "text-classification"), list(TOPIC_GROUPS))
    assert len(cls.examples) > 100 and {e.label for e in cls.examples} == set(TOPIC_GROUPS)
    assert labelled_file("minilm", tmp_path / "x.jsonl") is None
    qat = labelled_file("minilm-cls-qat", tmp_path / "qat.jsonl")  # the QAT model is scored on the same rows
    assert qat is not None and qat.read_text() == (tmp_path / "cls.jsonl").read_text()


def test_long_texts_are_unseen_real_text_of_the_asked_length() -> None:
    from benchmarks.benchmark import long_texts
    from calibration.corpus import builtin_texts, split_texts

    texts = long_texts(16, 3000)
    assert len(texts) == 16 and all(len(text) == 3000 for text in texts) and len(set(texts)) == 16
    calibration, heldout = split_texts(builtin_texts())
    # every text starts with a held-out passage, the first ones with passages of the report half
    starts = [next(p for p in heldout if text.startswith(p[:200])) for text in texts]
    assert not set(starts) & set(calibration) and starts[0] == heldout[1]


def test_render_shows_the_stage_and_search_rows() -> None:
    from benchmarks.benchmark import render

    rows = [{"kind": "seed000", "variant": "(stages)", "timings": {"load": 6.6, "quantize": 71.2},
             "stage_peak_rss_mb": {"load": 982.0, "quantize": 2900.0}, "export_s": 130.0},
            {"kind": "seed000", "variant": "(search)", "strategy": "paired", "metric": "question-answering",
             "back": 5, "back_nodes": ["Attention_2", "MatMul_1", "MatMul_7", "Attention_0", "MatMul_3"], "nodes": 49,
             "evaluations": 11, "search_s": 71.3, "quantize_s": 131.4}]
    text = render(rows, 2, 10)
    assert "whole export 130 s, peak RSS 2.83 GB | load 7 s / 0.96 GB, quantize 71 s / 2.83 GB" in text
    assert "INT8 search: paired (question-answering) | 5 of 49 nodes back in FP32 | 11 evaluations" in text
    assert "| Attention_2, MatMul_1, MatMul_7, Attention_0 and 1 more |" in text


def test_render_puts_the_qat_import_beside_the_calibrated_int8_of_the_model_before_qat() -> None:
    from benchmarks.benchmark import CALIBRATED, render

    base = [10.0, 10.0, 20.0]
    times = {"model.onnx": {1: base, 8: base}, "model_quantized.onnx": {1: [5.0, 5.0, 10.0], 8: [4.0, 4.0, 8.0]},
             CALIBRATED: {1: [5.0, 6.0, 12.0], 8: [4.0, 4.0, 8.0]}}
    accuracy = {"cosine": 0.99, "agreement": 0.98, "agreement_name": "argmax agreement", "agreement_ci": (0.96, 1.0)}
    rows = [{"kind": "minilm-cls-qat", "variant": name, "b1_ms": t[1][0], "b8_ms": t[8][0], "size_mb": 20.0,
             **accuracy, "gold_accuracy": gold} for (name, t), gold in zip(times.items(), (0.9, 0.88, 0.86), strict=True)]
    _add_ratios(rows, times, "model.onnx", "model_onnx")
    _add_ratios(rows, times, CALIBRATED, "calibrated")
    text = render(rows, 2, 3)
    line = next(line for line in text.splitlines() if "| model_quantized.onnx, learned scales" in line)
    # per round 5/5, 5/6, 10/12 at batch 1: median 0.83, quartiles 0.83-0.92; batch 8 equal in every round
    assert "(0.83x (0.83-0.92) / 1.00x of the calibrated one)" in line and "gold accuracy 0.880" in line
    assert "| 0.50x | 0.40x |" in line
    calibrated = next(line for line in text.splitlines() if CALIBRATED in line)
    assert "of the calibrated one" not in calibrated and "gold accuracy 0.860" in calibrated


def test_runs_default_pick_is_timed_as_served(monkeypatch) -> None:  # noqa: ANN001
    """The benchmark times what `run` serves: a pick no row already times (model_optimized.onnx on OpenVINO
    bf16) gets its own runner, compiled at the pick's hint; a pick some row times, or an onnxruntime file, none."""
    import copy

    from benchmarks.benchmark import _default_pick, _pick_runner
    from exporter.runtime import engines
    from graphs.core import openvino_sessions
    from tests.exporter.test_openvino import _manifest

    monkeypatch.setattr(engines, "version", lambda: "2026.4")
    monkeypatch.setattr(engines, "bf16_flags", lambda: ["amx_bf16"])
    compiled: list[tuple[str, str]] = []
    monkeypatch.setattr(openvino_sessions, "open_compiled",
                        lambda path, hint, threads: compiled.append((path.name, hint)) or "session")
    manifest = _manifest(3)  # OpenVINO bf16 of model.onnx, 3 ms: the fastest
    run, text = _default_pick(manifest)
    assert text == "model.onnx on OpenVINO CPU bf16"
    assert _pick_runner(run, Path("art"), {"OpenVINO bf16 model.onnx": None}, 2) == {} and compiled == []
    optimized = copy.deepcopy(manifest)
    optimized["parity"].append({"file": "model_optimized.onnx", "provider": engines.ENGINE, "precision": "bf16",
                                "status": "pass"})
    optimized["latency"][f"{engines.ENGINE} bf16"]["files"]["model_optimized.onnx"] = {
        "b1xs128": {"median_ms": 2}, "b8xs128": {"median_ms": 16}}
    runners = _pick_runner(_default_pick(optimized)[0], Path("art"), {"OpenVINO bf16 model.onnx": None}, 2)
    assert list(runners) == ["model_optimized.onnx (OpenVINO bf16, run's pick)"]
    assert compiled == [("model_optimized.onnx", "bf16")]
    run, text = _default_pick(_manifest(6))
    assert _pick_runner(run, Path("art"), {}, 2) == {}  # onnxruntime's INT8 file: its own row
    assert text == "model_quantized.onnx on CPUExecutionProvider"

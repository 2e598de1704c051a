"""Gold metrics on the user's labelled data (``--eval-data``: exporter/eval_data.py, gold.py, evaluation.py).

Each figure is checked against an independent computation: transformers' own predictions counted by the test
(classification), the official SQuAD scoring applied to transformers' question-answering pipeline where the
installed transformers has one (4.57) or to a PyTorch span search written in the test (5.x, which removed it),
seqeval on the PyTorch model's own argmax tags (token classification), scipy's Spearman (similarity).
"""

from __future__ import annotations

import json
import re
import shutil
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter import gold
from exporter.eval_data import parse_fields, read_eval_data
from graphs.core.errors import EvalDataError

REPO = Path(__file__).resolve().parents[2]
WORDS = ["river", "bridge", "market", "storm", "garden", "engine", "letter", "harbour", "violin", "desert"]


# ----- the metrics against the references -----


def _official_normalize(s: str) -> str:
    """normalize_answer of the official SQuAD v2.0 evaluation script, verbatim in substance."""
    def remove_articles(text: str) -> str:
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(gold_answer: str, prediction: str) -> float:
    gold_toks = _official_normalize(gold_answer).split() if gold_answer else []
    pred_toks = _official_normalize(prediction).split() if prediction else []
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return float(gold_toks == pred_toks)
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _official_scores(predictions: list[str], answers: list[list[str]]) -> tuple[float, float]:
    em, f1 = [], []
    for prediction, golds in zip(predictions, answers, strict=True):
        golds = [a for a in golds if _official_normalize(a)] or [""]
        em.append(max(float(_official_normalize(a) == _official_normalize(prediction)) for a in golds))
        f1.append(max(_official_f1(a, prediction) for a in golds))
    return 100 * float(np.mean(em)), 100 * float(np.mean(f1))


def test_squad_scores_follow_the_official_script() -> None:
    predictions = ["The Eiffel Tower!", "in 1889", "", "Paris, France", "a tower", ""]
    answers = [["Eiffel Tower"], ["1889", "in 1889 AD"], [], ["Paris"], ["the tower of Pisa"], ["Rome"]]
    scores = gold.squad_scores(predictions, answers)
    em, f1 = _official_scores(predictions, answers)
    assert scores["exact_match"] == pytest.approx(em) and scores["f1"] == pytest.approx(f1)
    assert scores["NoAns_total"] == 1 and scores["NoAns_exact_match"] == 100.0 and scores["HasAns_total"] == 5


def test_entity_chunks_follow_seqeval() -> None:
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval not installed (the main stack's `reference` "
                                  "extra installs it)")
    rng = np.random.default_rng(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG", "B-ORG"]
    for _ in range(50):  # random, often ill-formed, sequences: I- starts, type changes
        true = [[tags[i] for i in rng.integers(0, len(tags), rng.integers(1, 12))] for _ in range(4)]
        pred = [[tags[i] for i in rng.integers(0, len(tags), len(s))] for s in true]
        scores = gold.entity_scores(true, pred)
        assert scores["f1"] == pytest.approx(seqeval.f1_score(true, pred))
        assert scores["precision"] == pytest.approx(seqeval.precision_score(true, pred))
        assert scores["recall"] == pytest.approx(seqeval.recall_score(true, pred))


def test_spearman_and_macro_f1_follow_scipy_and_scikit_learn() -> None:
    stats = pytest.importorskip("scipy.stats")
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=40), rng.integers(0, 5, 40).astype(float)  # ties in b
    assert gold.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    true, pred = [str(x) for x in rng.integers(0, 4, 60)], [str(x) for x in rng.integers(0, 5, 60)]
    assert gold.macro_f1(true, pred) == pytest.approx(metrics.f1_score(true, pred, average="macro"))


# ----- reading labelled files -----

LABELS = ["negative", "neutral", "positive"]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rows_are_read_per_task(tmp_path: Path) -> None:
    data = read_eval_data(_write(tmp_path / "c.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": "neutral",
                                                                                    "text_pair": "c"}]),
                          "text-classification", parse_fields("", "text-classification"), LABELS)
    assert [e.label for e in data.examples] == ["positive", "neutral"] and data.examples[1].text_pair == "c"
    (tmp_path / "c.csv").write_text("sentence,intent\nhello there,1\nbye,positive\n")
    data = read_eval_data(tmp_path / "c.csv", "text-classification",
                          parse_fields("text=sentence,label=intent", "text-classification"), LABELS)
    assert [(e.text, e.label) for e in data.examples] == [("hello there", "neutral"), ("bye", "positive")]
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Rain fell on Monday.", "qas": [
        {"id": "q1", "question": "When?", "answers": [{"text": "Monday", "answer_start": 13}]},
        {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    data = read_eval_data(tmp_path / "s.json", "question-answering", parse_fields("", "question-answering"), [])
    assert data.squad_version == "2.0" and [e.answers for e in data.examples] == [["Monday"], []]
    data = read_eval_data(_write(tmp_path / "q.jsonl", [{"question": "When?", "context": "Rain fell on Monday.",
                                                         "answers": {"text": ["Monday"], "answer_start": [13]}}]),
                          "question-answering", parse_fields("", "question-answering"), [])
    assert data.squad_version == "1.1"
    ner = ["O", "B-PER", "I-PER"]
    data = read_eval_data(_write(tmp_path / "t.jsonl", [{"tokens": ["Ann", "Lee", "ran"], "ner_tags": [1, 2, 0]}]),
                          "token-classification", parse_fields("", "token-classification"), ner)
    assert data.examples[0].tags == ["B-PER", "I-PER", "O"]


BAD = {
    "missing-field": ("text-classification", [{"text": "a", "label": 0}, {"sentence": "b", "label": 1}], "line 2",
                      "no field 'text'"),
    "unknown-label": ("text-classification", [{"text": "a", "label": "great"}], "line 1", "id2label"),
    "label-id-out-of-range": ("text-classification", [{"text": "a", "label": 7}], "line 1", "neither an id"),
    "answer-not-at-start": ("question-answering", [{"question": "q?", "context": "Rain on Monday.",
                                                    "answers": {"text": ["Monday"], "answer_start": [3]}}],
                            "line 1", "not at character 3"),
    "answer-not-in-context": ("question-answering", [{"question": "q?", "context": "Rain on Monday.",
                                                      "answers": ["Tuesday"]}], "line 1", "does not occur"),
    "tags-length": ("token-classification", [{"tokens": ["a", "b"], "ner_tags": [0]}], "line 1", "one tag per word"),
    "score-not-number": ("feature-extraction", [{"sentence1": "a", "sentence2": "b", "score": "high"}], "line 1",
                         "finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_row_is_one_line_naming_it(tmp_path: Path, case: str) -> None:
    task, rows, where, what = BAD[case]
    labels = LABELS if task == "text-classification" else ["O", "B-X", "I-X"]
    with pytest.raises(EvalDataError) as error:
        read_eval_data(_write(tmp_path / "bad.jsonl", rows), task, parse_fields("", task), labels)
    message = str(error.value)
    assert "\n" not in message and where in message and what in message, message


def test_malformed_squad_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps({"data": [{"title": "t"}]}))
    with pytest.raises(EvalDataError, match=r"data\[0\] has no 'paragraphs'"):
        read_eval_data(tmp_path / "s.json", "question-answering", parse_fields("", "question-answering"), [])
    with pytest.raises(EvalDataError, match="KEY=NAME"):
        parse_fields("colour=red", "text-classification")


def test_the_cli_refuses_bad_eval_data_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    from tests.checkpoints import tiny_checkpoint

    model = tiny_checkpoint(tmp_path / "ck", "bert", "text-classification", pruned_heads={}).path
    bad = _write(tmp_path / "bad.jsonl", [{"text": "fine", "label": 0}, {"text": "x", "label": "LABEL_9"}])
    out = tmp_path / "art"
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(model), "--output", str(out),
                           "--eval-data", str(bad)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("export-model: error")]
    assert len(errors) == 1 and "line 2" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]


# ----- whole exports -----


def _export(model: Path, out: Path, data: Path, *extra: str) -> dict[str, Any]:
    from exporter.cli import main

    assert main(["--model", str(model), "--output", str(out), "--calibration-samples", "16", "--eval-data",
                 str(data), *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _sentences(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(3, 12))) for _ in range(count)]


def _rows_for_every_file(manifest: dict[str, Any]) -> None:
    files = {(r["file"], r["provider"]) for r in manifest["evaluation"]}
    assert ("pytorch", "torch CPU") in files
    for name in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx"):
        assert (name, "CPUExecutionProvider") in files
    for row in manifest["evaluation"]:
        assert row["examples"] == manifest["eval_data"]["reported_examples"] and row["latency_ms_mean"] > 0


@pytest.fixture(scope="module")
def classification(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, Any]]]:
    from tests.checkpoints import tiny_checkpoint

    root = tmp_path_factory.mktemp("eval-cls")
    model = tiny_checkpoint(root / "ck", "bert", "text-classification", seed=3, pruned_heads={}).path
    rows = [{"text": t, "label": ["LABEL_0", "LABEL_1", "LABEL_2"][i % 3] if i % 2 else i % 3}
            for i, t in enumerate(_sentences(60, 0))]
    data = _write(root / "cls.jsonl", rows)
    _export(model, root / "art", data, "--max-accuracy-drop", "0.9")
    return model, root / "art", rows


def test_classification_gold_accuracy_counts_transformers_own_predictions(
        classification: tuple[Path, Path, list[dict[str, Any]]]) -> None:
    import torch
    import transformers

    model_path, out, rows = classification
    manifest = json.loads((out / "manifest.json").read_text())
    _rows_for_every_file(manifest)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    with torch.no_grad():
        predicted = model(**tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                                      return_tensors="pt")).logits.argmax(-1).tolist()
    wanted = [r["label"] if isinstance(r["label"], int) else int(r["label"][-1]) for r in rows]
    # The search judged on every 4th row (from the first); the reported figures are on the others.
    assert manifest["eval_data"]["search"]["metric"] == "gold-accuracy"
    reported = [i for i in range(len(rows)) if i % 4]
    correct = sum(predicted[i] == wanted[i] for i in reported)
    rows = [rows[i] for i in reported]
    torch_row = next(r for r in manifest["evaluation"] if r["file"] == "pytorch")
    assert torch_row["metrics"]["correct"] == correct and torch_row["value"] == correct / len(rows)
    assert 0 < correct < len(rows)  # a seeded random head: some right, some wrong, so the count means something
    fp32 = [r for r in manifest["evaluation"] if r["file"] in ("model.onnx", "model_optimized.onnx")]
    assert all(r["metrics"]["correct"] == correct for r in fp32)
    report = (out / "report.md").read_text()
    assert "## Accuracy on the labelled data" in report and report.count("| model") >= 3
    assert 'id="gold-bubbles"' in (out / "report.html").read_text()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium); .ci/run installs it")
def test_the_report_draws_the_gold_bubble_chart(classification: tuple[Path, Path, list[dict[str, Any]]],
                                                tmp_path: Path) -> None:
    from PIL import Image

    from exporter.report_plots import BASELINE
    from tests.exporter.test_report_html import _count, _rgb, _screenshot

    _, out, _ = classification
    html = (out / "report.html").read_text()
    pages = {"with": html, "without": re.sub(r'<svg id="gold-bubbles".*?</svg>', "", html, flags=re.S)}
    seen = {}
    for name, page in pages.items():
        path = tmp_path / f"{name}.html"
        path.write_text(page)
        png = tmp_path / f"{name}.png"
        _screenshot(path, png, tmp_path)
        seen[name] = _count(Image.open(png).convert("RGB"), _rgb(BASELINE))
    assert seen["with"] > 200 and seen["without"] == 0, seen


def test_token_classification_entity_f1_is_seqeval_on_the_models_own_tags(tmp_path: Path) -> None:
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval not installed (the main stack's `reference` "
                                  "extra installs it)")
    import torch
    import transformers

    from tests.checkpoints import tiny_checkpoint

    model_path = tiny_checkpoint(tmp_path / "ck", "bert", "token-classification", seed=5, pruned_heads={}).path
    config = json.loads((model_path / "config.json").read_text())
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"][:len(config["id2label"])]  # IOB names for the seeded head
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    (model_path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(2)
    rows = [{"tokens": s.split(), "ner_tags": [int(t) for t in rng.integers(0, len(names), len(s.split()))]}
            for s in _sentences(40, 1)]
    manifest = _export(model_path, tmp_path / "art", _write(tmp_path / "ner.jsonl", rows), "--max-accuracy-drop",
                       "0.9")
    _rows_for_every_file(manifest)
    model = transformers.AutoModelForTokenClassification.from_pretrained(model_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    predicted = []
    for row in rows:
        encoding = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="pt")
        with torch.no_grad():
            best = model(**encoding).logits[0].argmax(-1).tolist()
        tags, seen = ["O"] * len(row["tokens"]), set()
        for position, word in enumerate(encoding.word_ids(0)):
            if word is not None and word not in seen:
                seen.add(word)
                tags[word] = names[best[position]]
        predicted.append(tags)
    true = [[names[t] for t in row["ner_tags"]] for row in rows]
    true = [t for i, t in enumerate(true) if i % 4]  # the reported rows: the search judged on every 4th
    predicted = [t for i, t in enumerate(predicted) if i % 4]
    torch_row = next(r for r in manifest["evaluation"] if r["file"] == "pytorch")
    assert torch_row["value"] == pytest.approx(seqeval.f1_score(true, predicted))
    assert 0 < torch_row["value"] < 1


def test_similarity_spearman_of_the_pytorch_embeddings(tmp_path: Path) -> None:
    stats = pytest.importorskip("scipy.stats")
    import torch
    import transformers

    from tests.checkpoints import tiny_checkpoint

    model_path = tiny_checkpoint(tmp_path / "ck", "bert", "feature-extraction", seed=7, pruned_heads={}).path
    first, second = _sentences(30, 3), _sentences(30, 4)
    scores = np.random.default_rng(5).uniform(0, 5, 30).round(1)
    rows = [{"sentence1": a, "sentence2": b, "score": float(s)} for a, b, s in zip(first, second, scores, strict=True)]
    manifest = _export(model_path, tmp_path / "art", _write(tmp_path / "sts.jsonl", rows))
    _rows_for_every_file(manifest)
    model = transformers.AutoModel.from_pretrained(model_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1)).numpy()

    a, b = embed(first), embed(second)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    torch_row = next(r for r in manifest["evaluation"] if r["file"] == "pytorch")
    assert torch_row["metric"] == "spearman"
    assert torch_row["value"] == pytest.approx(stats.spearmanr(cosines, scores).statistic, abs=1e-6)


def _pipeline_answers(model_path: Path, questions: list[tuple[str, str]], impossible: bool) -> list[str]:
    """transformers' question-answering pipeline where it exists (4.57; align_to_words=False, its defaults
    otherwise: 384-token windows, stride 128, answers of at most 15 tokens), else the same search written out
    in PyTorch (tests/exporter/test_runtime.py's, checked against the pipeline's behaviour there)."""
    import transformers

    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    try:
        qa = transformers.pipeline("question-answering", model=model, tokenizer=tokenizer, device="cpu")
    except (KeyError, ValueError):  # transformers 5 removed the question-answering pipeline
        from tests.exporter.test_runtime import _torch_answer

        return [_torch_answer(model, tokenizer, q, c, impossible)[0] for q, c in questions]
    return [qa(question=q, context=c, handle_impossible_answer=impossible, align_to_words=False)["answer"]
            for q, c in questions]


@pytest.mark.slow
def test_qa_em_and_f1_on_a_squad_2_file_follow_the_official_scoring_of_the_pipeline(tmp_path: Path) -> None:
    """Must-show: EM / F1 of the PyTorch checkpoint within 0.1 point of the official SQuAD scoring of
    transformers' pipeline on the same SQuAD 2.0 file (answerable questions on held-out passages, some longer than
    one window, and unanswerable ones); every artifact file has its EM / F1."""
    from benchmarks.finetune import finetune, qa_examples
    from calibration.corpus import builtin_texts, split_texts

    model_path = finetune(tmp_path / "qa", "question-answering", steps=60, log=False)
    heldout = split_texts(builtin_texts())[1]
    spans = qa_examples(heldout, sentences=1)[:120]
    unanswerable = [(s.question, heldout[-1 - i]) for i, s in enumerate(spans[:40])
                    if s.context != heldout[-1 - i]]
    squad = {"version": "v2.0", "data": [{"title": "held-out", "paragraphs": [
        *({"context": s.context, "qas": [{"id": f"a{i}", "question": s.question, "answers": [
            {"text": s.context[s.start:s.end], "answer_start": s.start}]}]} for i, s in enumerate(spans)),
        *({"context": c, "qas": [{"id": f"n{i}", "question": q, "answers": [], "is_impossible": True}]}
          for i, (q, c) in enumerate(unanswerable))]}]}
    data = tmp_path / "dev-v2.0.json"
    data.write_text(json.dumps(squad))
    manifest = _export(model_path, tmp_path / "art", data)
    _rows_for_every_file(manifest)
    assert manifest["eval_data"]["squad_version"] == "2.0"
    questions = [(s.question, s.context) for s in spans] + unanswerable
    golds = [[s.context[s.start:s.end]] for s in spans] + [[] for _ in unanswerable]
    reported = [i for i in range(len(questions)) if i % 4]  # the search judged on every 4th question
    answers = _pipeline_answers(model_path, [questions[i] for i in reported], impossible=True)
    em, f1 = _official_scores(answers, [golds[i] for i in reported])
    torch_row = next(r for r in manifest["evaluation"] if r["file"] == "pytorch")
    print(f"pytorch EM {torch_row['metrics']['exact_match']:.2f} F1 {torch_row['metrics']['f1']:.2f}; "
          f"official scoring of the reference answers: EM {em:.2f} F1 {f1:.2f}")
    assert abs(torch_row["metrics"]["exact_match"] - em) <= 0.1 and abs(torch_row["metrics"]["f1"] - f1) <= 0.1
    assert torch_row["metrics"]["NoAns_total"] == sum(not golds[i] for i in reported)
    assert torch_row["metrics"]["HasAns_total"] == sum(bool(golds[i]) for i in reported)
    assert f1 > 10  # a model that answers something: the comparison is not between two zeros
    for row in manifest["evaluation"]:
        assert {"exact_match", "f1", "HasAns_f1", "NoAns_f1"} <= set(row["metrics"]), row["file"]

    # Must-show 4: the search judged on gold F1 keeps at least as many nodes INT8 as the agreement-judged search
    # of the same model, at a gold F1 drop within the bar (1 point at the default 0.01) on the reported part.
    search = manifest["quantization"]["search"]
    assert search["metric"] == "gold-f1" and manifest["eval_data"]["search"]["examples"] == len(questions) - len(reported)
    from exporter.cli import main

    assert main(["--model", str(model_path), "--output", str(tmp_path / "plain"), "--calibration-samples", "16"]) == 0
    plain = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    gold_nodes, plain_nodes = manifest["quantization"]["quantized_nodes"], plain["quantization"]["quantized_nodes"]
    f1s = {r["file"]: r["metrics"]["f1"] for r in manifest["evaluation"]}
    print(f"INT8 nodes: gold-F1 search {gold_nodes} ({len(search['fallback_nodes'])} back), agreement search "
          f"{plain_nodes} ({len(plain['quantization']['search']['fallback_nodes'])} back); reported F1 "
          + ", ".join(f"{k} {v:.2f}" for k, v in f1s.items()))
    assert gold_nodes >= plain_nodes
    assert f1s["model_optimized.onnx"] - f1s["model_quantized.onnx"] <= 100 * 0.01 + 1e-9

"""The benchmark's fine-tuned task models: labels that mean what they say, training on calibration text only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from benchmarks.finetune import (
    QUESTION_WORDS,
    TOPIC_GROUPS,
    Span,
    answer_tokens,
    distill_pruned,
    finetune,
    qa_examples,
    topic_label,
)
from calibration.corpus import builtin_passages, builtin_texts, split_texts
from exporter.text import as_pair
from tests.checkpoints import minilm_path


def test_builtin_passages_are_the_builtin_texts_with_their_topic() -> None:
    passages = builtin_passages()
    assert [text for _, text in passages] == builtin_texts()
    assert {topic for topic, _ in passages} >= {"compound", "types", "string-methods", "comparisons"}


def test_topic_groups_cover_every_class() -> None:
    labels = [topic_label(topic) for topic, _ in builtin_passages()]
    assert topic_label("compound") == 0 and topic_label("comparisons") == 1 and topic_label("typesmapping") == 2
    assert {labels.count(i) for i in range(len(TOPIC_GROUPS))} != {0}
    assert min(labels.count(i) for i in range(len(TOPIC_GROUPS))) > 100


def test_qa_question_on_the_first_sentence_is_the_pipelines_question() -> None:
    _, heldout = split_texts(builtin_texts())
    examples = qa_examples(heldout, sentences=1)
    assert len(examples) > 100
    for example in examples:
        assert as_pair(example.context) == (example.question, example.context)
        question_words = example.question[:-1].split()
        sentence = example.context.partition(". ")[0].split()
        assert question_words == sentence[:QUESTION_WORDS]
        assert example.context[example.start : example.end].split() == sentence[QUESTION_WORDS:]


def test_answer_tokens_decode_to_the_answer_and_truncated_answers_point_at_cls() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    calibration, _ = split_texts(builtin_texts())
    examples = qa_examples(calibration)[:200]
    encoding = tokenizer([e.question for e in examples], [e.context for e in examples], truncation="only_second",
                         max_length=128, padding="max_length", return_offsets_mapping=True)
    found = 0
    for i, example in enumerate(examples):
        first, last = answer_tokens(encoding, i, example)
        if (first, last) == (0, 0):
            continue
        found += 1
        decoded = tokenizer.decode(encoding["input_ids"][i][first : last + 1])
        assert decoded.replace(" ", "") == example.context[example.start : example.end].replace(" ", "").lower()
    assert found > 180
    long = Span("what?", "word " * 300 + "the answer", 1500, 1510)  # cut off by truncation at 128 tokens
    encoding = tokenizer([long.question], [long.context], truncation="only_second", max_length=128,
                         return_offsets_mapping=True)
    assert answer_tokens(encoding, 0, long) == (0, 0)


@pytest.mark.slow
def test_finetune_trains_saves_and_reuses_a_folder_with_the_same_settings(tmp_path: Path) -> None:
    out = finetune(tmp_path / "cls", "text-classification", steps=2, log=False)
    record = json.loads((out / "finetune.json").read_text())
    assert record["settings"]["steps"] == 2 and record["heldout_examples"] > 200
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label[2] == TOPIC_GROUPS[2]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert finetune(out, "text-classification", steps=2, log=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="not in"):
        finetune(tmp_path / "x", "token-classification")


@pytest.mark.slow
def test_distilled_pruned_minilm_keeps_the_zero_pattern_and_pruned_heads(tmp_path: Path) -> None:
    from tests.checkpoints import block_pruned_minilm, load_stock

    raw = load_stock(block_pruned_minilm(tmp_path / "raw").path, "AutoModel")[0]
    out = distill_pruned(tmp_path / "distilled", steps=3, log=False)
    distilled = load_stock(out, "AutoModel")[0]
    assert distilled.config.pruned_heads == raw.config.pruned_heads
    raw_params, changed = dict(raw.named_parameters()), 0
    for name, parameter in distilled.named_parameters():
        before = raw_params[name]
        assert parameter.shape == before.shape, name
        if parameter.ndim == 2:
            assert torch.equal(parameter == 0, before == 0), f"{name}: zero pattern changed"
        changed += int(not torch.equal(parameter, before))
    assert changed > 50, "three distillation steps must move the weights"
    record = json.loads((out / "finetune.json").read_text())
    assert record["zero_weights_kept"] > 1_000_000

"""Fine-tuned task models for the benchmark: the real all-MiniLM-L6-v2 trained here, on CPU, for extractive QA and
for 3-class topic classification, on the calibration side of the built-in corpus only.

No fine-tuned QA or classification checkpoint can be downloaded here. A seeded random head on the real encoder
(``tests.checkpoints.minilm_with_head``) measures what INT8 does to a model whose every decision is a near tie
(random logits over 128 positions: the top two are often 1e-3 apart), which no trained model looks like. These
models are trained on real supervised tasks with gold labels, so their decisions have the margins that training
gives, and the benchmark can also report accuracy against the labels:

- question answering: ``(question, passage)`` where the question is the first 8 words of a sentence of the
  passage and a question mark (the form :func:`exporter.text.as_pair` gives the pipeline's search and parity,
  which ask about the first sentence) and the answer is the rest of that sentence;
- classification: the passage's ``pydoc_data.topics`` page, grouped into statements and execution, expressions
  and lexical structure, and types and the data model (:data:`TOPIC_GROUPS`).

Training never sees a held-out text (:func:`calibration.corpus.split_texts`), so the benchmark's accuracy rows
stay on unseen text. Deterministic in ``seed`` (one torch thread count aside). A folder trained with the same
settings is reused (``finetune.json`` records them and the gold accuracy on held-out texts).
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from calibration.corpus import builtin_passages, builtin_texts, split_texts
from tests.checkpoints import block_pruned_minilm, load_stock, minilm_path

QUESTION_WORDS = 8
"""Words of a sentence that make the question (as in :func:`exporter.text.as_pair`)."""
MIN_ANSWER_WORDS = 2
SENTENCES_PER_PASSAGE = 3
MAX_LENGTH = 128
STATEMENT_TOPICS = frozenset({
    "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "debugger", "del",
    "dynamic-features", "else", "exceptions", "execmodel", "for", "function", "global", "if", "import", "naming",
    "nonlocal", "pass", "raise", "return", "try", "while", "with", "yield",
})
EXPRESSION_TOPICS = frozenset({
    "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans", "calls",
    "comparisons", "conversions", "dict", "exprlists", "floating", "formatstrings", "identifiers", "imaginary", "in",
    "integers", "lambda", "lists", "numbers", "operator-summary", "power", "shifting", "slicings", "strings",
    "subscriptions", "unary",
})
TOPIC_GROUPS = ("statements and execution", "expressions and lexical structure", "types and the data model")
"""Class names, in label order; a topic in neither set above belongs to the last."""
TASKS = ("question-answering", "text-classification")


def topic_label(topic: str) -> int:
    """Class index of a ``pydoc_data.topics`` page name in :data:`TOPIC_GROUPS`."""
    return 0 if topic in STATEMENT_TOPICS else 1 if topic in EXPRESSION_TOPICS else 2


@dataclass(frozen=True)
class Span:
    """A QA example: the answer is ``context[start:end]`` (characters)."""

    question: str
    context: str
    start: int
    end: int


def qa_examples(passages: list[str], sentences: int = SENTENCES_PER_PASSAGE) -> list[Span]:
    """Questions on the first ``sentences`` sentences (split on ". ", as as_pair does) of each passage that has
    at least QUESTION_WORDS + MIN_ANSWER_WORDS words: the first QUESTION_WORDS words and "?" ask, the rest of
    the sentence answers."""
    examples = []
    for passage in passages:
        offset = 0
        for sentence in passage.split(". ")[:sentences]:
            words = list(re.finditer(r"\S+", sentence))
            if len(words) >= QUESTION_WORDS + MIN_ANSWER_WORDS:
                question = " ".join(w.group(0) for w in words[:QUESTION_WORDS]) + "?"
                examples.append(Span(question, passage, offset + words[QUESTION_WORDS].start(),
                                     offset + words[-1].end()))
            offset += len(sentence) + 2
    return examples


def answer_tokens(encoding: Any, index: int, span: Span) -> tuple[int, int]:
    """First and last token of ``span``'s answer in example ``index`` of a fast tokenizer's batch encoding
    (``(0, 0)``, the [CLS] position, when truncation cut the answer)."""
    first = last = None
    offsets = [(int(begin), int(finish)) for begin, finish in encoding["offset_mapping"][index]]
    for position, (sequence, (begin, finish)) in enumerate(zip(encoding.sequence_ids(index), offsets, strict=True)):
        if sequence != 1 or finish <= begin:
            continue
        if first is None and finish > span.start:
            first = position
        if begin < span.end:
            last = position
    if first is None or last is None or last < first or offsets[last][1] < span.end:
        return 0, 0
    return first, last


def topic_batch(tokenizer: Any, examples: list[tuple[str, int]]) -> dict[str, Any]:
    """The classification task's training batch: ``(text, label)`` pairs padded to MAX_LENGTH, with ``labels``."""
    encoding = tokenizer([text for text, _ in examples], truncation=True, max_length=MAX_LENGTH,
                         padding="max_length", return_tensors="pt")
    return {**encoding, "labels": torch.tensor([label for _, label in examples])}


def topic_hits(model: torch.nn.Module, inputs: dict[str, Any]) -> int:
    """How many examples of a :func:`topic_batch` (its ``labels`` popped) ``model`` classifies right."""
    gold = inputs.pop("labels")
    return int((model(**inputs).logits.argmax(-1) == gold).sum())


@dataclass(frozen=True)
class Settings:
    task: str
    steps: int
    seed: int
    batch_size: int = 16
    learning_rate: float = 1e-4
    version: int = 1  # bump when the tasks or the training change


def _train(model: torch.nn.Module, loss: Callable[[], torch.Tensor], settings: Settings, label: str, log: bool,
           after_step: Callable[[], None] | None = None, groups: list[dict[str, Any]] | None = None) -> list[float]:
    """AdamW with a linearly decaying learning rate for ``settings.steps`` steps of ``loss()``; the losses.
    ``groups``: AdamW parameter groups (default: every parameter of ``model`` at ``settings.learning_rate``)."""
    optimizer = torch.optim.AdamW(groups or model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / settings.steps)
    model.train()
    losses = []
    for step in range(settings.steps):
        value = loss()
        value.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()
        losses.append(value.item())
        if log and (step + 1) % 50 == 0:
            print(f"{label}: step {step + 1}/{settings.steps}, loss {sum(losses[-50:]) / 50:.4f}", flush=True)
    model.eval()
    return losses


RECORD = "finetune.json"
"""What a trained folder holds besides model and tokenizer: its Settings and what training measured."""


def _reusable(out: Path, settings: Settings) -> bool:
    """True when ``out`` holds a model trained with exactly ``settings``."""
    record = out / RECORD
    return record.exists() and json.loads(record.read_text()).get("settings") == asdict(settings)


def _save(out: Path, model: Any, tokenizer: Any, settings: Settings, losses: list[float], start: float,
          **measured: float) -> None:
    """Model, tokenizer and the record (settings, mean loss of the last 50 steps, ``measured``, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / RECORD).write_text(json.dumps({
        "settings": asdict(settings), "final_loss": sum(losses[-50:]) / len(losses[-50:]), **measured,
        "seconds": time.perf_counter() - start,
    }, indent=2))


def finetune(out: Path, task: str, steps: int = 300, seed: int = 0, log: bool = True) -> Path:
    """Train MiniLM for ``task`` (see module doc) and save model and tokenizer to ``out``; reuse ``out`` when it
    holds a model trained with the same settings. Returns ``out``."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} not in {TASKS}")
    settings = Settings(task, steps, seed)
    if _reusable(out, settings):
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    passages = builtin_passages()
    calibration, heldout = split_texts([text for _, text in passages])
    held = set(heldout)
    labels = {text: topic_label(topic) for topic, text in passages}
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    if task == "question-answering":
        model = transformers.BertForQuestionAnswering.from_pretrained(minilm_path())
        train: list[Any] = qa_examples(calibration)
    else:
        config = transformers.AutoConfig.from_pretrained(
            minilm_path(), num_labels=len(TOPIC_GROUPS), id2label=dict(enumerate(TOPIC_GROUPS)),
            label2id={name: i for i, name in enumerate(TOPIC_GROUPS)})
        model = transformers.BertForSequenceClassification.from_pretrained(minilm_path(), config=config)
        train = [(text, labels[text]) for text in calibration]
    assert not any((e.context if isinstance(e, Span) else e[0]) in held for e in train)

    def batch(examples: list[Any]) -> dict[str, torch.Tensor]:
        if task == "question-answering":
            encoding = tokenizer([e.question for e in examples], [e.context for e in examples],
                                 truncation="only_second", max_length=MAX_LENGTH, padding="max_length",
                                 return_offsets_mapping=True, return_tensors="pt")
            ends = [answer_tokens(encoding, i, e) for i, e in enumerate(examples)]
            encoding.pop("offset_mapping")
            return {**encoding, "start_positions": torch.tensor([s for s, _ in ends]),
                    "end_positions": torch.tensor([e for _, e in ends])}
        return topic_batch(tokenizer, examples)

    start = time.perf_counter()
    losses = _train(model, lambda: model(**batch(rng.sample(train, settings.batch_size))).loss, settings,
                    f"fine-tuning {task}", log)
    if task == "question-answering":
        test: list[Any] = qa_examples(heldout, sentences=1)
    else:
        test = [(text, labels[text]) for text in heldout]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 32):
            inputs = batch(test[i : i + 32])
            if task == "question-answering":
                gold = torch.stack([inputs.pop("start_positions"), inputs.pop("end_positions")], 1)
                output = model(**inputs)
                predicted = torch.stack([output.start_logits.argmax(-1), output.end_logits.argmax(-1)], 1)
                correct += int((predicted == gold).all(1).sum())
            else:
                correct += topic_hits(model, inputs)
    _save(out, model, tokenizer, settings, losses, start, train_examples=len(train), heldout_examples=len(test),
          heldout_gold_accuracy=correct / len(test))
    return out


def _pooled(model: torch.nn.Module, encoding: Any) -> torch.Tensor:
    hidden = model(**encoding).last_hidden_state
    mask = encoding["attention_mask"][..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def distill_pruned(out: Path, steps: int = 300, seed: int = 0, log: bool = True) -> Path:
    """The block-pruned MiniLM of ``tests.checkpoints.block_pruned_minilm`` (about half its encoder weights zero
    or removed, as nn_pruning leaves a checkpoint) after ``steps`` steps of distillation from the dense MiniLM on
    calibration texts: the student's last hidden states are pulled toward the teacher's (masked MSE), and every
    weight that was zero is put back to zero after each step, so the zero pattern, the ``pruned_heads`` and thus
    what compaction removes stay exactly those of the undistilled checkpoint.

    Block-pruning trainers distil while they prune; the undistilled checkpoint is a trained model with random
    heads and FFN units cut out, whose embeddings crowd together (mean cosine between unrelated passages about
    0.7 where MiniLM's is about 0.2), which makes nearest-neighbour decisions near ties. Reuses ``out`` when it
    holds a model distilled with the same settings; ``finetune.json`` records the held-out cosine to the dense
    model's embeddings before and after.
    """
    settings = Settings("distill-block-pruned", steps, seed)
    if _reusable(out, settings):
        return out
    torch.manual_seed(seed)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as scratch:
        # load_stock: transformers 5 cannot load pruned_heads checkpoints itself (no head pruning)
        student = load_stock(block_pruned_minilm(Path(scratch) / "pruned", seed).path, "AutoModel")[0]
    teacher = transformers.BertModel.from_pretrained(minilm_path()).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    masks = {name: parameter != 0 for name, parameter in student.named_parameters()
             if parameter.ndim == 2 and bool((parameter == 0).any())}
    calibration, heldout = split_texts(builtin_texts())

    def encode(texts: list[str]) -> Any:
        return tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")

    def loss() -> torch.Tensor:
        encoding = encode(rng.sample(calibration, settings.batch_size))
        with torch.no_grad():
            target = teacher(**encoding).last_hidden_state
        hidden = student(**encoding).last_hidden_state
        mask = encoding["attention_mask"][..., None].to(hidden.dtype)
        return ((hidden - target) ** 2 * mask).sum() / (mask.sum() * hidden.shape[-1])

    def remask() -> None:
        with torch.no_grad():
            for name, parameter in student.named_parameters():
                if name in masks:
                    parameter.mul_(masks[name])

    def cosine_to_teacher() -> float:
        with torch.no_grad():
            scores = [(_pooled(student, e) * _pooled(teacher, e)).sum(-1)
                      for e in (encode(heldout[i : i + 32]) for i in range(0, len(heldout), 32))]
        return float(torch.cat(scores).mean())

    student.eval()
    before = cosine_to_teacher()
    start = time.perf_counter()
    losses = _train(student, loss, settings, "distilling the block-pruned MiniLM", log, remask)
    _save(out, student, tokenizer, settings, losses, start, heldout_cosine_to_dense_before=before,
          heldout_cosine_to_dense_after=cosine_to_teacher(),
          zero_weights_kept=int(sum(int((~m).sum()) for m in masks.values())))
    return out

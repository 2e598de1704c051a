"""Labelled evaluation data (``--eval-data``): read, checked row by row, and turned into per-task examples.

Formats: JSONL (one object per line), CSV (a header row), a SQuAD v1.1 / v2.0 JSON file as published
(``data[].paragraphs[].qas[]``; question answering only), or a folder written by ``datasets``'
``save_to_disk`` (needs ``datasets``). Read with the calibration reader's bounds (a regular file only, at most
256 MiB and 1,000,000 rows, a JSONL line at most 1 MiB, each text at most 32,768 characters).

Fields per task, renamed with ``--eval-fields key=name,...`` (defaults in brackets):

- text-classification: ``text`` [text], optional ``text_pair`` [text_pair], ``label`` [label]: an id of
  ``config.id2label`` (an int, or digits in CSV) or one of its names;
- question-answering: ``question`` [question], ``context`` [context], ``answers`` [answers]:
  ``{"text": [...], "answer_start": [...]}`` (the Hugging Face ``squad`` form), a list of
  ``{"text", "answer_start"}`` or of strings; an empty list (or SQuAD's ``is_impossible``) is an unanswerable
  SQuAD 2.0 question; every answer with a start must be found at that character of its context;
- token-classification: ``tokens`` [tokens] (a list of words; space-separated in CSV), ``tags`` [ner_tags]
  (one per word: ids of ``config.id2label`` or its names);
- feature-extraction: ``sentence1`` [sentence1], ``sentence2`` [sentence2], ``score`` [score] (a number).

Every mistake is an :class:`EvalDataError` (exit 2) naming the file and row, raised before anything is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.data import JSONL_LINE_BYTES, MAX_FILE_BYTES, MAX_TEXT_CHARS, MAX_TEXTS, _lines, file_kind
from graphs.core.errors import EvalDataError

DEFAULT_FIELDS: dict[str, dict[str, str]] = {
    "text-classification": {"text": "text", "text_pair": "text_pair", "label": "label"},
    "question-answering": {"question": "question", "context": "context", "answers": "answers", "id": "id"},
    "token-classification": {"tokens": "tokens", "tags": "ner_tags"},
    "feature-extraction": {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score"},
}
METRICS = {"text-classification": "accuracy", "question-answering": "f1", "token-classification": "entity_f1",
           "feature-extraction": "spearman"}


@dataclass
class Example:
    """One labelled example; which fields are set depends on the task."""

    where: str
    text: str = ""
    text_pair: str | None = None
    label: str = ""
    question: str = ""
    context: str = ""
    answers: list[str] = field(default_factory=list)  # [] = unanswerable
    tokens: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    sentence2: str = ""
    score: float = 0.0


@dataclass
class EvalSet:
    task: str
    path: str
    sha256: str
    examples: list[Example]
    format: str
    squad_version: str | None = None  # "1.1" | "2.0" for question answering
    fields: dict[str, str] = field(default_factory=dict)  # the field names read

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "examples": len(self.examples),
                **({"squad_version": self.squad_version} if self.squad_version else {}), "fields": self.fields}


def parse_fields(spec: str, task: str) -> dict[str, str]:
    """``key=name,...`` over the task's defaults; an unknown key is a usage error."""
    fields = dict(DEFAULT_FIELDS[task])
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, name = part.partition("=")
        if not sep or not name or key not in fields:
            raise EvalDataError(f"--eval-fields {part!r}: expected KEY=NAME with KEY one of {sorted(fields)} for "
                                f"{task}")
        fields[key] = name
    return fields


def read_eval_data(path: Path, task: str, fields: Mapping[str, str], labels: Sequence[str]) -> EvalSet:
    """The labelled examples of `path` for `task`; `labels` are the model's ``id2label`` names in id order."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as error:
        raise EvalDataError(f"eval data {path} cannot be read ({error.strerror}); pass a .jsonl, .csv, SQuAD "
                            ".json file or a datasets folder") from None
    digest = hashlib.sha256()
    if stat.S_ISDIR(info.st_mode):
        rows, kind = _dataset_rows(path), "datasets"
        digest.update(str(path.resolve()).encode())
    elif not stat.S_ISREG(info.st_mode):
        raise EvalDataError(f"eval data {path} is a {file_kind(info.st_mode)}, not a regular file")
    elif info.st_size > MAX_FILE_BYTES:
        raise EvalDataError(f"eval data {path} is {info.st_size / (1 << 20):,.0f} MiB, over the "
                            f"{MAX_FILE_BYTES >> 20} MiB limit; pass a sample of it")
    else:
        with path.open("rb") as handle:
            digest.update(handle.read(MAX_FILE_BYTES + 1))
        if path.suffix == ".jsonl":
            rows, kind = _jsonl_rows(path), "jsonl"
        elif path.suffix in (".csv", ".tsv"):
            rows, kind = _csv_rows(path, "\t" if path.suffix == ".tsv" else ","), "csv"
        elif path.suffix == ".json":
            if task != "question-answering":
                raise EvalDataError(f"eval data {path}: a .json file is read as SQuAD, which only question-"
                                    f"answering uses; pass {task} rows as .jsonl or .csv")
            rows, kind = _squad_rows(path), "squad"
        else:
            raise EvalDataError(f"eval data {path}: expected .jsonl, .csv, .tsv, a SQuAD .json or a datasets "
                                f"folder; found suffix {path.suffix!r}")
    examples = []
    for where, row in rows:
        if len(examples) == MAX_TEXTS:
            raise EvalDataError(f"eval data {path} holds more than {MAX_TEXTS:,} rows; pass a sample of it")
        examples.append(_example(task, where, row, fields, labels, csv_values=kind == "csv"))
    if not examples:
        raise EvalDataError(f"eval data {path} holds no rows")
    version = None
    if task == "question-answering":
        version = "2.0" if any(not e.answers for e in examples) else "1.1"
    return EvalSet(task, str(path), digest.hexdigest(), examples, kind, version, dict(fields))


# ----- formats -----


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in _lines(path, JSONL_LINE_BYTES, cut=False, what="eval data"):
        if not line.strip():
            continue
        where = f"eval data {path} line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{where}: bad JSON ({error.msg}); write one JSON object per line") from None


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    text = "".join(line for _, line in _lines(path, JSONL_LINE_BYTES, cut=False, what="eval data"))
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        for row in reader:
            yield f"eval data {path} line {reader.line_num}", row
    except csv.Error as error:
        raise EvalDataError(f"eval data {path} line {reader.line_num}: bad CSV ({error})") from None


def _squad_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise EvalDataError(f"eval data {path} is not valid JSON ({' '.join(str(error).split())[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise EvalDataError(f"eval data {path}: not SQuAD JSON (expected an object with a 'data' list of articles)")
    for a, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise EvalDataError(f"eval data {path}: data[{a}] has no 'paragraphs' list; not SQuAD JSON")
        for p, paragraph in enumerate(paragraphs):
            where = f"eval data {path} data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("context"), str) \
                    or not isinstance(paragraph.get("qas"), list):
                raise EvalDataError(f"{where}: expected 'context' (a string) and 'qas' (a list)")
            for q, qa in enumerate(paragraph["qas"]):
                if not isinstance(qa, dict):
                    raise EvalDataError(f"{where}.qas[{q}]: expected an object")
                answers = [] if qa.get("is_impossible") else qa.get("answers")
                name = f"{where}.qas[{q}]" + (f" (id {qa['id']})" if "id" in qa else "")
                yield name, {"question": qa.get("question"), "context": paragraph["context"], "answers": answers,
                             "id": qa.get("id")}


def _dataset_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise EvalDataError(f"eval data {path} is a folder; reading a saved dataset needs the 'datasets' package "
                            "(pip install datasets), or pass a .jsonl/.csv file") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise EvalDataError(f"eval data {path}: not a dataset saved by save_to_disk ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = next((s for s in ("test", "validation") if s in dataset), sorted(dataset)[0])
        dataset = dataset[split]
    if dataset.num_rows > MAX_TEXTS or dataset.data.nbytes > MAX_FILE_BYTES:
        raise EvalDataError(f"eval data {path} holds {dataset.num_rows:,} rows, over the limit; save a sample")
    for index, row in enumerate(dataset):
        yield f"eval data {path} row {index}", row


# ----- rows -> examples -----


def _text(where: str, row: Mapping[str, Any], name: str, key: str) -> str:
    if name not in row:
        raise EvalDataError(f"{where}: no field {name!r} (the {key}); found {sorted(row)[:8]}; name it with "
                            f"--eval-fields {key}=NAME")
    value = row[name]
    if not isinstance(value, str) or not value.strip():
        raise EvalDataError(f"{where}: field {name!r} must be a non-empty string, found {value!r:.60}")
    if len(value) > MAX_TEXT_CHARS:
        raise EvalDataError(f"{where}: field {name!r} holds {len(value):,} characters, over the "
                            f"{MAX_TEXT_CHARS:,} limit")
    return value


def _label(where: str, value: Any, labels: Sequence[str], csv_values: bool) -> str:
    if isinstance(value, str) and value in labels:
        return value
    if csv_values and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        return labels[value]
    raise EvalDataError(f"{where}: label {value!r:.40} is neither an id (0-{len(labels) - 1}) nor a name of the "
                        f"model's id2label {list(labels)[:10]}")


def _answers(where: str, value: Any, context: str) -> list[str]:
    if isinstance(value, dict):  # {"text": [...], "answer_start": [...]}
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list) or (starts is not None and (not isinstance(starts, list)
                                                                   or len(starts) != len(texts))):
            raise EvalDataError(f"{where}: answers must hold a 'text' list and an 'answer_start' list of the "
                                "same length")
        pairs = list(zip(texts, starts if starts is not None else [None] * len(texts), strict=True))
    elif isinstance(value, list):
        pairs = [(a.get("text"), a.get("answer_start")) if isinstance(a, dict) else (a, None) for a in value]
    else:
        raise EvalDataError(f"{where}: answers must be a list (empty for an unanswerable question) or a "
                            f"{{'text': [...], 'answer_start': [...]}} object, found {type(value).__name__}")
    result = []
    for text, start in pairs:
        if not isinstance(text, str) or not text.strip():
            raise EvalDataError(f"{where}: answer {text!r:.40} is not a non-empty string")
        if start is None:
            if text not in context:
                raise EvalDataError(f"{where}: answer {text!r:.60} does not occur in its context")
        elif not isinstance(start, int) or isinstance(start, bool) or context[start:start + len(text)] != text:
            raise EvalDataError(f"{where}: answer {text!r:.60} is not at character {start!r} of its context "
                                f"(found {context[start:start + len(text)]!r:.60})" if isinstance(start, int)
                                else f"{where}: answer_start {start!r} is not an integer")
        result.append(text)
    return result


def _example(task: str, where: str, row: Any, fields: Mapping[str, str], labels: Sequence[str],
             csv_values: bool) -> Example:
    if not isinstance(row, Mapping):
        raise EvalDataError(f"{where}: expected an object, found {type(row).__name__}")
    if task == "text-classification":
        pair_name = fields["text_pair"]
        pair = _text(where, row, pair_name, "text_pair") if row.get(pair_name) not in (None, "") else None
        if fields["label"] not in row:
            raise EvalDataError(f"{where}: no field {fields['label']!r} (the label); found {sorted(row)[:8]}; "
                                "name it with --eval-fields label=NAME")
        return Example(where, text=_text(where, row, fields["text"], "text"), text_pair=pair,
                       label=_label(where, row[fields["label"]], labels, csv_values))
    if task == "question-answering":
        context = _text(where, row, fields["context"], "context")
        question = _text(where, row, fields["question"], "question")
        if fields["answers"] not in row:
            raise EvalDataError(f"{where}: no field {fields['answers']!r} (the answers); found {sorted(row)[:8]}")
        value = row[fields["answers"]]
        if csv_values and isinstance(value, str):
            value = [] if not value.strip() else [value]
        return Example(where, question=question, context=context, answers=_answers(where, value, context))
    if task == "token-classification":
        tokens, tags = row.get(fields["tokens"]), row.get(fields["tags"])
        if csv_values:
            tokens = tokens.split() if isinstance(tokens, str) else tokens
            tags = tags.split() if isinstance(tags, str) else tags
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
            raise EvalDataError(f"{where}: field {fields['tokens']!r} must be a non-empty list of words")
        if not isinstance(tags, list) or len(tags) != len(tokens):
            raise EvalDataError(f"{where}: field {fields['tags']!r} must be a list with one tag per word "
                                f"({len(tokens)} words)")
        if sum(map(len, tokens)) > MAX_TEXT_CHARS:
            raise EvalDataError(f"{where}: the words hold more than {MAX_TEXT_CHARS:,} characters")
        return Example(where, tokens=list(tokens), tags=[_label(where, t, labels, csv_values) for t in tags])
    first = _text(where, row, fields["sentence1"], "sentence1")
    second = _text(where, row, fields["sentence2"], "sentence2")
    score = row.get(fields["score"])
    try:
        score = float(score) if not isinstance(score, bool) else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise EvalDataError(f"{where}: field {fields['score']!r} must be a finite number, found "
                            f"{row.get(fields['score'])!r:.40}")
    return Example(where, text=first, sentence2=second, score=score)

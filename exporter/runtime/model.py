"""Run an artifact folder with onnxruntime, numpy and tokenizers only: no torch, no transformers, no optimum.

``Runtime.load(folder)`` opens the artifact's fastest deployable file (or one named by ``file=``), checks its
sha256 against the manifest, and reads the tokenizer from the artifact's ``tokenizer.json`` with the special
tokens, padding side and maximum length of its ``tokenizer_config.json`` / ``config.json``. It then gives the
task's outputs as a user wants them:

- feature extraction: :meth:`Runtime.embed`, one sentence embedding per text. A graph output
  ``sentence_embedding`` is used as it is. Otherwise pooling follows the folder's sentence-transformers files where
  they exist (``modules.json``; ``1_Pooling/config.json``: CLS / mean / max / mean-sqrt-len / weighted-mean /
  last-token, concatenated in sentence-transformers' order; a ``Normalize`` module: unit length; the
  ``max_seq_length`` of ``sentence_bert_config.json``). Without them it is **mean pooling over the attention
  mask, not normalized** (what ``parity``'s ``mean_pooled_cosine`` also measures).
- text classification: :meth:`Runtime.classify`, label (``config.json`` ``id2label``) and score per text:
  softmax over the logits (sigmoid for one label or ``problem_type: multi_label_classification``).
- question answering: :meth:`Runtime.answer`, the answer span's text, score and character start/end in the
  context. transformers' pipeline search: contexts longer than the window are cut into overlapping windows
  (``doc_stride``), start and end logits of non-context tokens are masked, each softmaxed over the window, the best
  span with ``start <= end < start + max_answer_length`` over all windows wins; with ``null_answer=True``
  (default) the empty answer is returned where the CLS token's start x end score beats the best span (SQuAD 2.0
  models such as tinyroberta-squad2 answer "no answer" that way; SQuAD 1.1 models never score CLS that high).
  start/end are the character offsets of the span's first and last token: transformers' pipeline with
  ``align_to_words=False`` (its default also widens a span to whole words and sums the scores of answers with
  equal text; not done here).
- token classification: :meth:`Runtime.entities`, entity spans like transformers' pipeline with
  ``aggregation_strategy="simple"``: one label per token (softmax, argmax), special tokens dropped, consecutive
  tokens of the same entity type grouped unless a token starts with ``B-``, ``O`` groups dropped; each span has
  the type (``B-``/``I-`` stripped), character start/end and the mean score of its tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.runtime.artifact import Artifact, Limits, Trust
from exporter.runtime.decode import Answer, Entity, Label, group_entities, softmax
from exporter.runtime.engines import Run, candidates, choose_run, open_run
from exporter.runtime.openvino_check import openvino_failure
from exporter.runtime.parity import session_entries
from exporter.runtime.pooling import Pooling, pool, read_pooling
from exporter.runtime.text import cap_chars
from graphs.core.errors import ParityError, UsageError, first_line, from_onnxruntime
from graphs.core.openvino_sessions import ENGINE
from graphs.core.sessions import require
from graphs.core.telemetry import quiet_onnxruntime

log = logging.getLogger(__name__)

# Preference when the manifest has no latency for the candidates: the fused FP32 graph, then the plain one.


@dataclass
class _Tokenized:
    ids: list[int]
    type_ids: list[int]
    sequence_ids: list[int | None]
    offsets: list[tuple[int, int]]
    special: list[int]
    words: list[int | None] = field(default_factory=list)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else default


def tokenizer_call(call: Callable[[], Any], where: str, plain: bool = True) -> Any:
    """`call()` into the tokenizers library, its failures as one ParityError line (exit 3). A panic inside the
    Rust library (``pyo3_runtime.PanicException``, a BaseException that escapes ``except Exception``) is caught
    here too. With `plain=False` ordinary exceptions pass through (the caller words them)."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as error:
        if not plain:
            raise
        raise ParityError(f"{where} cannot be used by tokenizers ({first_line(error, 200)}); the artifact is "
                          "damaged or was not written by export-model") from None
    except BaseException as error:  # noqa: B036  (the panic's class is not importable by name)
        raise ParityError(f"{where}: the tokenizers library panicked on it ({first_line(error, 200)}); refuse this "
                          "artifact") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def choose_file(manifest: dict[str, Any], provider: str) -> str:
    """The fastest deployable file on onnxruntime's `provider` (see :func:`exporter.runtime.engines.choose_run`,
    which also weighs OpenVINO's runs)."""
    return choose_run(manifest, provider, "onnxruntime").file


class Runtime:
    """One model file of an artifact folder, with its tokenizer and task head decoding. See the module docstring."""

    def __init__(self, folder: Path, file: str, session: Any, manifest: dict[str, Any], config: dict[str, Any],
                 tokenizer: Any, batch_size: int = 8, settings: dict[str, Any] | None = None,
                 pooling: Pooling | None = None, st_max_length: int | None = None) -> None:
        """Use :meth:`load`. `settings`: tokenizer_config.json over special_tokens_map.json; `pooling`: the
        sentence-transformers pooling (feature extraction); `st_max_length`: sentence_bert_config's
        max_seq_length."""
        self.folder, self.file, self.session, self.manifest, self.config = folder, file, session, manifest, config
        self.run_choice: Run | None = None  # set by load(): the (file, engine, precision) served
        self.task: str = manifest["task"]
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.inputs = {i.name: (np.int32 if "int32" in i.type else np.int64) for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]
        self._apply_tokenizer_settings(settings or {}, st_max_length)
        self.pooling = (pooling or Pooling()) if self.task == "feature-extraction" else None
        if self.pooling is not None and "sentence_embedding" in self.outputs:
            self.pooling = Pooling(source="the graph's sentence_embedding output")

    # ----- loading -----

    @classmethod
    def load(cls, folder: str | Path, file: str | None = None, provider: str = "cpu", batch_size: int = 8,
             trust: Trust | None = None, limits: Limits | None = None, engine: str = "auto") -> Runtime:
        """Open `folder` (an export-model artifact) through :class:`exporter.runtime.artifact.Artifact`: every file read
        is a plain file inside the folder, listed in the manifest, within its size cap and equal to its sha256
        (ParityError, exit 3, if not), and the session is built from the very bytes that were checked. `file`: a
        model file name, or None for the fastest deployable one recorded in the manifest. `provider`: cpu, cuda,
        ... or a full onnxruntime name. `engine`: "auto" (default: the fastest deployable (file, engine, precision)
        by the manifest's latency table, OpenVINO included where it is installed and the provider is the CPU),
        "onnxruntime" or "openvino" (exporter/runtime/engines.py). `trust`: a signature or digest to check the
        manifest against.

        Not bounded here: the graph's and the tokenizer's own compute and memory (the CLI runs this in a bounded
        child, exporter/runtime/sandbox.py)."""
        quiet_onnxruntime()
        from tokenizers import Tokenizer

        folder = Path(folder)
        with Artifact.open(folder, trust, limits) as artifact:
            manifest = artifact.manifest
            full = require(provider)
            models = sorted(name for name in manifest["files"] if name.endswith(".onnx") and "/" not in name)
            if file is not None and file not in models:
                raise UsageError(f"--file {file!r} is not a model file of {folder}; it holds {models}")
            if file is None or candidates(manifest, full, engine, file):
                run = choose_run(manifest, full, engine, file)
            else:
                log.warning("%s did not pass parity%s at export (manifest.json 'parity'); running it anyway", file,
                            " on OpenVINO" if engine == "openvino" else "")
                run = Run(file, ENGINE if engine == "openvino" else full, "fp32")
            file = run.file
            config = artifact.read_json("config.json")
            if not isinstance(config, dict):
                raise ParityError(f"{folder / 'config.json'} is not a JSON object; re-export the artifact")
            text = artifact.read("tokenizer.json").decode("utf-8", "replace")
            tokenizer = tokenizer_call(lambda: Tokenizer.from_str(text), f"{folder / 'tokenizer.json'}")
            settings: dict[str, Any] = {}
            for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
                if artifact.has(name):
                    values = artifact.read_json(name)
                    settings.update(values if isinstance(values, dict) else {})
            st_max = None
            if manifest["task"] == "feature-extraction" and artifact.has("sentence_bert_config.json"):
                st_config = artifact.read_json("sentence_bert_config.json")
                st_max = st_config.get("max_seq_length") if isinstance(st_config, dict) else None
            pooling = None
            if manifest["task"] == "feature-extraction":
                def relative(path: Path) -> str:
                    return path.relative_to(folder).as_posix()

                pooling = read_pooling(folder, lambda path: artifact.read_json(relative(path)),
                                       lambda path: artifact.has(relative(path)))
            try:
                with artifact.model_source(file) as source:
                    session = open_run(source, run, session_entries(manifest, file))
            except Exception as error:
                if not from_onnxruntime(error) and not (run.openvino and isinstance(error, RuntimeError)):
                    raise
                if run.openvino:
                    raise ParityError(f"{folder / file}: OpenVINO cannot load it ({openvino_failure(error)}); run it "
                                      "with --engine onnxruntime, or pick a file with an OpenVINO pass row") from None
                raise ParityError(f"{folder / file}: onnxruntime cannot load it ({first_line(error, 200)}); the "
                                  "artifact is damaged or was not written by export-model") from None
        log.info("runtime: %s", run.describe())
        runtime = cls(folder, file, session, manifest, config, tokenizer, batch_size, settings, pooling,
                      _int(st_max, 0) or None)
        runtime.run_choice = run
        return runtime

    def _apply_tokenizer_settings(self, settings: dict[str, Any], st_max_length: int | None) -> None:
        tok = self.tokenizer
        tok.no_padding()
        tok.no_truncation()  # tokenizer.json may carry the exporter's own settings (fixed padding to 128)

        def token_id(key: str) -> int | None:
            text = _token_text(settings.get(key))
            return tok.token_to_id(text) if text is not None else None

        self.pad_id = token_id("pad_token")
        if self.pad_id is None:
            self.pad_id = _int(self.config.get("pad_token_id"), 0)
        self.cls_id = token_id("cls_token")
        if self.cls_id is None:
            self.cls_id = token_id("bos_token")
        self.pad_type_id = _int(settings.get("pad_token_type_id"), 0)
        self.padding_side = "left" if settings.get("padding_side") == "left" else "right"
        self.truncation_side = "left" if settings.get("truncation_side") == "left" else "right"
        limits = []
        model_max = settings.get("model_max_length")
        if isinstance(model_max, (int, float)) and 0 < model_max < 1e6:
            limits.append(int(model_max))
        # what the positions hold, recorded by the family at export (max_position_embeddings before the field)
        tokens = _int(self.manifest.get("max_tokens"), 0) or _int(self.config.get("max_position_embeddings"), 0)
        if tokens:
            limits.append(tokens)
        if self.task == "feature-extraction" and st_max_length is not None and st_max_length > 0:
            limits.append(st_max_length)
        self.max_length = max(1, min(min(limits) if limits else 512, 8192))

    # ----- tokenization and inference -----

    def _encode(self, texts: Sequence[str | tuple[str, str]], words: bool = False) -> list[_Tokenized]:
        """Tokenized `texts` (a text, or a (text, text_pair) pair; with `words`, lists of words), truncated to
        ``max_length``."""
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first", direction=self.truncation_side)
        if words:  # one word is at least one token: no more words than positions
            items: list[Any] = [list(text)[: self.max_length] for text in texts]
        else:  # no tokenizer call sees more text than max_length positions can use (exporter/text.py)
            items = [cap_chars(t, self.max_length) if isinstance(t, str) else
                     (cap_chars(t[0], self.max_length), cap_chars(t[1], self.max_length)) for t in texts]
        encoded = tokenizer_call(lambda: self.tokenizer.encode_batch(items, is_pretokenized=words),
                                 f"{self.folder / 'tokenizer.json'}")
        return [_Tokenized(e.ids, e.type_ids, e.sequence_ids, e.offsets, e.special_tokens_mask, e.word_ids)
                for e in encoded]

    def _feeds(self, rows: Sequence[_Tokenized]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Padded inputs for `rows` (on `padding_side`) and their attention mask."""
        length = max(len(r.ids) for r in rows)
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        types = np.full((len(rows), length), self.pad_type_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            n = len(row.ids)
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            ids[i, span], types[i, span], mask[i, span] = row.ids, row.type_ids, 1
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        missing = [name for name in self.inputs if name not in available]
        if missing:
            raise UsageError(f"{self.file} wants inputs {missing} the runtime cannot build")
        feeds = {name: available[name].astype(dtype) for name, dtype in self.inputs.items()}
        return feeds, mask

    def _run(self, rows: Sequence[_Tokenized]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        feeds, mask = self._feeds(rows)
        outputs = self.session.run(self.outputs, feeds)
        return dict(zip(self.outputs, outputs, strict=True)), mask

    def _batches(self, items: Sequence[Any]) -> Iterable[Sequence[Any]]:
        for start in range(0, len(items), self.batch_size):
            yield items[start:start + self.batch_size]

    def _aligned(self, values: np.ndarray, row: int, rows: Sequence[_Tokenized], width: int) -> np.ndarray:
        """Row `row`'s token-level values without padding, whichever side it was on."""
        n = len(rows[row].ids)
        return values[row, width - n:] if self.padding_side == "left" else values[row, :n]

    def _require(self, task: str) -> None:
        if self.task != task:
            raise UsageError(f"{self.folder} is a {self.task} artifact, not {task}")

    # ----- task outputs -----

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings (len(texts), dim), float32; pooling as `self.pooling.source` says."""
        self._require("feature-extraction")
        assert self.pooling is not None
        chunks = []
        for batch in self._batches(list(texts)):
            rows = self._encode(batch)
            outputs, mask = self._run(rows)
            if "sentence_embedding" in outputs:
                chunks.append(outputs["sentence_embedding"].astype(np.float32))
                continue
            tokens = outputs["last_hidden_state"]
            if self.padding_side == "left":  # realign so position 0 is the first token (CLS / weighted modes)
                tokens = np.stack([np.roll(tokens[i], -int((mask[i] == 0).sum()), axis=0) for i in range(len(rows))])
                mask = np.stack([np.roll(mask[i], -int((mask[i] == 0).sum())) for i in range(len(rows))])
            chunks.append(pool(tokens, mask, self.pooling))
        width = chunks[0].shape[-1] if chunks else 0
        return np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)

    def _label(self, index: int) -> str:
        labels = self.config.get("id2label") or {}
        return str(labels.get(str(index), labels.get(index, f"LABEL_{index}")))

    def classify(self, texts: Sequence[str], pairs: Sequence[str | None] | None = None) -> list[Label]:
        """Label and score per text, or per (text, pair) where `pairs` gives the second texts (softmax; sigmoid
        for one label or multi-label models)."""
        self._require("text-classification")
        results = []
        items: list[Any] = list(texts) if pairs is None else [t if p is None else (t, p)
                                                              for t, p in zip(texts, pairs, strict=True)]
        for batch in self._batches(items):
            outputs, _ = self._run(self._encode(batch))
            logits = outputs["logits"].astype(np.float64)
            sigmoid = logits.shape[-1] == 1 or self.config.get("problem_type") == "multi_label_classification"
            scores = 1.0 / (1.0 + np.exp(-logits)) if sigmoid else softmax(logits)
            for row in scores:
                best = int(row.argmax())
                results.append(Label(self._label(best), float(row[best])))
        return results

    def answer(self, questions: Sequence[str], contexts: Sequence[str], max_answer_length: int = 15,
               null_answer: bool = True, max_length: int = 384, doc_stride: int = 128,
               names: Sequence[str] | None = None) -> list[Answer]:
        """The best answer span per (question, context); see the module docstring for the search. `names` label
        the pairs in error messages (default: "question N")."""
        self._require("question-answering")
        if len(questions) != len(contexts):
            raise UsageError(f"{len(questions)} questions but {len(contexts)} contexts")
        window = min(max_length, self.max_length)
        stride = min(doc_stride, window // 2)
        self.tokenizer.enable_truncation(window, stride=stride, strategy="only_second", direction="right")
        results = []
        for number, (question, context) in enumerate(zip(questions, contexts, strict=True)):
            try:
                question = cap_chars(question, window)
                encoding = tokenizer_call(lambda: self.tokenizer.encode(question, context),  # noqa: B023
                                          f"{self.folder / 'tokenizer.json'}", plain=False)
            except ParityError:
                raise
            except Exception as error:  # tokenizers' truncation error: the question alone fills the window
                where = names[number] if names is not None else f"question {number + 1}"
                raise UsageError(f"{where}: the question cannot fit with its context in {window} tokens "
                                 f"({error}); shorten the question") from None
            windows = [_Tokenized(e.ids, e.type_ids, e.sequence_ids, e.offsets, e.special_tokens_mask)
                       for e in [encoding, *encoding.overflowing]]
            results.append(self._best_span(windows, context, max_answer_length, null_answer))
        return results

    def _best_span(self, windows: Sequence[_Tokenized], context: str, max_answer_length: int,
                   null_answer: bool) -> Answer:
        best: tuple[float, int, int] | None = None  # score, char start, char end
        null_score = math.inf
        for batch_start in range(0, len(windows), self.batch_size):
            rows = windows[batch_start:batch_start + self.batch_size]
            outputs, _ = self._run(rows)
            width = outputs["start_logits"].shape[1]
            for i, row in enumerate(rows):
                start = self._aligned(outputs["start_logits"], i, rows, width).astype(np.float64)
                end = self._aligned(outputs["end_logits"], i, rows, width).astype(np.float64)
                desired = np.array([s == 1 for s in row.sequence_ids])  # context tokens only
                cls = row.ids.index(self.cls_id) if self.cls_id in row.ids else 0
                keep = desired.copy()
                keep[cls] = True  # CLS takes part in the softmax, as in transformers' pipeline
                start_p = softmax(np.where(keep, start, -10000.0))
                end_p = softmax(np.where(keep, end, -10000.0))
                null_score = min(null_score, float(start_p[cls] * end_p[cls]))
                start_p[cls] = end_p[cls] = 0.0
                spans = np.tril(np.triu(np.outer(start_p, end_p)), max_answer_length - 1)
                spans[~desired, :] = -1.0
                spans[:, ~desired] = -1.0
                s, e = np.unravel_index(int(spans.argmax()), spans.shape)
                if spans[s, e] < 0:
                    continue  # no context token in this window
                score = float(spans[s, e])
                if best is None or score > best[0]:
                    best = (score, row.offsets[s][0], row.offsets[e][1])
        if best is None or (null_answer and null_score > best[0]):
            return Answer("", null_score if math.isfinite(null_score) else 0.0, 0, 0)
        score, start_char, end_char = best
        return Answer(context[start_char:end_char], score, int(start_char), int(end_char))

    def entities(self, texts: Sequence[str]) -> list[list[Entity]]:
        """Entity spans per text, transformers' "simple" aggregation; see the module docstring."""
        self._require("token-classification")
        results = []
        for batch in self._batches(list(texts)):
            rows = self._encode(batch)
            outputs, _ = self._run(rows)
            width = outputs["logits"].shape[1]
            for i, (text, row) in enumerate(zip(batch, rows, strict=True)):
                scores = softmax(self._aligned(outputs["logits"], i, rows, width).astype(np.float64))
                tokens = [(self._label(int(scores[t].argmax())), float(scores[t].max()), *row.offsets[t])
                          for t in range(len(row.ids)) if not row.special[t]]
                results.append(group_entities(tokens, text))
        return results

    def word_labels(self, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
        """One label per word of each pre-split sentence: the label of the word's first sub-token (argmax), as
        token-classification models are trained and scored; words cut off by ``max_length`` get "O"."""
        self._require("token-classification")
        results = []
        for batch in self._batches([list(words) for words in sentences]):
            rows = self._encode(batch, words=True)
            outputs, _ = self._run(rows)
            width = outputs["logits"].shape[1]
            for i, (words, row) in enumerate(zip(batch, rows, strict=True)):
                best = self._aligned(outputs["logits"], i, rows, width).argmax(-1)
                labels = ["O"] * len(words)
                seen: set[int] = set()
                for position, word in enumerate(row.words):
                    if word is not None and word not in seen:
                        seen.add(word)
                        labels[word] = self._label(int(best[position]))
                results.append(labels)
        return results

    # ----- rows (the CLI's JSONL) -----

    def predict_rows(self, rows: Sequence[dict[str, Any]], names: Sequence[str] | None = None,
                     **options: Any) -> list[dict[str, Any]]:
        """One output dict per input row: {"embedding"}, {"label", "score"}, {"answer", "score", "start", "end"}
        or {"entities": [...]}. Rows must already be checked (see `check_row`); `names` label them in errors."""
        if self.task == "question-answering":
            answers = self.answer([r["question"] for r in rows], [r["context"] for r in rows], names=names,
                                  **options)
            return [asdict(a) for a in answers]
        texts = [r["text"] for r in rows]
        if self.task == "feature-extraction":
            return [{"embedding": [float(x) for x in vector]} for vector in self.embed(texts)]
        if self.task == "text-classification":
            return [asdict(label) for label in self.classify(texts)]
        return [{"entities": [{"entity": e.entity, "start": e.start, "end": e.end, "score": e.score}
                              for e in spans]} for spans in self.entities(texts)]

    @property
    def row_fields(self) -> tuple[str, ...]:
        """The fields a row of this task holds."""
        return ("question", "context") if self.task == "question-answering" else ("text",)

    def check_row(self, row: Any, where: str) -> dict[str, Any]:
        """`row` if it has the fields this task needs, as Unicode strings; a UsageError naming `where` if not (a
        lone surrogate, valid in JSON, cannot be tokenized)."""
        fields = self.row_fields
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object with {' and '.join(map(repr, fields))}, "
                             f"got {type(row).__name__}")
        for name in fields:
            if name not in row:
                raise UsageError(f"{where}: no {name!r} field (a {self.task} artifact takes "
                                 f"{' and '.join(map(repr, fields))}); found {sorted(row)[:5]}")
            if not isinstance(row[name], str):
                raise UsageError(f"{where}: {name!r} must be a string, got {type(row[name]).__name__}")
            try:
                row[name].encode("utf-8")
            except UnicodeEncodeError:
                raise UsageError(f"{where}: {name!r} holds a lone surrogate (not Unicode text)") from None
        return row



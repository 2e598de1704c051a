"""Gold metrics of the PyTorch checkpoint and of every artifact file, on the user's labelled data.

Each model is wrapped as an onnxruntime-like session and decoded by the same :class:`exporter.runtime.Runtime`
code (tokenization, batching, span search, entity tags), so the PyTorch checkpoint (the baseline row, ``file:
"pytorch"``) and the ONNX files differ only in the model that computes the logits:

- text-classification: the argmax label per text (pair) -> accuracy, macro F1;
- question-answering: the runtime's span search (384-token windows, stride 128, answers of at most 15 tokens;
  the empty answer where the no-answer score wins when the data is SQuAD 2.0-style, never for SQuAD 1.1 data)
  -> SQuAD EM / F1 (``exporter.gold``), HasAns / NoAns for 2.0;
- token-classification: each word's label from its first sub-token -> entity precision / recall / F1;
- feature-extraction: cosine of the two sentence embeddings -> Spearman correlation with the gold scores.

Latency per row is measured on the evaluation itself: the wall time of every model call (batches of
``batch_size`` texts, or one question's windows), mean and standard deviation in ms.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.metrics import TaskMetric
from exporter import gold
from exporter.eval_data import METRICS, EvalSet
from exporter.runtime.model import Runtime

log = logging.getLogger(__name__)


@dataclass
class _Port:
    name: str
    type: str = "tensor(int64)"


class TimedSession:
    """An onnxruntime session (or :class:`TorchSession`) that records the wall time of every ``run``."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.seconds: list[float] = []

    def get_inputs(self) -> list[Any]:
        return self.session.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        start = time.perf_counter()
        outputs = self.session.run(names, feeds)
        self.seconds.append(time.perf_counter() - start)
        return outputs


class TorchSession:
    """The PyTorch checkpoint behind onnxruntime's session interface: int64 inputs in, the graph's outputs (by
    name) out as float32 arrays, ``sentence_embedding`` pooled as the checkpoint's sentence-transformers modules
    define it."""

    def __init__(self, model: Any, input_names: Sequence[str], output_names: Sequence[str],
                 pooling: Any = None) -> None:
        self.model, self.pooling = model, pooling
        self.inputs = [_Port(name) for name in input_names]
        self.outputs = [_Port(name, "tensor(float)") for name in output_names]

    def get_inputs(self) -> list[_Port]:
        return self.inputs

    def get_outputs(self) -> list[_Port]:
        return self.outputs

    def run(self, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        from exporter.reference import reference_outputs

        wanted = [o.name for o in self.outputs] if names is None else list(names)
        return [reference_outputs(self.model, [feeds], wanted, self.pooling)[0][name] for name in wanted]


def decode(runtime: Runtime, data: EvalSet) -> dict[str, float]:
    """Every gold metric of `runtime`'s model on `data` (see the module docstring)."""
    examples = data.examples
    if data.task == "text-classification":
        predicted = [label.label for label in runtime.classify([e.text for e in examples],
                                                               [e.text_pair for e in examples])]
        wanted = [e.label for e in examples]
        return {"accuracy": gold.accuracy(wanted, predicted), "macro_f1": gold.macro_f1(wanted, predicted),
                "correct": float(sum(w == p for w, p in zip(wanted, predicted, strict=True)))}
    if data.task == "question-answering":
        answers = runtime.answer([e.question for e in examples], [e.context for e in examples],
                                 null_answer=data.squad_version == "2.0", names=[e.where for e in examples])
        return gold.squad_scores([a.answer for a in answers], [e.answers for e in examples])
    if data.task == "token-classification":
        predicted = runtime.word_labels([e.tokens for e in examples])
        scores = gold.entity_scores([e.tags for e in examples], predicted)
        return {"entity_f1": scores["f1"], "entity_precision": scores["precision"],
                "entity_recall": scores["recall"], "entities": float(scores["entities"])}
    first, second = runtime.embed([e.text for e in examples]), runtime.embed([e.sentence2 for e in examples])
    cosines = (first * second).sum(1) / np.maximum(np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1),
                                                   1e-12)
    return {"spearman": gold.spearman(cosines, [e.score for e in examples])}


def evaluate(runtime: Runtime, data: EvalSet) -> dict[str, Any]:
    """Gold metrics of `runtime`'s model on `data`, and the latency of its model calls."""
    timed = TimedSession(runtime.session)
    runtime.session = timed
    try:
        metrics = decode(runtime, data)
    finally:
        runtime.session = timed.session
    ms = np.array(timed.seconds) * 1000.0
    return {"metric": METRICS[data.task], "value": metrics[METRICS[data.task]], "metrics": metrics,
            "examples": len(data.examples), "latency_ms_mean": float(ms.mean()) if ms.size else None,
            "latency_ms_std": float(ms.std()) if ms.size else None, "calls": int(ms.size)}


def _runtime(folder: Path, task: str, session: Any, name: str, batch_size: int) -> Runtime:
    """The runtime's decoding over `session`, with the tokenizer and config of `folder` (the artifact being
    built)."""
    from tokenizers import Tokenizer

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return Runtime(folder, name, session, {"task": task}, config, Tokenizer.from_file(str(folder / "tokenizer.json")),
                   batch_size)


def evaluation_rows(folder: Path, task: str, data: EvalSet, reference: Any, input_names: Sequence[str],
                    output_names: Sequence[str], pooling: Any, files: Sequence[str], providers: Sequence[str],
                    batch_size: int) -> list[dict[str, Any]]:
    """One row for the PyTorch checkpoint and one per (file, provider); `folder` holds the tokenizer and config
    files the runtime reads (the artifact being built)."""
    from graphs.core.sessions import open_session

    def runtime(session: Any, name: str) -> Runtime:
        return _runtime(folder, task, session, name, batch_size)

    rows = []
    size = sum(p.numel() * p.element_size() for p in reference.parameters()) / 1e6
    torch_session = TorchSession(reference, input_names, output_names, pooling)
    rows.append({"file": "pytorch", "provider": "torch CPU", "size_mb": size,
                 **evaluate(runtime(torch_session, "pytorch"), data)})
    for provider in providers:
        for name in files:
            path = folder / name
            size = (path.stat().st_size + sum(p.stat().st_size for p in folder.glob(f"{name}.data"))) / 1e6
            rows.append({"file": name, "provider": provider, "size_mb": size,
                         **evaluate(runtime(open_session(path, provider), name), data)})
    for row in rows:
        row["batch_size"] = batch_size
        log.info("evaluation: %s on %s: %s %.4f on %d examples", row["file"], row["provider"], row["metric"],
                 row["value"], row["examples"])
    return rows


# ----- the INT8 accuracy search judged on the gold metric -----

SEARCHABLE = ("text-classification", "question-answering", "token-classification")
"""Tasks whose search can judge on the gold metric (their decoding reads one output, or QA's two of one shape)."""


class RecordingSession(TimedSession):
    """Records the feeds of every call, in order: the batches the runtime's decoding of a data set makes."""

    def __init__(self, session: Any) -> None:
        super().__init__(session)
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append({k: v.copy() for k, v in feeds.items()})
        return super().run(names, feeds)


class ReplaySession:
    """Gives back recorded outputs, call by call, to the runtime's decoding of the same data (same feeds)."""

    def __init__(self, like: Any, outputs: Sequence[Sequence[np.ndarray]]) -> None:
        self.like, self.outputs, self.calls = like, list(outputs), 0

    def get_inputs(self) -> list[Any]:
        return self.like.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self.like.get_outputs()

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.outputs[self.calls]
        self.calls += 1
        return list(outputs)


class GoldMetric(TaskMetric):
    """A :class:`calibration.metrics.TaskMetric` that scores a candidate graph by the gold metric of its
    decoded outputs on the search part of the labelled data: ``gold_<metric>`` is 1 + (candidate - FP32 graph)
    in the metric's own units divided by its scale (100 for SQuAD's percent F1), so ``--max-accuracy-drop 0.01``
    allows one point of accuracy, entity F1 or SQuAD F1. Built from a :class:`RecordingSession` pass: the
    search's validation batches are exactly the feeds the runtime's decoding made."""

    counted = None

    def __init__(self, runtime: Runtime, data: EvalSet, recorded: RecordingSession) -> None:
        self.runtime, self.data = runtime, data
        self.metric = METRICS[data.task]
        self.name = f"gold-{self.metric}"
        self.scale = 100.0 if data.task == "question-answering" else 1.0
        self.batches = recorded.feeds
        self._reference: tuple[int, float] | None = None

    def summarize(self, outputs: Sequence[np.ndarray], feeds: Any) -> np.ndarray:
        return np.stack([o.astype(np.float32) for o in outputs]) if len(outputs) > 1 else outputs[0].astype(np.float32)

    def value(self, summaries: Sequence[np.ndarray]) -> float:
        several = len(self.runtime.outputs) > 1
        outputs = [list(s) if several else [s] for s in summaries]
        live = self.runtime.session
        self.runtime.session = ReplaySession(live, outputs)
        try:
            return decode(self.runtime, self.data)[self.metric]
        finally:
            self.runtime.session = live

    def scores(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict[str, float]:
        if self._reference is None or self._reference[0] != id(reference):
            self._reference = (id(reference), self.value(reference))
        base, got = self._reference[1], self.value(candidate)
        return {f"gold_{self.metric}": 1.0 + (got - base) / self.scale, f"{self.metric}_fp32": base,
                f"{self.metric}_int8": got}

    def bars(self, max_accuracy_drop: float) -> dict[str, float]:
        return {f"gold_{self.metric}": 1.0 - max_accuracy_drop}

    def agrees(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError("the gold metric counts no per-example agreement")

    def min_examples(self, max_accuracy_drop: float) -> int:
        return 0


def split_for_search(data: EvalSet, every: int = 4) -> tuple[EvalSet, EvalSet]:
    """(search part: every `every`-th row from the first, reported part: the rest)."""
    from dataclasses import replace

    search = [e for i, e in enumerate(data.examples) if i % every == 0]
    report = [e for i, e in enumerate(data.examples) if i % every != 0]
    return replace(data, examples=search), replace(data, examples=report)


def gold_search_metric(folder: Path, task: str, data: EvalSet, graph: Path, batch_size: int) -> GoldMetric:
    """The gold metric over `data` (the search part), with its validation batches recorded on `graph` (FP32)."""
    from graphs.core.sessions import open_session

    recorded = RecordingSession(open_session(graph, "CPUExecutionProvider"))
    runtime = _runtime(folder, task, recorded, graph.name, batch_size)
    decode(runtime, data)
    runtime.session = recorded.session
    return GoldMetric(runtime, data, recorded)

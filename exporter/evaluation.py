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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporter import gold
from exporter.eval_data import METRICS, EvalSet
from exporter.runtime import Runtime

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
        from exporter.parity import reference_outputs

        wanted = [o.name for o in self.outputs] if names is None else list(names)
        return [reference_outputs(self.model, [feeds], wanted, self.pooling)[0][name] for name in wanted]


def _decode(runtime: Runtime, data: EvalSet) -> dict[str, float]:
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
        metrics = _decode(runtime, data)
    finally:
        runtime.session = timed.session
    ms = np.array(timed.seconds) * 1000.0
    return {"metric": METRICS[data.task], "value": metrics[METRICS[data.task]], "metrics": metrics,
            "examples": len(data.examples), "latency_ms_mean": float(ms.mean()) if ms.size else None,
            "latency_ms_std": float(ms.std()) if ms.size else None, "calls": int(ms.size)}


def evaluation_rows(folder: Path, task: str, data: EvalSet, reference: Any, input_names: Sequence[str],
                    output_names: Sequence[str], pooling: Any, files: Sequence[str], providers: Sequence[str],
                    batch_size: int, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row for the PyTorch checkpoint and one per (file, provider); `folder` holds the tokenizer and config
    files the runtime reads (the artifact being built)."""
    from tokenizers import Tokenizer

    from exporter.parity import open_session

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    manifest = {"task": task}

    def runtime(session: Any, name: str) -> Runtime:
        return Runtime(folder, name, session, manifest, config, Tokenizer.from_file(str(folder / "tokenizer.json")),
                       batch_size)

    rows = []
    size = sum(p.numel() * p.element_size() for p in reference.parameters()) / 1e6
    torch_session = TorchSession(reference, input_names, output_names, pooling)
    rows.append({"file": "pytorch", "provider": "torch CPU", "size_mb": size,
                 **evaluate(runtime(torch_session, "pytorch"), data)})
    for provider in providers:
        for name in files:
            if progress:
                progress(f"{name} on {provider}")
            path = folder / name
            size = (path.stat().st_size + sum(p.stat().st_size for p in folder.glob(f"{name}.data"))) / 1e6
            rows.append({"file": name, "provider": provider, "size_mb": size,
                         **evaluate(runtime(open_session(path, provider), name), data)})
    for row in rows:
        row["batch_size"] = batch_size
        log.info("evaluation: %s on %s: %s %.4f on %d examples", row["file"], row["provider"], row["metric"],
                 row["value"], row["examples"])
    return rows

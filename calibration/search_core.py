"""What every accuracy-search strategy shares: the report, putting nodes back in FP32 (graph surgery on the
calibrated graph), running a candidate graph on CPU and scoring it. See :mod:`calibration.search`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.metrics import TaskMetric
from graphs.core.errors import QuantizationError
from graphs.core.sessions import open_session

logger = logging.getLogger(__name__)

Batch = Mapping[str, np.ndarray]

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
"""Ops that carry quantized tensors but compute nothing: never counted as quantized compute nodes; removed when
left without consumers."""
STRATEGIES = ("paired", "leave-one-out")
"""How the search ranks and falls back (see module doc)."""
MASK_INPUT = "attention_mask"
PROTO_LIMIT = 1_900_000_000  # protobuf cannot serialize 2 GB; larger graphs go through a temporary file


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must be saved with external data: past protobuf's limit, or loaded without its external
    data (``load_external_data=False``)."""
    return model.ByteSize() > PROTO_LIMIT or any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


@dataclass
class FallbackStep:
    """One node put back in FP32: its harm from the ranking trial (None: not ranked before the time budget ran
    out), the task scores after the step, and why it went back."""

    node: str
    op_type: str
    harm: float | None
    scores: dict[str, float]
    reason: str = "most harmful node left"


@dataclass
class SearchReport:
    """What :func:`search_fallback` measured and decided; ``to_dict()`` goes into the manifest.

    ``harm`` maps every ranked quantized node to its harm (``leave-one-out``: the drop in relative error when it
    alone is FP32; ``paired``: its own INT8 output's relative squared error), empty when the fully quantized graph
    already met the bars and no ranking was needed. ``budget_reached``: None, or the phase ("ranking" /
    "falling back" / ``paired``: "refining") in which ``budget_s`` ran out.
    """

    metric: str
    max_accuracy_drop: float
    bars: dict[str, float]
    scores_before: dict[str, float]
    scores_after: dict[str, float]
    fallbacks: list[FallbackStep] = field(default_factory=list)
    harm: dict[str, float] = field(default_factory=dict)
    validation_batches: int = 0
    validation_examples: int = 0
    ranking_batches: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    budget_s: float | None = None
    budget_reached: str | None = None
    strategy: str = "leave-one-out"
    engine: str = "onnxruntime"
    """What ran the candidate graphs (the FP32 reference always runs on onnxruntime)."""
    trials: list[dict[str, Any]] = field(default_factory=list)
    """``paired``: each fallback trial, ``{"fallen": k, "phase": ..., "scores": ..., "met": bool}`` in the order
    measured: k nodes back in FP32; phase "prefix" (the first k of the ranking), "refine" (a subset of the
    passing prefix) or "all back" (the budget ran out before a passing prefix)."""

    @property
    def fallback_nodes(self) -> list[str]:
        return [step.node for step in self.fallbacks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"fallback_nodes": self.fallback_nodes}


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of compute nodes that read a DequantizeLinear output (the nodes onnxruntime runs in INT8)."""
    dequantized = {out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in QDQ_OPS and any(name in dequantized for name in node.input)
    ]


def fall_back(
    quantized: onnx.ModelProto, float_model: onnx.ModelProto, nodes: Iterable[str]
) -> onnx.ModelProto:
    """A copy of ``quantized`` in which ``nodes`` read their FP32 inputs again (see module doc).

    Node names are matched between the two graphs (onnxruntime's QDQ quantizer keeps them); float weights
    are copied from ``float_model``. Raises ``QuantizationError`` for a name found in only one graph.
    """
    model = copy.deepcopy(quantized)
    float_inputs = {node.name: list(node.input) for node in float_model.graph.node}
    float_weights = {init.name: init for init in float_model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    present = {init.name for init in model.graph.initializer}
    for name in nodes:
        if name not in by_name or name not in float_inputs:
            raise QuantizationError(
                f"cannot fall back node {name!r}: not in both the FP32 and the INT8 graph; "
                f"pass names from calibration.search.quantized_nodes()"
            )
        node = by_name[name]
        for index, original in enumerate(float_inputs[name]):
            if index < len(node.input) and node.input[index] != original:
                node.input[index] = original
                if original in float_weights and original not in present:
                    model.graph.initializer.append(float_weights[original])
                    present.add(original)
    _remove_dead_qdq(model)
    return model


def _remove_dead_qdq(model: onnx.ModelProto) -> None:
    """Drop Q/DQ nodes whose outputs nothing reads, then initializers nothing reads (to a fixed point)."""
    graph_outputs = {output.name for output in model.graph.output}
    while True:
        used = {name for node in model.graph.node for name in node.input} | graph_outputs
        dead = [
            node
            for node in model.graph.node
            if node.op_type in QDQ_OPS and not any(out in used for out in node.output)
        ]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers that no node reads and that are not graph outputs."""
    used = {name for node in model.graph.node for name in node.input} | {output.name for output in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


SERIALIZE_LIMIT = 64 << 20
"""Graphs larger than this (64 MiB) reach onnxruntime through a file in the work folder rather than as bytes, so a
serialized copy does not sit in memory beside the session while it is built (BERT-base and up)."""


def cpu_session(model: onnx.ModelProto, work: Path, engine: str = "onnxruntime") -> Any:
    """A quiet CPU session on ``model``: onnxruntime, or (`engine` "openvino") OpenVINO's CPU plugin at the f32
    hint; graphs past protobuf's 2 GB limit go through ``work`` with external data, graphs past
    :data:`SERIALIZE_LIMIT` through a file in ``work``."""
    if engine == "openvino":
        from graphs.core.openvino_sessions import open_compiled

        def opened(source: Path | bytes) -> Any:
            return open_compiled(source, "fp32")
    else:
        opened = open_session
    size = model.ByteSize()
    if size > SERIALIZE_LIMIT:
        path = work / "candidate.onnx"
        onnx.save_model(model, str(path), save_as_external_data=size > PROTO_LIMIT)
        return opened(path)
    return opened(model.SerializeToString())


def summarize(session: Any, batches: Sequence[Batch], metric: TaskMetric) -> list[np.ndarray]:
    """The metric's summary of `session`'s outputs on each batch; feeds the graph does not declare (e.g.
    ``token_type_ids`` for a model without it) are dropped."""
    names = {graph_input.name for graph_input in session.get_inputs()}
    return [metric.summarize(session.run(None, {k: v for k, v in feeds.items() if k in names}), feeds)
            for feeds in batches]


def evaluate(model: onnx.ModelProto, batches: Sequence[Batch], metric: TaskMetric, engine: str = "onnxruntime"
             ) -> list[np.ndarray]:
    """Run ``model`` on ``batches`` with onnxruntime (CPU), or OpenVINO's CPU plugin at the f32 hint (`engine`
    "openvino"), and return the metric's summary of each batch (:func:`summarize`)."""
    with tempfile.TemporaryDirectory(prefix="export-model-search-") as work:
        return summarize(cpu_session(model, Path(work), engine), batches, metric)


def _tensors(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return ({i.name for i in graph.input} | {i.name for i in graph.initializer}
            | {out for node in graph.node for out in node.output})

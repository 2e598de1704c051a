"""Static INT8 quantization of an exported FP32 graph, calibrated on real text, with named presets per target.

The default (``graph="fused"``) quantizes the fused ``model_optimized.onnx`` through :mod:`calibration.fused`:
fused Attention becomes ``QAttention``, every other weight MatMul a u8 x s8 QDQ pair onnxruntime runs as
``MatMulIntegerToFloat``, and Softmax, LayerNorm, GELU, residual sums and embeddings stay float. The ``unfused``
route quantizes ``model.onnx`` with onnxruntime's ``quantize_static`` (the ``cpu-avx512-vnni-unfused`` preset;
entropy and percentile calibration always run there), leaving MatMul outputs float: re-quantizing them loses
accuracy (docs/decisions/0004-int8-float-outputs.md). Then the accuracy search (:mod:`calibration.search`) puts
the most harmful nodes back in FP32 until the task metric holds.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from calibration.cpu import INT8_WEIGHT_RANGES, cpu_has_vnni, int8_weight_bits  # noqa: F401  (re-exported)
from calibration.fused import FUSED_METHODS, WEIGHT_ROUNDINGS, plan_fused
from calibration.metrics import TaskMetric, get_metric
from calibration.search import STRATEGIES, SearchReport, is_large, search_fallback
from graphs.core.errors import QuantizationError

logger = logging.getLogger(__name__)

METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "moving-average": CalibrationMethod.MinMax,  # MinMax with extra_options["CalibMovingAverage"]
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
FORMATS: dict[str, QuantFormat] = {"QDQ": QuantFormat.QDQ, "QOperator": QuantFormat.QOperator}
TYPES: dict[str, QuantType] = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

# Ops that carry quantized tensors but compute nothing: not counted as quantized compute nodes.
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _is_number(value: object, integer: bool = False) -> bool:
    """A JSON number (bool excluded); an integer when `integer`."""
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize. Defaults are the ``cpu-avx512-vnni`` preset; see :data:`PRESETS` for the others.

    Attributes:
        preset: name of the preset these values came from (recorded in the report; see ``from_preset``).
        method: calibration: ``minmax`` (default), ``entropy``, ``percentile`` or ``moving-average``.
        samples: number of calibration texts (default 128).
        seed: seed of the calibration sample (default 0).
        batch_size: texts per calibration batch (default 8); calibration memory grows with it, not with samples.
        format: ``QDQ`` (default) or ``QOperator``.
        activation_type / weight_type: ``uint8`` / ``int8`` (default U8S8, the VNNI path).
        per_channel: per-output-channel weight scales (default True).
        graph: ``fused`` (default: quantize ``model_optimized.onnx`` as QAttention + MatMulIntegerToFloat with
            SmoothQuant scaling, :mod:`calibration.fused`; the fast one) or ``unfused`` (``model.onnx`` through
            onnxruntime's ``quantize_static``). entropy and percentile always run on the unfused graph.
        smooth_alpha: SmoothQuant migration strength for the fused graph, in [0, 1]; None (default) picks it
            per tensor by measured error, 0 turns smoothing off.
        per_token_ffn: fused graph: quantize the input of the FFN output MatMul (the GELU/ReLU output) with one
            scale per token computed at run time instead of one static range (default True; see
            ``calibration.fused._per_token_matmul`` and docs/decisions/0003-per-token-ffn-output.md).
        bias_correction: fused graph: add each INT8 node's mean output error on the calibration rows back into
            the bias that follows it (default True; ``calibration.fused.bias_corrections``; free at run time).
        weight_rounding: fused graph: ``gptq`` (default) rounds each node's int8 weights by GPTQ against
            ``X^T X`` of its calibration inputs, 256 real tokens of every batch (``calibration.fused._gptq``: the
            rounding that minimises the node's product error on real inputs), ``nearest`` rounds each weight to
            its nearest level. Same file size and speed.
        op_types: op types to quantize (default MatMul and the fused Attention: the sensitive ops stay float).
        weights_only_matmul: quantize only MatMuls whose second input is a weight (default True): the
            attention score and context MatMuls multiply two activations and stay float.
        quantize_outputs: re-quantize outputs of quantized ops (default False: float output, see module doc).
        float_before_activation: MatMuls whose output reaches the FFN activation (GELU, ReLU, ...) through
            elementwise ops stay float (default False: every weight MatMul is quantized, the fast end, and
            the accuracy search of :func:`quantize_model` decides what goes back to FP32).
        exclude_nodes: regular expressions; nodes whose name matches any one stay float (default none).
        activation_symmetric / weight_symmetric: symmetric ranges (TensorRT wants both).
        percentile: kept percentile for ``method="percentile"`` (default 99.999).
        calibration_chunk_batches: batches per calibration chunk for entropy/percentile (default 1): bounds
            the activations a histogram calibrator holds at once.
        max_accuracy_drop: allowed task-metric drop as a fraction (default 0.01 = 1%) when ``quantize_model``
            gets validation batches; see :mod:`calibration.metrics` for the bars it sets per task.
        search_ranking_batches: held-out batches used to rank node harm in the search (default 8).
        search_budget_s: wall-clock seconds the accuracy search may take (default 300). When they run out, the
            nodes not yet ranked go back to FP32 together, or, once ranking is done, every node not yet tried
            does; one evaluation then records the scores, and the report says ``budget_reached`` and why each node
            stayed FP32.
        search_strategy: ``paired`` (default: one paired FP32 / INT8 probe run ranks the nodes by their own INT8
            error, then the shortest prefix of that ranking that meets the bars goes back, found by doubling and
            bisection: a few evaluations whatever the node count) or ``leave-one-out`` (one trial per node ranks,
            nodes go back one at a time; see :mod:`calibration.search`).
        validation_samples: held-out texts the search judges accuracy on (default 64, raised to what the
            task's bar needs, see ``validation_count``; the pipeline keeps them disjoint from the texts parity
            reports on).
        tune: quantize with every CPU preset and keep the fastest on this machine (default False; the pipeline
            does it, see :mod:`calibration.tune`).
        int8_weights: range of the int8 weights (see :func:`int8_weight_bits`): "full" [-127, 127], exact only
            on CPUs with VNNI (AVX-512 VNNI or AVX-VNNI) or ARM; "reduced" [-63, 63] (7 bits), exact on every x86
            CPU (onnxruntime's AVX2 u8 x s8 kernels saturate int16 pair sums with full-range weights); "auto"
            (default): "full" where this machine has VNNI or is not x86, else "reduced".
    """

    preset: str = "cpu-avx512-vnni"
    method: str = "minmax"
    samples: int = 128
    seed: int = 0
    batch_size: int = 8
    format: str = "QDQ"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    graph: str = "fused"
    smooth_alpha: float | None = None
    per_token_ffn: bool = True
    bias_correction: bool = True
    weight_rounding: str = "gptq"
    op_types: tuple[str, ...] = ("MatMul", "Attention")
    weights_only_matmul: bool = True
    quantize_outputs: bool = False
    float_before_activation: bool = False
    exclude_nodes: tuple[str, ...] = ()
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    percentile: float = 99.999
    calibration_chunk_batches: int = 1
    max_accuracy_drop: float = 0.01
    search_ranking_batches: int = 8
    search_budget_s: float = 300.0
    search_strategy: str = "paired"
    validation_samples: int = 64
    tune: bool = False
    int8_weights: str = "auto"

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} not in {sorted(METHODS)}")
        if self.format not in FORMATS:
            problems.append(f"format {self.format!r} not in {sorted(FORMATS)}")
        for name in ("activation_type", "weight_type"):
            if getattr(self, name) not in TYPES:
                problems.append(f"{name} {getattr(self, name)!r} not in {sorted(TYPES)}")
        # Types first (a --config replay can hold anything JSON can), then ranges; every range test below is
        # written so that NaN fails it (a comparison with NaN is False), and infinities are outside every range.
        integers = ("samples", "seed", "batch_size", "calibration_chunk_batches", "search_ranking_batches",
                    "validation_samples")
        numbers = ("percentile", "max_accuracy_drop", "search_budget_s") + (("smooth_alpha",) if self.smooth_alpha is not None else ())
        wrong = [f"{name} must be {'an integer' if name in integers else 'a number'}, got {getattr(self, name)!r}"
                 for name in (*integers, *numbers) if not _is_number(getattr(self, name), integer=name in integers)]
        if wrong:
            raise ValueError("invalid QuantizationConfig: " + "; ".join(wrong))
        for name in ("samples", "batch_size", "calibration_chunk_batches", "search_ranking_batches", "validation_samples"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.search_budget_s < 1e7:
            problems.append(f"search_budget_s must be a positive number of seconds, got {self.search_budget_s}")
        if not 0.0 < self.percentile <= 100.0:
            problems.append(f"percentile must be in (0, 100], got {self.percentile}")
        if not 0.0 < self.max_accuracy_drop < 1.0:
            problems.append(f"max_accuracy_drop must be a finite fraction in (0, 1), got {self.max_accuracy_drop}")
        if self.graph not in ("fused", "unfused"):
            problems.append(f"graph {self.graph!r} not in ['fused', 'unfused']")
        if self.search_strategy not in STRATEGIES:
            problems.append(f"search_strategy {self.search_strategy!r} not in {list(STRATEGIES)}")
        if self.int8_weights not in INT8_WEIGHT_RANGES:
            problems.append(f"int8_weights {self.int8_weights!r} not in {list(INT8_WEIGHT_RANGES)}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            problems.append(f"weight_rounding {self.weight_rounding!r} not in {list(WEIGHT_ROUNDINGS)}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            problems.append(f"smooth_alpha must be in [0, 1] or None, got {self.smooth_alpha}")
        if self.graph == "fused" and self.method in FUSED_METHODS and (
            self.format != "QDQ" or self.activation_type != "uint8" or self.weight_type != "int8"
            or not self.per_channel or not self.weight_symmetric or self.quantize_outputs
        ):
            problems.append("the fused graph is quantized only as U8S8 QDQ with symmetric per-channel weights and "
                            "float outputs; pass graph='unfused' for other formats")
        if not self.op_types:
            problems.append("op_types is empty; name at least one op type, e.g. MatMul")
        for pattern in self.exclude_nodes:
            try:
                re.compile(pattern)
            except re.error as error:
                problems.append(f"exclude_nodes pattern {pattern!r} is not a regular expression ({error})")
        if problems:
            raise ValueError("invalid QuantizationConfig: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> QuantizationConfig:
        """The preset ``name`` with ``overrides`` applied; raises ``ValueError`` naming the known presets."""
        if name not in PRESETS:
            raise ValueError(f"unknown quantization preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def weight_bits(self) -> int:
        """7 or 8: what ``int8_weights`` resolves to on this machine."""
        return int8_weight_bits(self.int8_weights)

    @property
    def uses_fused_graph(self) -> bool:
        """True when this recipe quantizes ``model_optimized.onnx`` (see ``graph``), else ``model.onnx``."""
        return self.graph == "fused" and self.method in FUSED_METHODS

    def validation_count(self, metric: TaskMetric | str) -> int:
        """Held-out texts the accuracy search judges on: ``validation_samples``, or more where ``metric``'s bar
        at ``max_accuracy_drop`` needs more examples to allow a single disagreement (QA and classification at
        1%: 100; see ``TaskMetric.min_examples``)."""
        return max(self.validation_samples, get_metric(metric).min_examples(self.max_accuracy_drop))


_CPU = QuantizationConfig()
PRESETS: dict[str, QuantizationConfig] = {
    "cpu-avx512-vnni": _CPU,
    # Every activation with one static range (no run-time per-token scale): a little faster, less accurate.
    "cpu-avx512-vnni-static": dataclasses.replace(_CPU, preset="cpu-avx512-vnni-static", per_token_ffn=False),
    # The previous default: static QDQ on the unfused graph via onnxruntime's quantize_static (MatMulIntegerToFloat
    # next to float attention): measured 0.62x of FP32 latency on MiniLM where the fused route runs at 0.47x.
    "cpu-avx512-vnni-unfused": dataclasses.replace(_CPU, preset="cpu-avx512-vnni-unfused", graph="unfused"),
    # The unfused recipe in QOperator form (QLinearMatMul, outputs re-quantized): measured less accurate and no
    # faster than cpu-avx512-vnni-unfused on MiniLM; for runtimes that only execute QOperator graphs.
    "cpu-qoperator-u8s8": dataclasses.replace(
        _CPU, preset="cpu-qoperator-u8s8", format="QOperator", quantize_outputs=True, graph="unfused"
    ),
    # TensorRT and CUDA want symmetric int8 on both sides with explicit Q/DQ around every quantized op.
    "gpu-tensorrt-s8s8": dataclasses.replace(
        _CPU,
        preset="gpu-tensorrt-s8s8",
        activation_type="int8",
        activation_symmetric=True,
        weight_symmetric=True,
        quantize_outputs=True,
        op_types=("MatMul", "Gemm"),
        graph="unfused",
    ),
}
"""Named recipes; ``QuantizationConfig.from_preset(name, **overrides)`` starts from one."""


@dataclass
class QuantizationReport:
    """What :func:`quantize_model` did; ``to_dict()`` is what the manifest stores."""

    preset: str
    method: str
    format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    op_types: list[str]
    quantized_nodes: int
    float_nodes_kept: list[str]
    samples: int
    sample_sha256: str
    seconds: float
    quantized_op_counts: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fallback_nodes: list[str] = field(default_factory=list)
    graph: str = "unfused"
    """Which graph was quantized: ``fused`` (model_optimized.onnx) or ``unfused`` (model.onnx)."""
    smoothing: dict[str, Any] = field(default_factory=dict)
    """Fused route: per quantized input tensor, SmoothQuant alpha, largest channel division, u8 scale/zero point."""
    bias_corrected: list[str] = field(default_factory=list)
    """Fused route: INT8 nodes whose following bias carries their mean calibration error (bias correction)."""
    search: dict[str, Any] | None = None
    """The accuracy search's :class:`calibration.search.SearchReport` as a dict; None when not run."""
    weight_bits: int = 8
    """8: int8 weights in [-127, 127] (exact only on CPUs with VNNI, or ARM); 7: in [-63, 63], exact on every x86
    CPU. See :func:`int8_weight_bits`."""
    cpu_vnni: bool | None = None
    """Whether the machine that built the file has VNNI (None: unknown)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(
        cls, config: QuantizationConfig, counts: Mapping[str, int], kept: list[str], reader: CalibrationDataReader,
        sample_sha256: str, seconds: float, search: SearchReport | None, graph: str = "unfused",
        smoothing: dict[str, Any] | None = None, bias_corrected: list[str] | None = None,
    ) -> QuantizationReport:
        """The report of either route: the recipe from ``config``, what was quantized and what stayed float."""
        return cls(
            preset=config.preset, method=config.method, format=config.format, activation_type=config.activation_type,
            weight_type=config.weight_type, per_channel=config.per_channel, op_types=list(config.op_types),
            quantized_nodes=sum(counts.values()), float_nodes_kept=kept,
            samples=len(reader.texts) if hasattr(reader, "texts") else 0,  # type: ignore[attr-defined]
            sample_sha256=sample_sha256, seconds=round(seconds, 3), quantized_op_counts=dict(counts),
            config=config.to_dict(), fallback_nodes=[] if search is None else search.fallback_nodes,
            graph=graph, smoothing=smoothing or {}, bias_corrected=bias_corrected or [],
            search=None if search is None else search.to_dict(), weight_bits=config.weight_bits,
            cpu_vnni=cpu_has_vnni(),
        )


_ACTIVATIONS = frozenset({"Erf", "Gelu", "FastGelu", "BiasGelu", "Relu", "Tanh", "Sigmoid"})
_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})


def _feeds_activation(
    node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]], depth: int = 5
) -> bool:
    """True when ``node``'s output reaches an activation op through at most ``depth`` elementwise ops.

    Matches the FFN input projection of every BERT-family export (bias Add, then GELU as Div/Erf/Mul/Add,
    or ReLU) but not Q/K/V (Reshape next) or output projections (residual Add, then LayerNorm):

        MatMul -> Add(bias) -> Div -> Erf -> ...      (GELU, erf form)
        MatMul -> Add(bias) -> Relu
    """
    frontier, seen = list(node.output), set()
    for _ in range(depth):
        following = []
        for name in frontier:
            for consumer in consumers.get(name, []):
                if consumer.op_type in _ACTIVATIONS:
                    return True
                if consumer.op_type in _ELEMENTWISE and id(consumer) not in seen:
                    seen.add(id(consumer))
                    following.extend(consumer.output)
        frontier = following
    return False


def _excluded_nodes(model: onnx.ModelProto, config: QuantizationConfig) -> list[str]:
    """Names of nodes of the quantized op types that stay float: matched by a pattern, or activation x activation."""
    weights = {init.name for init in model.graph.initializer}
    # A weight may reach MatMul through a Constant node or a Transpose of an initializer.
    weights |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    patterns = [re.compile(pattern) for pattern in config.exclude_nodes]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    excluded = []
    for node in model.graph.node:
        if node.op_type not in config.op_types:
            continue
        if any(pattern.search(node.name) for pattern in patterns):
            excluded.append(node.name)
        elif config.weights_only_matmul and node.op_type == "MatMul" and node.input[1] not in weights:
            excluded.append(node.name)
        elif config.float_before_activation and _feeds_activation(node, consumers):
            excluded.append(node.name)
    return excluded


def _keep_float_consumers(
    model: onnx.ModelProto, op_types: tuple[str, ...], excluded: set[str]
) -> int:
    """Point every consumer of a dequantized activation that is not a quantized op back at the float tensor.

    onnxruntime 1.31's QDQ quantizer rewires *all* consumers of a quantized activation to the
    DequantizeLinear output. In a BERT layer the LayerNorm output feeds both the next MatMuls and the
    residual Add, so without this the residual stream itself is rounded to 8 bits:

        LayerNorm -> Q -> DQ -> MatMul           LayerNorm -> Q -> DQ -> MatMul
                          └---> Add (residual)  becomes  └---------------> Add (residual, float)

    Measured on all-MiniLM-L6-v2 this is what cost top-1 neighbour agreement; the MatMuls still read the
    DequantizeLinear output, so onnxruntime's fusion into integer kernels is unchanged. Returns the number
    of node inputs rewired.
    """
    initializers = {init.name for init in model.graph.initializer}
    quantize_input = {
        node.output[0]: node.input[0]
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[0] not in initializers
    }
    float_of = {
        node.output[0]: quantize_input[node.input[0]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in quantize_input
    }
    rewired = 0
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS or (node.op_type in op_types and node.name not in excluded):
            continue
        for index, name in enumerate(node.input):
            if name in float_of:
                node.input[index] = float_of[name]
                rewired += 1
    return rewired


def _count_quantized(model: onnx.ModelProto, op_types: tuple[str, ...]) -> tuple[Counter[str], list[str]]:
    """Count compute nodes fed by DequantizeLinear or in QLinear/Integer form, and list float ones kept."""
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    quantized: Counter[str] = Counter()
    kept = []
    for node in model.graph.node:
        if node.op_type in _QDQ_OPS:
            continue
        if node.op_type.startswith("QLinear") or node.op_type in {"MatMulInteger", "QAttention", "QGemm"}:
            quantized[node.op_type] += 1
        elif node.op_type in op_types:
            if any(produced_by.get(name) == "DequantizeLinear" for name in node.input[:2]):
                quantized[node.op_type] += 1
            else:
                kept.append(node.name)
    return quantized, kept


def quantize_model(
    model_path: Path,
    output_path: Path,
    reader: CalibrationDataReader,
    config: QuantizationConfig = QuantizationConfig(),  # noqa: B008 - frozen, so a shared default is safe
    sample_sha256: str = "",
    validation: Sequence[Mapping[str, np.ndarray]] | None = None,
    metric: TaskMetric | str = "embedding",
) -> QuantizationReport:
    """Calibrate ``model_path`` (the unfused FP32 ``model.onnx``) on ``reader`` and write INT8 to ``output_path``.

    Args:
        model_path: FP32 ONNX graph; pass the unfused export, not ``model_optimized.onnx`` (see module doc).
        output_path: where the quantized graph goes (its folder must exist).
        reader: calibration batches, e.g. :class:`calibration.data.TextCalibrationReader`; read to the end.
        config: quantization recipe (default: the ``cpu-avx512-vnni`` preset).
        sample_sha256: digest of the calibration sample (from ``sample_texts``), recorded in the report.
        validation: held-out input batches (tokenized like the calibration batches, from texts the
            calibration never saw, e.g. ``split_texts(builtin_texts())[1]``). When given, the accuracy
            search (:func:`calibration.search.search_fallback`) puts the most harmful quantized nodes back in
            FP32 until ``metric`` meets its bars for ``config.max_accuracy_drop``; default None: no search.
        metric: a :class:`calibration.metrics.TaskMetric` or a name from ``calibration.metrics.METRICS``
            (the pipeline's task names work); default ``"embedding"``. Used only with ``validation``.

    Raises:
        QuantizationError: onnxruntime failed, no node was quantized, or the search could not meet the bars.
    """
    model_path, output_path = Path(model_path), Path(output_path)
    logger.info(
        "quantizing %s (preset %s, %s, %s)", model_path.name, config.preset, config.format, config.method
    )
    start = time.perf_counter()
    if not model_path.is_file():
        raise QuantizationError(f"model to quantize {model_path} does not exist; export the FP32 model first")
    if config.uses_fused_graph:
        return _quantize_fused(model_path, output_path, reader, config, sample_sha256, validation, metric, start)
    model = onnx.load(str(model_path), load_external_data=False)
    excluded = _excluded_nodes(model, config)
    large = is_large(model)
    del model
    extra: dict[str, Any] = {
        "ActivationSymmetric": config.activation_symmetric,
        "WeightSymmetric": config.weight_symmetric,
        # onnxruntime 1.31 fails on graphs with contrib ops ("Unable to find data type for weight_name")
        # unless a default tensor type is given; harmless on plain graphs.
        "DefaultTensorType": onnx.TensorProto.FLOAT,
    }
    if not config.quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(config.op_types)
    if config.method == "moving-average":
        extra["CalibMovingAverage"] = True
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    if config.method in ("entropy", "percentile"):
        # onnxruntime 1.31 histogram calibrators keep every batch's activations until collect_data returns;
        # this option (despite its name, honoured for every method) makes quantize_static call collect_data
        # once per chunk of the reader (set_range/len), so only one chunk is held.
        if not hasattr(reader, "set_range") or not hasattr(reader, "__len__"):
            raise QuantizationError(
                f"method {config.method!r} needs a reader with set_range() and len() to calibrate in chunks; "
                f"use calibration.data.TextCalibrationReader"
            )
        extra["CalibStridedMinMax"] = config.calibration_chunk_batches
        if len(reader) % config.calibration_chunk_batches:  # type: ignore[arg-type]
            raise QuantizationError(
                f"{len(reader)} calibration batches do not divide into chunks of "  # type: ignore[arg-type]
                f"{config.calibration_chunk_batches}; set calibration_chunk_batches to a divisor (1 always works)"
            )
    with tempfile.TemporaryDirectory(prefix="export-model-quant-") as work:
        staged = Path(work) / "model_int8.onnx"
        try:
            quantize_static(
                str(model_path),
                str(staged),
                reader,
                quant_format=FORMATS[config.format],
                op_types_to_quantize=list(config.op_types),
                per_channel=config.per_channel,
                reduce_range=config.weight_bits == 7,  # 7-bit weights: exact without VNNI (int8_weight_bits)
                activation_type=TYPES[config.activation_type],
                weight_type=TYPES[config.weight_type],
                nodes_to_exclude=excluded,
                use_external_data_format=large,
                calibrate_method=METHODS[config.method],
                extra_options=extra,
            )
        except (ValueError, RuntimeError, AttributeError, KeyError, AssertionError, TypeError) as error:
            raise QuantizationError(
                f"onnxruntime quantize_static failed on {model_path.name} with preset {config.preset}: "
                f"{type(error).__name__}: {error}; pass the unfused model.onnx or another --quantize-preset"
            ) from error
        quantized_model = onnx.load(str(staged))
        rewired = _keep_float_consumers(quantized_model, config.op_types, set(excluded))
        logger.info("%d non-quantized consumers of quantized activations read the float tensor again", rewired)
        search = None
        if validation is not None:
            float_model = onnx.load(str(model_path))
            quantized_model, search = search_fallback(
                float_model,
                quantized_model,
                validation,
                get_metric(metric),
                config.max_accuracy_drop,
                config.search_ranking_batches,
                budget_s=config.search_budget_s,
                strategy=config.search_strategy,
            )
            del float_model
        counts, kept = _count_quantized(quantized_model, config.op_types)
        if not counts and search is not None and search.fallback_nodes:
            raise _all_fell_back(config, len(search.fallback_nodes), search.budget_reached)
        if not counts:
            raise QuantizationError(
                f"no node of {list(config.op_types)} was quantized in {model_path.name} "
                f"({len(excluded)} excluded); check op_types and exclude_nodes"
            )
        save_quantized(quantized_model, output_path, large)
    seconds = time.perf_counter() - start
    report = QuantizationReport.of(config, counts, kept, reader, sample_sha256, seconds, search)
    logger.info(
        "quantized %d nodes (%s), kept %d float, in %.1f s -> %s",
        report.quantized_nodes,
        dict(counts),
        len(kept),
        seconds,
        output_path,
    )
    return report


def _all_fell_back(config: QuantizationConfig, nodes: int, budget_reached: str | None = None) -> QuantizationError:
    if budget_reached:
        return QuantizationError(
            f"the accuracy search ran out of its {config.search_budget_s:g} s budget while {budget_reached} and put "
            f"all {nodes} quantized nodes back in FP32; allow it more time (--search-budget) or a larger drop "
            "(--max-accuracy-drop)"
        )
    return QuantizationError(
        f"INT8 cannot keep the task metric within --max-accuracy-drop {config.max_accuracy_drop:g} on this "
        f"model: all {nodes} quantized nodes had to go back to FP32; allow a larger drop "
        "(--max-accuracy-drop) or calibrate on texts closer to the deployment data (--calibration-data)"
    )


def save_quantized(model: onnx.ModelProto, output_path: Path, large: bool) -> None:
    # A fixed data-file name: onnx's default is a random uuid, which would make two runs' artifacts differ.
    onnx.save_model(model, str(output_path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=output_path.name + ".data")


def _quantize_fused(
    model_path: Path, output_path: Path, reader: CalibrationDataReader, config: QuantizationConfig,
    sample_sha256: str, validation: Sequence[Mapping[str, np.ndarray]] | None, metric: TaskMetric | str,
    start: float,
) -> QuantizationReport:
    """The ``graph="fused"`` route (:mod:`calibration.fused`): plan, build with every target INT8, search."""
    model = onnx.load(str(model_path))
    large = is_large(model)
    try:
        plan = plan_fused(model, reader, config.op_types, config.exclude_nodes, config.method, config.smooth_alpha,
                          config.seed, config.per_token_ffn, config.bias_correction, config.weight_rounding,
                          config.weight_bits)
    except (RuntimeError, ValueError) as error:  # onnxruntime refused the augmented graph
        raise QuantizationError(
            f"calibrating the fused graph {model_path.name} failed ({type(error).__name__}: {error}); "
            "pass --quantization-preset cpu-avx512-vnni-unfused to quantize model.onnx instead"
        ) from error
    names = [target.name for target in plan.targets]
    targeted = set(names)
    kept = [node.name for node in model.graph.node if node.op_type in config.op_types and node.name not in targeted]
    del model  # the smoothed twin is the FP32 reference from here on (equal in exact arithmetic; one copy less)
    quantized_model = plan.build(names)
    search = None
    if validation is not None:
        quantized_model, search = search_fallback(
            plan.smoothed, quantized_model, validation, get_metric(metric), config.max_accuracy_drop,
            config.search_ranking_batches, build=plan.build, candidates=names, budget_s=config.search_budget_s,
            strategy=config.search_strategy,
            # An Attention's correction is in its own QKV bias, which the probe copies; a MatMul's is in the next
            # node's bias, outside the probe: added to the MatMul's INT8 output there.
            shifts={name: shift for name, (reader, _, shift) in plan.corrections.items() if reader != name},
        )
    fallen = set() if search is None else set(search.fallback_nodes)
    counts = Counter(target.op_type for target in plan.targets if target.name not in fallen)
    if not counts:
        raise _all_fell_back(config, len(names), search.budget_reached if search is not None else None)
    save_quantized(quantized_model, output_path, large)
    seconds = time.perf_counter() - start
    report = QuantizationReport.of(config, counts, kept + sorted(fallen), reader, sample_sha256, seconds, search,
                                   graph="fused", smoothing=plan.smoothing_report(),
                                   bias_corrected=sorted(set(plan.corrections) - fallen))
    logger.info("quantized %d nodes of the fused graph (%s), %d back in FP32, in %.1f s -> %s",
                report.quantized_nodes, dict(counts), len(fallen), seconds, output_path)
    return report

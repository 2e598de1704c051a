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
    quantize_static,
)

from calibration.cpu import cpu_has_vnni
from calibration.fused import plan_fused
from calibration.metrics import TaskMetric, get_metric
from calibration.search import SearchReport, is_large, search_fallback
from calibration.search_core import QDQ_OPS
from calibration.settings import FORMATS, METHODS, PRESETS, TYPES, QuantizationConfig  # noqa: F401  (re-exported)
from calibration.unpack import unpack_biased_attention
from graphs.core.errors import QuantizationError

logger = logging.getLogger(__name__)



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
        if node.op_type in QDQ_OPS or (node.op_type in op_types and node.name not in excluded):
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
        if node.op_type in QDQ_OPS:
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
                engine=config.search_engine,
                refine_share=config.search_refine_share,
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
    unpacked = unpack_biased_attention(model)  # QKV of an Attention QAttention cannot carry: a MatMul target
    if unpacked:
        logger.info("%d Attention nodes with an attention_bias run as MatMul + MultiHeadAttention in INT8",
                    len(unpacked))
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
            strategy=config.search_strategy, engine=config.search_engine, refine_share=config.search_refine_share,
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

"""How to quantize: the validated :class:`QuantizationConfig`, its named presets, and onnxruntime's enums by name.

Every field validates itself when the config is built (from flags, a ``--config`` replay or Python), so a bad
value is refused before any work. Measurements behind the defaults: docs/decisions/.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

from calibration.cpu import INT8_WEIGHT_RANGES, int8_weight_bits
from calibration.metrics import TaskMetric, get_metric
from calibration.ranges import FUSED_METHODS, WEIGHT_ROUNDINGS
from calibration.search import STRATEGIES

METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "moving-average": CalibrationMethod.MinMax,  # MinMax with extra_options["CalibMovingAverage"]
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
FORMATS: dict[str, QuantFormat] = {"QDQ": QuantFormat.QDQ, "QOperator": QuantFormat.QOperator}
TYPES: dict[str, QuantType] = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}


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
            ``X^T X`` of its calibration inputs, 256 real tokens of every batch (``calibration.ranges._gptq``: the
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
        search_engine: what runs the search's candidate graphs: ``onnxruntime`` (default, CPU) or ``openvino``
            (its CPU plugin, f32 hint: ``model_qdq.onnx`` is judged on the engine it is built for, whose INT8
            arithmetic is close to onnxruntime's but not the same). The FP32 reference runs on onnxruntime.
        search_refine_share: ``paired``: the refinement (nodes of the passing prefix going back to INT8) may take
            at most this share of the time the search took before it (default 1.0: it at most doubles it).
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
    search_engine: str = "onnxruntime"
    search_refine_share: float = 1.0
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
        numbers = ("percentile", "max_accuracy_drop", "search_budget_s", "search_refine_share") + (("smooth_alpha",) if self.smooth_alpha is not None else ())
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
        if not 0.0 <= self.search_refine_share <= 10.0:
            problems.append(f"search_refine_share must be in [0, 10], got {self.search_refine_share}")
        if self.search_engine not in ("onnxruntime", "openvino"):
            problems.append(f"search_engine {self.search_engine!r} not in ['onnxruntime', 'openvino']")
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

"""Static INT8 on the FUSED graph (``model_optimized.onnx``), with SmoothQuant scaling chosen per tensor.

Why the fused graph: onnxruntime's CPU kernels for a quantized BERT layer are fastest as ``QAttention`` (QKV
projection in u8 x s8, attention in float) plus ``MatMulIntegerToFloat`` for the other weight MatMuls, next to
the fused float ``BiasGelu`` / ``LayerNormalization``. Measured on the real all-MiniLM-L6-v2 (seq 128, 2
threads): 0.47x of ``model.onnx`` latency, where static QDQ on the unfused graph ran at 0.62x. onnxruntime's
``quantize_static`` cannot calibrate a fused graph (contrib ops carry no shape information) and quantizes
``Attention`` only dynamically with 7-bit weights, so this module writes the graph itself::

    x -> Mul(1/s) -> QuantizeLinear(scale, zp) -> QAttention(W_qkv * s as int8, per-column scales)
    x -> Mul(1/s) -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear(W * s as int8, axis 1)
                                                          (onnxruntime fuses this into MatMulIntegerToFloat)

Why SmoothQuant: BERT activations carry a few outlier channels (on MiniLM one LayerNorm output channel reaches
30 while the median channel stays under 2, and one GELU output channel reaches 20), so a per-tensor 8-bit range
wastes most of its levels. Dividing activation channel j by ``s_j`` and multiplying weight row j by ``s_j`` is
exact in float and moves the outliers into the per-channel-quantized weights (Xiao et al., SmoothQuant, 2022).
The division is one elementwise ``Mul`` per quantized input. ``s_j = max|x_j|^a / max|W_j|^(1-a)``; the
migration strength ``a`` is chosen per tensor from a grid by the output error of that node's quantized
MatMul on sampled calibration rows (``smooth_alpha=None``), or fixed.

Weights: symmetric int8 per output column, rounded by GPTQ (Frantar et al., 2022) against ``X^T X`` of the
node's calibration inputs (256 real tokens of every batch) rather than to the nearest level (``weight_rounding``):
same levels, same kernels, a third less error on text the rounding did not see (MiniLM, every node INT8, 144
held-out passages: 1 - cosine 0.00078 -> 0.00051; from the 1024 sampled rows alone, 0.00060; from every real token,
0.00050).

Memory: one calibration pass keeps, per quantized input, per-channel running min/max (and their moving
averages) plus at most ``max_rows`` sampled rows (2048: about 130 MB for MiniLM; 512 rows chose alphas that gave
top-1 agreement 0.944 where 1024-2048 gave 0.958) and, for GPTQ, one running ``X^T X`` (about 130 MB for MiniLM,
whatever the number of texts); one tokenized batch exists at a time.

Fallback: the smoothed float graph is the FP32 twin of every quantized node (same node names), so putting a node
back in FP32 is building the graph without quantizing it; :func:`calibration.search.search_fallback` drives it.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.transformers.onnx_model import OnnxModel

from calibration.cpu import int8_weight_bits
from calibration.search import cpu_session, drop_unused_initializers
from graphs.core.errors import QuantizationError
from graphs.core.progress import bar
from graphs.graph_view import GraphView

logger = logging.getLogger(__name__)

ALPHA_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Migration strengths tried per tensor when ``smooth_alpha`` is None (0.0 = no smoothing)."""
FUSED_METHODS = frozenset({"minmax", "moving-average"})
"""Range methods this route computes; entropy and percentile run on the unfused graph (see quantize.py)."""
_MOVING_AVERAGE = 0.01
_ROW_EPSILON = 1e-6
PER_TOKEN_ZERO_POINTS = (4, 8, 16, 24, 32, 48, 64)
"""Zero points tried for a per-token input that goes negative (GELU: down to about -0.17)."""
MASK_INPUT = "attention_mask"
"""Feed whose zeros mark padding; sampled rows come from real tokens only."""
WEIGHT_ROUNDINGS = ("gptq", "nearest")
"""How int8 weights are rounded: GPTQ on the calibration rows (:func:`_gptq`) or to the nearest level."""
GRAM_ROWS = 256
"""Real tokens per calibration batch that GPTQ's ``X^T X`` sums over, every batch: far more rows than those sampled
for the other choices (64 per batch up to 2048; 1024 from 128 texts), which leave ``X^T X`` of a 1536-wide input
rank-deficient."""
GPTQ_DAMPING = 0.01
"""Added to the diagonal of ``X^T X`` as a fraction of its mean (the GPTQ paper's value)."""
PER_TOKEN_PRODUCERS = frozenset({"BiasGelu", "Gelu", "FastGelu", "Relu"})
"""Ops whose output (bounded below, heavy-tailed per token) is quantized per token with ``per_token_ffn``."""


@dataclass
class ActivationStats:
    """What one calibration pass keeps of one activation tensor (last axis = channels)."""

    channel_min: np.ndarray
    channel_max: np.ndarray
    average_min: np.ndarray
    average_max: np.ndarray
    rows: list[np.ndarray] = field(default_factory=list)
    sampled: int = 0
    gram: np.ndarray | None = None
    """``X^T X`` (float64) of up to ``gram_rows`` tokens per batch, every batch: GPTQ's Hessian. Real tokens only
    where the batch carries an attention mask (as for the sampled rows)."""

    def update(self, x: np.ndarray, rng: np.random.Generator, rows_per_batch: int, max_rows: int,
               mask: np.ndarray | None = None, gram_rows: int = 0, gram_rng: np.random.Generator | None = None) -> None:
        """Fold one batch in; ``mask`` ([batch, seq], 1 = real token) limits the sampled rows to real tokens
        (padding positions still count for the ranges: clipping them is harmless, but they would skew the
        choices made on the rows)."""
        real = None if mask is None or mask.shape != x.shape[:-1] else mask.reshape(-1) > 0
        x = x.reshape(-1, x.shape[-1])
        low, high = x.min(0), x.max(0)
        np.minimum(self.channel_min, low, out=self.channel_min)
        np.maximum(self.channel_max, high, out=self.channel_max)
        self.average_min += _MOVING_AVERAGE * (low - self.average_min)
        self.average_max += _MOVING_AVERAGE * (high - self.average_max)
        candidates = np.arange(len(x)) if real is None else np.flatnonzero(real)
        take = min(rows_per_batch, max_rows - self.sampled, len(candidates))
        if take > 0:
            self.rows.append(x[rng.choice(candidates, take, replace=False)].astype(np.float32))
            self.sampled += take
        if gram_rows:
            picked = x[(gram_rng or rng).choice(candidates, min(gram_rows, len(candidates)), replace=False)]
            picked = picked.astype(np.float32)
            product = (picked.T @ picked).astype(np.float64)
            if self.gram is None:
                self.gram = product
            else:
                self.gram += product

    @classmethod
    def first(cls, x: np.ndarray) -> ActivationStats:
        x = x.reshape(-1, x.shape[-1])
        low, high = x.min(0), x.max(0)
        return cls(low.copy(), high.copy(), low.copy(), high.copy())


@dataclass(frozen=True)
class Target:
    """A node this route can quantize: an ``Attention`` (QKV weight) or a MatMul with a 2-D weight."""

    name: str
    op_type: str
    activation: str
    weight: str


@dataclass
class InputPlan:
    """How one activation tensor is smoothed and quantized (shared by every target that reads it)."""

    smooth: np.ndarray  # s, one per channel (ones when alpha is 0)
    alpha: float
    scale: float
    zero_point: int
    per_token: bool = False
    """Quantized with one step per token computed at run time, see :func:`_per_token_matmul`; then
    ``zero_point`` is the fixed u8 zero point and ``scale`` the smallest step (so values down to
    ``-zero_point * scale``, the calibrated minimum, always fit)."""


def find_targets(model: onnx.ModelProto, op_types: Sequence[str], exclude: Sequence[str]) -> list[Target]:
    """Weight-bearing nodes of ``op_types`` ("Attention", "MatMul"); names matching an ``exclude`` pattern stay
    float. Attention with ``qkv_hidden_sizes`` (unequal Q/K/V widths) stays float: QAttention lacks it."""
    weights = {init.name: init for init in model.graph.initializer}
    patterns = [re.compile(pattern) for pattern in exclude]
    targets = []
    for node in model.graph.node:
        if node.op_type not in op_types or any(p.search(node.name) for p in patterns):
            continue
        if len(node.input) < 2 or node.input[1] not in weights or len(weights[node.input[1]].dims) != 2:
            continue
        if node.op_type == "Attention" and any(a.name == "qkv_hidden_sizes" for a in node.attribute):
            continue
        if not node.name:
            raise QuantizationError(f"a {node.op_type} node has no name; the fused graph must name every node")
        targets.append(Target(node.name, node.op_type, node.input[0], node.input[1]))
    return targets


def collect_stats(
    model: onnx.ModelProto, tensors: Sequence[str], reader: CalibrationDataReader, seed: int = 0,
    rows_per_batch: int = 64, max_rows: int = 2048, gram_rows: int = 0,
) -> dict[str, ActivationStats]:
    """One pass over ``reader``: per-channel ranges and sampled rows of ``tensors`` (see module doc)."""
    # The tensors become graph outputs for the session only: added to `model` and removed again (a copy of a
    # BERT-large graph would be 0.6 GB more during calibration).
    present = {output.name for output in model.graph.output}
    outputs = len(model.graph.output)
    for name in tensors:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    rng, gram_rng = np.random.default_rng(seed), np.random.default_rng([seed, 1])  # the rows as without a Gram
    stats: dict[str, ActivationStats] = {}
    with tempfile.TemporaryDirectory(prefix="export-model-stats-") as work:
        try:
            session = cpu_session(model, Path(work))
        finally:
            del model.graph.output[outputs:]
        names = [output.name for output in session.get_outputs()]
        inputs = {graph_input.name for graph_input in session.get_inputs()}
        wanted = [names.index(name) for name in tensors]
        if hasattr(reader, "rewind"):
            reader.rewind()
        with bar(total=len(reader) if hasattr(reader, "__len__") else None, desc="calibrating") as shown:
            while (feeds := reader.get_next()) is not None:
                outputs = session.run(None, {k: v for k, v in feeds.items() if k in inputs})
                mask = feeds.get(MASK_INPUT)
                for name, index in zip(tensors, wanted, strict=True):
                    x = outputs[index]
                    if name not in stats:
                        stats[name] = ActivationStats.first(x)
                    stats[name].update(x, rng, rows_per_batch, max_rows, mask, gram_rows, gram_rng)
                del outputs
                shown.update(1)
    if not stats:
        raise QuantizationError("the calibration reader gave no batch; pass at least one calibration text")
    return stats


def _quantize_weight(weight: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column in [-qmax, qmax]: (int8 weight, float32 scale per column)."""
    scale = np.maximum(np.abs(weight).max(0), 1e-12) / float(qmax)
    return np.clip(np.round(weight / scale), -qmax, qmax).astype(np.int8), scale.astype(np.float32)


def _gptq(weight: np.ndarray, gram: np.ndarray, damping: float = GPTQ_DAMPING,
          qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column with :func:`_quantize_weight`'s scales, the rounding chosen by GPTQ
    (Frantar et al., 2022): weight rows (input channels) are rounded one at a time, the channel with the most
    input energy first, and each rounding error is pushed onto the rows not yet rounded through the inverse of
    ``H = X^T X`` (``gram``) of the calibration rows ``X``. That minimises the product error ``||X W - X Wq||``
    the node makes on its inputs, not the weight error ``||W - Wq||`` that rounding to nearest minimises."""
    w = weight.astype(np.float64)
    scale = np.maximum(np.abs(w).max(0), 1e-12) / float(qmax)
    hessian = gram.astype(np.float64, copy=True)
    energy = np.diag(hessian).copy()
    hessian[np.flatnonzero(energy == 0), np.flatnonzero(energy == 0)] = 1.0  # a channel that is always zero
    hessian += damping * max(float(energy.mean()), 1e-12) * np.eye(len(hessian))
    order = np.argsort(-energy, kind="stable")
    w, hessian = w[order], hessian[np.ix_(order, order)]
    upper = np.linalg.cholesky(np.linalg.inv(hessian)).T  # H^-1 = U^T U
    q = np.empty_like(w)
    for k in range(len(w)):
        q[k] = np.clip(np.round(w[k] / scale), -qmax, qmax)
        error = (w[k] - q[k] * scale) / upper[k, k]
        w[k + 1 :] -= np.outer(upper[k, k + 1 :], error)
    rounded = np.empty_like(q)
    rounded[order] = q
    return rounded.astype(np.int8), scale.astype(np.float32)


def _range(stats: ActivationStats, smooth: np.ndarray, method: str) -> tuple[float, float]:
    low, high = (stats.average_min, stats.average_max) if method == "moving-average" else (
        stats.channel_min, stats.channel_max)
    return float(min((low / smooth).min(), 0.0)), float(max((high / smooth).max(), 0.0))


def _u8(low: float, high: float) -> tuple[float, int]:
    scale = max(high - low, 1e-8) / 255.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def _smoothing(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones_like(amax, dtype=np.float32)
    s = np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def _static(rows: np.ndarray, smooth: np.ndarray, scale: float, zero: int) -> np.ndarray:
    """Emulate the static u8 quantization of ``rows / smooth`` (float64): QuantizeLinear then dequantize."""
    return (np.clip(np.round(rows / smooth / scale) + zero, 0, 255) - zero) * scale


def _per_token(rows: np.ndarray, zero: int, min_step: float) -> np.ndarray:
    """Emulate :func:`_per_token_matmul`'s per-token u8 quantization of ``rows`` (float64)."""
    step = np.maximum(rows.max(1, keepdims=True) / (255 - zero), max(min_step, _ROW_EPSILON))
    return (np.clip(np.round(rows / step) + zero, 0, 255) - zero) * step


def _per_token_zero(stat: ActivationStats) -> list[tuple[int, float]]:
    """Candidate (zero point, smallest step) pairs for a per-token input whose minimum is ``stat``'s."""
    negative = float(max(0.0, -stat.channel_min.min()))
    if negative == 0.0:
        return [(0, 0.0)]
    return [(zero, negative / zero) for zero in PER_TOKEN_ZERO_POINTS]


def _product_error(
    xq: np.ndarray, weights: Sequence[np.ndarray], exact: Sequence[np.ndarray], smooth: np.ndarray | None = None,
    qmax: int = 127,
) -> float:
    """Summed mean squared error of the emulated products ``xq @ int8(W * s)`` against the float ``exact``."""
    error = 0.0
    for w, reference in zip(weights, exact, strict=True):
        wq, ws = _quantize_weight(w if smooth is None else w * smooth[:, None], qmax)
        error += float(np.mean((xq @ (wq * ws.astype(np.float64)) - reference) ** 2))
    return error


def plan_inputs(
    stats: dict[str, ActivationStats], weights: dict[str, list[np.ndarray]], method: str,
    smooth_alpha: float | None, per_token: frozenset[str] = frozenset(), qmax: int = 127,
) -> dict[str, InputPlan]:
    """Smoothing vector, migration strength and u8 range per activation tensor.

    ``weights[tensor]`` are the float weights of the targets reading it. With ``smooth_alpha=None`` each tensor
    gets the alpha of :data:`ALPHA_GRID` whose emulated u8 x s8 product is closest (mean squared error) to the
    float product on the sampled rows. Tensors in ``per_token`` are planned for per-token quantization.
    """
    plans = {}
    for tensor, stat in stats.items():
        amax = np.maximum(np.abs(stat.channel_min), np.abs(stat.channel_max))
        wmax = np.max([np.abs(w).max(1) for w in weights[tensor]], axis=0)
        row_wise = tensor in per_token
        # A per-token input is not smoothed: its own scale per token does what smoothing would, and no
        # Mul(1/s) pass runs in front of it (measured on MiniLM: the same error as the best alpha, and faster).
        grid = (0.0,) if row_wise else ALPHA_GRID if smooth_alpha is None else (smooth_alpha,)
        if len(grid) > 1 or row_wise:  # choices made by emulated error on the sampled rows
            rows = np.concatenate(stat.rows).astype(np.float64)
            exact = [rows @ w.astype(np.float64) for w in weights[tensor]]
        alpha = grid[0]
        if len(grid) > 1:
            errors = []
            for candidate in grid:
                s = _smoothing(amax, wmax, candidate).astype(np.float64)
                scale, zero = _u8(*_range(stat, s, method))
                xq = _static(rows, s, scale, zero)
                errors.append((_product_error(xq, weights[tensor], exact, s, qmax), candidate))
            alpha = min(errors)[1]
        smooth = _smoothing(amax, wmax, alpha)
        scale, zero = _u8(*_range(stat, smooth, method))
        if row_wise:  # the zero point whose emulated product error is smallest
            _, zero, scale = min((_product_error(_per_token(rows, zero, min_step), weights[tensor], exact, None, qmax),
                                  zero, min_step) for zero, min_step in _per_token_zero(stat))
        plans[tensor] = InputPlan(smooth, alpha, scale, zero, row_wise)
    return plans


def _smoothed_rows(rows: np.ndarray, plan: InputPlan) -> np.ndarray:
    """``rows`` as the INT8 node's input sees them: divided by the smoothing (float64)."""
    return rows.astype(np.float64) if plan.per_token else rows / plan.smooth.astype(np.float64)


def _emulated(rows: np.ndarray, plan: InputPlan, weight: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """What the INT8 node computes for activation ``rows`` under ``plan`` with the int8 ``weight`` (values,
    per-column scales) of its smoothed float weight (float64)."""
    if plan.per_token:
        xq = _per_token(rows.astype(np.float64), plan.zero_point, plan.scale)
    else:
        xq = _static(rows.astype(np.float64), plan.smooth.astype(np.float64), plan.scale, plan.zero_point)
    return xq @ (weight[0] * weight[1].astype(np.float64))


def target_weights(smoothed: onnx.ModelProto, targets: Sequence[Target]) -> dict[str, np.ndarray]:
    """Per target: the float weight the smoothed graph gives it (rows times ``s``, V columns divided by the next
    smoothing where folded): what its int8 weight stands for."""
    initializers = {init.name: init for init in smoothed.graph.initializer}
    nodes = {node.name: node for node in smoothed.graph.node}
    return {target.name: numpy_helper.to_array(initializers[nodes[target.name].input[1]]) for target in targets}


def int8_weights(
    weights: dict[str, np.ndarray], targets: Sequence[Target], plans: dict[str, InputPlan],
    stats: dict[str, ActivationStats], rounding: str = "gptq", qmax: int = 127,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per target: its int8 weight and per-column scales, its float weight (:func:`target_weights`) rounded by
    ``rounding``; GPTQ reads the ``gram`` of ``stats`` (collected with ``gram_rows``)."""
    if rounding not in WEIGHT_ROUNDINGS:
        raise QuantizationError(f"weight rounding {rounding!r} not in {list(WEIGHT_ROUNDINGS)}")
    result = {}
    for target in targets:
        weight = weights[target.name]
        if rounding == "nearest":
            result[target.name] = _quantize_weight(weight, qmax)
            continue
        plan, gram = plans[target.activation], stats[target.activation].gram
        if not plan.per_token:  # the node reads x / s
            inverse = 1.0 / plan.smooth.astype(np.float64)
            gram = gram * np.outer(inverse, inverse)
        result[target.name] = _gptq(weight, gram, qmax=qmax)
    return result


def _view(model: onnx.ModelProto) -> GraphView:
    return GraphView(OnnxModel(model))


def _bias_slot(view: GraphView, node: onnx.NodeProto, initializers: set[str]) -> tuple[str, int] | None:
    """(node name, input index) of the bias added to target ``node``'s output: the QKV bias of an Attention, else
    the bias input of the one node reading the MatMul's output (SkipLayerNormalization, BiasGelu/FastGelu, an
    Add or Sum of an initializer); None when there is none to adjust."""
    if node.op_type == "Attention":
        return (node.name, 2) if len(node.input) > 2 and node.input[2] in initializers else None
    reader = view.sole(node.output[0])
    if reader is None:
        return None
    slot = {"SkipLayerNormalization": 4, "BiasGelu": 1, "FastGelu": 1}.get(reader.op_type)
    if reader.op_type in ("Add", "Sum"):  # Sum: the fused residual (graphs/residual_sum.py)
        slot = next((i for i, name in enumerate(reader.input) if name in initializers), None)
    if slot is None or len(reader.input) <= slot or reader.input[slot] not in initializers or not reader.name:
        return None
    if slot == 4 or reader.op_type in ("BiasGelu", "FastGelu"):  # the MatMul output must be the data input
        if reader.input[0] != node.output[0]:
            return None
    return reader.name, slot


def bias_corrections(
    smoothed: onnx.ModelProto, targets: Sequence[Target], plans: dict[str, InputPlan],
    stats: dict[str, ActivationStats], weights: dict[str, np.ndarray], int8: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, tuple[str, int, np.ndarray]]:
    """Per target: where its bias is in the smoothed graph and the mean error of its INT8 product (float
    ``weights`` of :func:`target_weights` rounded as ``int8`` of :func:`int8_weights`) on the sampled calibration
    rows (float product minus emulated INT8 product), to be added to that bias when the node runs in INT8.

    Rounding weights to int8 shifts each output by ``mean(x) @ (W - Wq)`` on average, and BERT's activations
    have channels with large means (the LayerNorm outliers), so the shift is systematic; adding it back is
    bias correction (Nagel et al., 2019). On MiniLM's sampled rows it removes 5-45% of a node's output error
    measured on rows it was not estimated on.
    """
    corrections = {}
    view = _view(smoothed)
    nodes = {node.name: node for node in smoothed.graph.node}
    initializers = {init.name: init for init in smoothed.graph.initializer}
    names = set(initializers)
    for target in targets:
        slot = _bias_slot(view, nodes[target.name], names)
        weight = weights[target.name].astype(np.float64)
        if slot is None or tuple(initializers[nodes[slot[0]].input[slot[1]]].dims) != (weight.shape[1],):
            continue  # no bias, or a broadcast Add rather than one bias per output column
        plan = plans[target.activation]
        rows = np.concatenate(stats[target.activation].rows).astype(np.float64)
        shift = (_smoothed_rows(rows, plan) @ weight - _emulated(rows, plan, int8[target.name])).mean(0)
        corrections[target.name] = (*slot, shift.astype(np.float32))
    return corrections


def _v_third(packed: int) -> slice:
    """V's columns in the Q | K | V packing of onnxruntime's Attention weight and bias (equal widths)."""
    return slice(2 * (packed // 3), packed)


def foldable_attention(view: GraphView, activation: str, readers: set[str]) -> onnx.NodeProto | None:
    """The fused ``Attention`` that produces ``activation`` when a per-channel division of its output can move
    into its V projection instead of a ``Mul``: the output (the attention context) is channel j = head mix of
    V channel j, so dividing V's weight column and bias by ``s_j`` divides context channel j by ``s_j`` exactly.
    Needs equal Q/K/V widths, weight and bias initializers, and no reader of the output outside ``readers``."""
    producer = view.producers.get(activation)
    if (producer is None or producer.op_type != "Attention" or producer.output[0] != activation
            or any(a.name == "qkv_hidden_sizes" for a in producer.attribute) or len(producer.input) < 3
            or any(view.model.get_initializer(name) is None for name in producer.input[1:3])
            or activation in view.outputs):
        return None
    if any(node.name not in readers for node in view.consumers.get(activation, [])):
        return None
    return producer


def smooth_graph(
    model: onnx.ModelProto, targets: Sequence[Target], plans: dict[str, InputPlan]
) -> onnx.ModelProto:
    """The FP32 twin: each smoothed activation divided by ``s``, each target's weight rows multiplied by ``s``.
    Equal to ``model`` in exact arithmetic. The division is folded into the V projection of the Attention that
    produces the activation where :func:`foldable_attention` allows (the attention output projection's input),
    else it is one Mul shared by the activation's readers."""
    model = copy.deepcopy(model)
    weights = {init.name: init for init in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    readers, view = {target.name for target in targets}, _view(model)
    activations = dict.fromkeys(t.activation for t in targets if plans[t.activation].alpha)
    folded = {activation: attention for activation in activations
              if (attention := foldable_attention(view, activation, readers)) is not None}
    smoothed: dict[str, str] = {}
    new_inits: list[onnx.TensorProto] = []
    for target in targets:
        plan = plans[target.activation]
        if plan.alpha == 0.0:
            continue
        node = by_name[target.name]
        if target.activation not in folded:
            smoothed.setdefault(target.activation, f"{target.activation}_smoothed")
            node.input[0] = smoothed[target.activation]
        w = numpy_helper.to_array(weights[target.weight]) * plan.smooth[:, None]
        node.input[1] = f"{target.weight}_smoothed_{len(new_inits)}"
        new_inits.append(numpy_helper.from_array(w.astype(np.float32), node.input[1]))
    for activation, attention in folded.items():
        inverse = 1.0 / plans[activation].smooth.astype(np.float64)
        for slot in (1, 2):  # weight [hidden, 3 * width] and bias [3 * width]
            current = next(i for i in [*new_inits, *weights.values()] if i.name == attention.input[slot])
            value = numpy_helper.to_array(current).astype(np.float64)
            value[..., _v_third(value.shape[-1])] *= inverse
            attention.input[slot] = f"{attention.input[slot]}_v_folded"
            new_inits.append(numpy_helper.from_array(value.astype(np.float32), attention.input[slot]))
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for output in node.output:
            if output in smoothed:
                nodes.append(_divide(output, smoothed[output], plans[output].smooth, new_inits))
    for graph_input in model.graph.input:  # an activation may be a graph input (never in BERT, but be exact)
        if graph_input.name in smoothed:
            nodes.insert(0, _divide(graph_input.name, smoothed[graph_input.name], plans[graph_input.name].smooth,
                                    new_inits))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    drop_unused_initializers(model)
    return model


def _divide(tensor: str, output: str, smooth: np.ndarray, inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    name = f"{tensor}_inverse_smoothing"
    inits.append(numpy_helper.from_array((1.0 / smooth).astype(np.float32), name))
    return helper.make_node("Mul", [tensor, name], [output], f"{tensor}_smooth")


def build_int8(
    smoothed: onnx.ModelProto, targets: Sequence[Target], plans: dict[str, InputPlan], quantize: Sequence[str],
    int8: dict[str, tuple[np.ndarray, np.ndarray]], corrections: dict[str, tuple[str, int, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """The smoothed graph with the targets named in ``quantize`` in INT8 (the others stay FP32), each with its
    int8 weight and scales from ``int8`` (:func:`int8_weights`); the bias of each INT8 target with an entry in
    ``corrections`` (see :func:`bias_corrections`) gets its shift added."""
    model = without_initializers(smoothed)  # the initializers still read are copied at the end
    chosen = set(quantize)
    by_name = {target.name: target for target in targets}
    weights = {init.name: init for init in smoothed.graph.initializer}
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    nodes, inits = [], []
    named = {node.name: node for node in model.graph.node}
    for target, (reader, slot, shift) in (corrections or {}).items():
        if target in chosen:
            bias = named[reader].input[slot]
            corrected = numpy_helper.to_array(weights[bias]) + shift
            named[reader].input[slot] = f"{bias}_corrected_{len(inits)}"
            inits.append(numpy_helper.from_array(corrected.astype(np.float32), named[reader].input[slot]))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    for node in model.graph.node:
        if node.name not in chosen:
            nodes.append(node)
            continue
        target = by_name[node.name]
        plan = plans[target.activation]
        x = node.input[0]
        wq, ws = int8[node.name]
        if plan.per_token and node.op_type == "MatMul":
            nodes += _per_token_matmul(node, wq, ws, plan, inits, opset)
            continue
        if x not in quantized_inputs:
            tag = f"{x}_u8"
            inits += [numpy_helper.from_array(np.array(plan.scale, np.float32), f"{tag}_scale"),
                      numpy_helper.from_array(np.array(plan.zero_point, np.uint8), f"{tag}_zero_point")]
            nodes.append(helper.make_node("QuantizeLinear", [x, f"{tag}_scale", f"{tag}_zero_point"], [tag],
                                          f"{x}_quantize"))
            quantized_inputs[x] = (tag, f"{tag}_scale", f"{tag}_zero_point")
        xq, xs, xz = quantized_inputs[x]
        w = f"{node.name}_weight"
        inits += [numpy_helper.from_array(wq, f"{w}_s8"), numpy_helper.from_array(ws, f"{w}_scale"),
                  numpy_helper.from_array(np.zeros(ws.shape, np.int8), f"{w}_zero_point")]
        if node.op_type == "Attention":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            mask = node.input[3] if len(node.input) > 3 else ""
            nodes.append(helper.make_node(
                "QAttention", [xq, f"{w}_s8", node.input[2], xs, f"{w}_scale", mask, xz, f"{w}_zero_point"],
                list(node.output), node.name, domain="com.microsoft", **attrs))
        else:
            nodes += [
                helper.make_node("DequantizeLinear", [xq, xs, xz], [f"{node.name}_x"], f"{node.name}_dequantize_x"),
                helper.make_node("DequantizeLinear", [f"{w}_s8", f"{w}_scale", f"{w}_zero_point"], [f"{w}_float"],
                                 f"{node.name}_dequantize_w", axis=1),
                helper.make_node("MatMul", [f"{node.name}_x", f"{w}_float"], list(node.output), node.name),
            ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input} | {output.name for output in model.graph.output}
    model.graph.initializer.extend(init for init in smoothed.graph.initializer if init.name in read)
    model.graph.initializer.extend(inits)
    drop_unused_initializers(model)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with everything but its initializers (the weights of a big graph are most of its bytes:
    copying only those a variant still reads keeps one full copy from being made and dropped per build)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _copy_fields(source: Any, target: Any, skip: str) -> None:
    """Every set field of protobuf message ``source`` into ``target``, but ``skip``."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        # protobuf 6 has is_repeated; older releases only label
        repeated = (descriptor.is_repeated if hasattr(descriptor, "is_repeated")
                    else descriptor.label == descriptor.LABEL_REPEATED)
        if repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _per_token_matmul(
    node: onnx.NodeProto, wq: np.ndarray, ws: np.ndarray, plan: InputPlan, inits: list[onnx.TensorProto],
    opset: int = 17,
) -> list[onnx.NodeProto]:
    """``x @ W`` with ``x`` quantized to u8 with one step per token, computed at run time::

        x -> ReduceMax(last axis) -> Max(smallest range) = m -> Mul(x, (255 - z) / m) -> QuantizeLinear(1, z)
          -> MatMulIntegerToFloat(W as int8 / (255 - z), zero point z) -> Mul(m) -> y     (step r = m / (255 - z))

    A token's own maximum sets its step, so a token far smaller than the largest calibration token keeps its
    resolution (a per-tensor static range loses it: GELU outputs, whose per-token maxima vary about 10x, are
    where MiniLM's INT8 error came from). The fixed zero point z keeps the small negative values of GELU
    (down to the calibrated minimum, about -0.17) without a shift pass; z is chosen by emulated error.
    """
    tag = node.name
    zero = plan.zero_point
    levels = 255 - zero
    inits += [
        # step = max(rowmax, levels * smallest step) / levels; the 1 / levels goes into the weight scales
        numpy_helper.from_array(np.array([levels * max(plan.scale, _ROW_EPSILON)], np.float32), f"{tag}_min_range"),
        numpy_helper.from_array(np.array([float(levels)], np.float32), f"{tag}_levels"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{tag}_axes"),
        numpy_helper.from_array(np.array(1.0, np.float32), f"{tag}_unit"),
        numpy_helper.from_array(np.array(zero, np.uint8), f"{tag}_zero"),
        numpy_helper.from_array(wq, f"{tag}_weight_s8"),
        numpy_helper.from_array((ws / levels).astype(np.float32), f"{tag}_weight_scale"),
        numpy_helper.from_array(np.zeros(ws.shape, np.int8), f"{tag}_weight_zero_point"),
    ]
    x = node.input[0]
    reduce = (
        helper.make_node("ReduceMax", [x, f"{tag}_axes"], [f"{tag}_rowmax"], f"{tag}_rowmax", keepdims=1)
        if opset >= 18 else
        helper.make_node("ReduceMax", [x], [f"{tag}_rowmax"], f"{tag}_rowmax", axes=[-1], keepdims=1)
    )
    return [
        reduce,
        helper.make_node("Max", [f"{tag}_rowmax", f"{tag}_min_range"], [f"{tag}_range"], f"{tag}_range"),
        helper.make_node("Div", [f"{tag}_levels", f"{tag}_range"], [f"{tag}_inverse"], f"{tag}_inverse"),
        helper.make_node("Mul", [x, f"{tag}_inverse"], [f"{tag}_scaled"], f"{tag}_scale"),
        helper.make_node("QuantizeLinear", [f"{tag}_scaled", f"{tag}_unit", f"{tag}_zero"], [f"{tag}_u8"],
                         f"{tag}_quantize"),
        helper.make_node("MatMulIntegerToFloat",
                         [f"{tag}_u8", f"{tag}_weight_s8", f"{tag}_unit", f"{tag}_weight_scale", f"{tag}_zero",
                          f"{tag}_weight_zero_point"], [f"{tag}_integer"], tag, domain="com.microsoft"),
        helper.make_node("Mul", [f"{tag}_integer", f"{tag}_range"], list(node.output), f"{tag}_rescale"),
    ]


@dataclass
class FusedPlan:
    """Everything needed to build any INT8/FP32 mix of the fused graph: targets, per-input plans, FP32 twin."""

    targets: list[Target]
    plans: dict[str, InputPlan]
    smoothed: onnx.ModelProto
    int8: dict[str, tuple[np.ndarray, np.ndarray]]
    corrections: dict[str, tuple[str, int, np.ndarray]] = field(default_factory=dict)

    def build(self, quantize: Sequence[str]) -> onnx.ModelProto:
        return build_int8(self.smoothed, self.targets, self.plans, quantize, self.int8, self.corrections)

    def smoothing_report(self) -> dict[str, Any]:
        """Per quantized input: the chosen alpha and the largest channel division (for the manifest)."""
        return {tensor: {"alpha": plan.alpha, "max_smoothing": round(float(plan.smooth.max()), 4)}
                | ({"per_token": True, "zero_point": plan.zero_point, "min_step": plan.scale} if plan.per_token
                   else {"scale": plan.scale, "zero_point": plan.zero_point})
                for tensor, plan in self.plans.items()}


def plan_fused(
    model: onnx.ModelProto, reader: CalibrationDataReader, op_types: Sequence[str], exclude: Sequence[str],
    method: str, smooth_alpha: float | None, seed: int = 0, per_token_ffn: bool = False,
    bias_correction: bool = False, weight_rounding: str = "nearest", weight_bits: int | None = None,
) -> FusedPlan:
    """Calibrate ``model`` (a fused graph) on ``reader`` and plan its INT8 form (see module doc).

    ``weight_bits`` 7 keeps int8 weights in [-63, 63]: onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI
    (AVX2 ``vpmaddubsw``) add pairs of products in int16 and saturate with full-range weights (measured here on
    an AMD EPYC: a MatMulInteger of u8 ~230 by s8 ~120 over 64 channels off by 7.7e5), exact with 7-bit ones.
    None (default) takes what :func:`calibration.cpu.int8_weight_bits` picks for this machine."""
    if weight_bits is None:
        weight_bits = int8_weight_bits("auto")
    if weight_bits not in (7, 8):
        raise QuantizationError(f"weight_bits {weight_bits!r} must be 7 or 8")
    qmax = 2 ** (weight_bits - 1) - 1
    if method not in FUSED_METHODS:
        raise QuantizationError(f"method {method!r} is not computed on the fused graph; use one of "
                                f"{sorted(FUSED_METHODS)} or quantize the unfused graph")
    targets = find_targets(model, op_types, exclude)
    if not targets:
        raise QuantizationError(f"no node of {list(op_types)} with a weight to quantize in the fused graph "
                                f"({len(exclude)} exclude patterns); check op_types and exclude_nodes")
    tensors = list(dict.fromkeys(target.activation for target in targets))
    stats = collect_stats(model, tensors, reader, seed, gram_rows=GRAM_ROWS if weight_rounding == "gptq" else 0)
    initializers = {init.name: init for init in model.graph.initializer}
    weights: dict[str, list[np.ndarray]] = {}
    for target in targets:
        weights.setdefault(target.activation, []).append(numpy_helper.to_array(initializers[target.weight]))
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    per_token = frozenset(
        tensor for tensor in tensors if per_token_ffn and producers.get(tensor) in PER_TOKEN_PRODUCERS
        and all(target.op_type == "MatMul" for target in targets if target.activation == tensor))
    plans = plan_inputs(stats, weights, method, smooth_alpha, per_token, qmax)
    smoothed = smooth_graph(model, targets, plans)
    weights_smoothed = target_weights(smoothed, targets)
    int8 = int8_weights(weights_smoothed, targets, plans, stats, weight_rounding, qmax)
    corrections = bias_corrections(smoothed, targets, plans, stats, weights_smoothed, int8) if bias_correction else {}
    del stats
    return FusedPlan(targets, plans, smoothed, int8, corrections)

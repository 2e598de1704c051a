"""Static INT8 on the fused graph, the numbers: which nodes are targets, their activation statistics on real text,
each input's range and SmoothQuant strength (chosen per tensor by the product error it gives), and the int8
weights (GPTQ-rounded against each node's ``X^T X``, or rounded to nearest). :mod:`calibration.fused` builds the
graph from them."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from calibration.search import cpu_session
from graphs.core.errors import QuantizationError
from graphs.core.progress import bar

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


QATTENTION_INPUTS = 4
"""Attention inputs QAttention carries over: input, weights, bias, mask_index."""


def extra_attention_inputs(node: onnx.NodeProto) -> list[str]:
    """The Attention inputs past the mask that are set (``past``, ``attention_bias``, ...): QAttention would drop
    them."""
    return [name for name in node.input[QATTENTION_INPUTS:] if name]


def find_targets(model: onnx.ModelProto, op_types: Sequence[str], exclude: Sequence[str]) -> list[Target]:
    """Weight-bearing nodes of ``op_types`` ("Attention", "MatMul"); names matching an ``exclude`` pattern stay
    float. An Attention that QAttention cannot express stays float rather than lose something: unequal Q/K/V
    widths (``qkv_hidden_sizes``), or any input past the mask (``past``, ``attention_bias``: MPNet's relative
    position bias, a band mask), which QAttention has no slot for."""
    weights = {init.name: init for init in model.graph.initializer}
    patterns = [re.compile(pattern) for pattern in exclude]
    targets = []
    for node in model.graph.node:
        if node.op_type not in op_types or any(p.search(node.name) for p in patterns):
            continue
        if len(node.input) < 2 or node.input[1] not in weights or len(weights[node.input[1]].dims) != 2:
            continue
        if node.op_type == "Attention" and (any(a.name == "qkv_hidden_sizes" for a in node.attribute)
                                            or extra_attention_inputs(node)):
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

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.transformers.onnx_model import OnnxModel

from calibration.cpu import int8_weight_bits
from calibration.ranges import (
    _ROW_EPSILON,
    FUSED_METHODS,
    GRAM_ROWS,
    PER_TOKEN_PRODUCERS,
    ActivationStats,
    InputPlan,
    Target,
    _emulated,
    _smoothed_rows,
    collect_stats,
    extra_attention_inputs,
    find_targets,
    int8_weights,
    plan_inputs,
    target_weights,
)
from calibration.search import drop_unused_initializers
from graphs.core.errors import QuantizationError
from graphs.graph_view import GraphView

logger = logging.getLogger(__name__)

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
    model: onnx.ModelProto, targets: Sequence[Target], plans: dict[str, InputPlan], fold: bool = True
) -> onnx.ModelProto:
    """The FP32 twin: each smoothed activation divided by ``s``, each target's weight rows multiplied by ``s``.
    Equal to ``model`` in exact arithmetic. The division is folded into the V projection of the Attention that
    produces the activation where :func:`foldable_attention` allows (the attention output projection's input) and
    ``fold`` (default True; False where V's weights are learned int8 values that must not move), else it is one
    Mul shared by the activation's readers."""
    model = copy.deepcopy(model)
    weights = {init.name: init for init in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    readers, view = {target.name for target in targets}, _view(model)
    activations = dict.fromkeys(t.activation for t in targets if plans[t.activation].alpha)
    folded = {activation: attention for activation in activations
              if fold and (attention := foldable_attention(view, activation, readers)) is not None}
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
    for name in chosen:  # find_targets never offers these; a guard for callers that name nodes themselves
        node = named.get(name)
        dropped = extra_attention_inputs(node) if node is not None and node.op_type == "Attention" else []
        if dropped:
            raise QuantizationError(f"{name}: QAttention has no slot for its inputs {dropped}; it must stay float "
                                    "(quantizing it would silently drop them)")
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

"""Read-only questions about an ONNX graph: op counts, fused Attention nodes in layer order, per-layer ops.

Nothing here changes a graph or runs one. Layers are found by data flow, not by node names: a node's
*attention depth* is the number of Attention nodes on the longest path from the graph inputs to it
(itself included). In a BERT-style encoder the k-th Attention node has depth k, and every node that
depends on it but not on the next one (residual SkipLayerNormalization, the FFN with its BiasGelu, the
second SkipLayerNormalization) shares its depth, so depth - 1 is the encoder layer a fused node belongs to.
This does not depend on how a topological sort broke ties.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

#: Attention-like contrib ops that carry a ``num_heads`` attribute and mark one encoder layer each.
ATTENTION_OPS: tuple[str, ...] = ("Attention", "MultiHeadAttention", "QOrderedAttention")

#: The fused operators worth counting, as onnxruntime's ``BertOnnxModel.get_fused_operator_statistics``
#: lists them (onnxruntime 1.31).
FUSED_OPS: tuple[str, ...] = (
    "EmbedLayerNormalization",
    "Attention",
    "MultiHeadAttention",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "GemmFastGelu",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "RotaryEmbedding",
    "QOrderedAttention",
    "QOrderedGelu",
    "QOrderedLayerNormalization",
    "QOrderedMatMul",
)


@dataclass(frozen=True)
class AttentionNode:
    """One fused attention node: its name, op type, ``num_heads`` attribute and per-head size.

    ``head_size`` is the Q projection width divided by ``num_heads`` (None when the weight is not a
    constant of the graph or the width does not divide); ``input_hidden_size`` is the weight's input width.
    """

    name: str
    op_type: str
    num_heads: int | None
    head_size: int | None
    input_hidden_size: int | None


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count every op type of the main graph (subgraphs are not visited), sorted by op type."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def fused_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count the fused operators of :data:`FUSED_OPS`, zero included, in that order."""
    counts = Counter(node.op_type for node in model.graph.node)
    return {op: counts.get(op, 0) for op in FUSED_OPS}


def sum_layer_norm_count(model: onnx.ModelProto) -> int:
    """LayerNormalization nodes inside encoder layers (attention depth >= 1) whose input is a Sum: the
    residual form ``graphs.residual_sum`` writes. The embeddings' own Sum + LayerNorm is not counted."""
    sums = {out for node in model.graph.node if node.op_type == "Sum" for out in node.output}
    return sum(
        1
        for node, depth in attention_depths(model)
        if depth and node.op_type == "LayerNormalization" and node.input[0] in sums
    )


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Return the nodes of ``graph`` in a topological order, stable with respect to the stored order.

    Raises ValueError when the graph has a cycle or a node reads a tensor nobody produces.
    """
    produced = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    available = {t.name for t in graph.initializer} | {t.name for t in graph.input} | {""}
    pending: list[set[int]] = []
    consumers: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for i, node in enumerate(graph.node):
        deps = set()
        for name in node.input:
            if name in available:
                continue
            if name not in produced:
                raise ValueError(
                    f"node {node.name!r} ({node.op_type}) reads {name!r}, which nothing produces"
                )
            deps.add(produced[name])
        pending.append(deps)
        for dep in deps:
            consumers[dep].append(i)
    ready = sorted(i for i, deps in enumerate(pending) if not deps)
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in consumers[i]:
            pending[j].discard(i)
            if not pending[j]:
                ready.append(j)
        ready.sort()
    if len(order) != len(graph.node):
        raise ValueError(f"graph has a cycle: {len(graph.node) - len(order)} nodes cannot be ordered")
    return [graph.node[i] for i in order]


def attention_depths(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int]]:
    """Pair every node, in topological order, with its attention depth (see the module docstring)."""
    depth_of_tensor: dict[str, int] = {}
    result: list[tuple[onnx.NodeProto, int]] = []
    for node in topological_order(model.graph):
        depth = max((depth_of_tensor.get(name, 0) for name in node.input if name), default=0)
        if node.op_type in ATTENTION_OPS:
            depth += 1
        for out in node.output:
            depth_of_tensor[out] = depth
        result.append((node, depth))
    return result


def attention_nodes(model: onnx.ModelProto) -> list[AttentionNode]:
    """Fused attention nodes in layer order (by attention depth, then topological position)."""
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    found = [(depth, node) for node, depth in attention_depths(model) if node.op_type in ATTENTION_OPS]
    # sorted() is stable, so equal depths (parallel attention, never seen in an encoder) keep topological order.
    return [_describe_attention(node, initializers, producers) for _, node in sorted(found, key=lambda pair: pair[0])]


def _query_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto],
                  producers: dict[str, onnx.NodeProto]) -> onnx.TensorProto | None:
    """A MultiHeadAttention's Q projection weight: the MatMul feeding its query, through a RotaryEmbedding (and an
    INT8 file's MatMulIntegerToFloat) where there is one."""
    source = producers.get(node.input[0]) if node.input else None
    if source is not None and source.op_type == "RotaryEmbedding":
        source = producers.get(source.input[0])
    if source is None or source.op_type not in ("MatMul", "MatMulIntegerToFloat"):
        return None
    return initializers.get(source.input[1])


def layer_op_counts(
    model: onnx.ModelProto, op_types: tuple[str, ...] = FUSED_OPS
) -> dict[int, dict[str, int]]:
    """Count ``op_types`` per encoder layer (0-based), by attention depth.

    Nodes before the first attention node (embeddings, mask preparation) are not counted. Returns an
    empty dict when the graph has no attention node, since then nothing marks where a layer starts.
    """
    per_layer: dict[int, Counter[str]] = {}
    for node, depth in attention_depths(model):
        if depth == 0 or node.op_type not in op_types:
            continue
        per_layer.setdefault(depth - 1, Counter())[node.op_type] += 1
    return {layer: dict(sorted(counts.items())) for layer, counts in sorted(per_layer.items())}


def _describe_attention(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto],
                        producers: dict[str, onnx.NodeProto]) -> AttentionNode:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    num_heads = attrs.get("num_heads")
    head_size = input_hidden = None
    weight = initializers.get(node.input[1]) if node.op_type == "Attention" and len(node.input) > 1 else None
    if node.op_type == "MultiHeadAttention":
        query = _query_weight(node, initializers, producers)
        if query is not None and len(query.dims) == 2:
            input_hidden = int(query.dims[0])
            if num_heads and int(query.dims[1]) % num_heads == 0:
                head_size = int(query.dims[1]) // num_heads
    elif weight is not None and len(weight.dims) == 2:
        input_hidden = int(weight.dims[0])
        # Attention packs Q, K and V along the output axis; qkv_hidden_sizes is set when they differ.
        q_width = attrs["qkv_hidden_sizes"][0] if "qkv_hidden_sizes" in attrs else int(weight.dims[1]) // 3
        if num_heads and q_width % num_heads == 0:
            head_size = q_width // num_heads
    return AttentionNode(
        name=node.name,
        op_type=node.op_type,
        num_heads=int(num_heads) if num_heads is not None else None,
        head_size=head_size,
        input_hidden_size=input_hidden,
    )

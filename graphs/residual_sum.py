"""Residual and bias Adds before a LayerNormalization merged into one Sum, instead of SkipLayerNormalization.

onnxruntime 1.31's CPU SkipLayerNormalization kernel (float) is a scalar loop with a divide per element
and serial reductions; measured on MiniLM (seq 128, batch 8, one thread) its 12 nodes took 23-35 ms
against about 4 ms for LayerNormalization plus the Adds it replaces, which made the fused graph 11-20%
slower than the unfused one. So fusion keeps LayerNormalization, and this pass rewrites::

    MatMul ─► Add(bias) ─► Add(residual) ─► LayerNormalization
    becomes
    MatMul ─► Sum(·, bias, residual) ─► LayerNormalization

One pass over the activations instead of two, and a form onnxruntime's session-level
SkipLayerNormFusion (which matches Add only) does not turn back into the slow kernel when it can infer
shapes, as it does after EmbedLayerNormalization. Sum adds left to right like the Adds it replaces.
"""

from __future__ import annotations

import logging

from onnx import NodeProto, helper

logger = logging.getLogger(__name__)


def sum_residuals(model: object) -> int:
    """Rewrite every ``Add(Add(a, b), c) -> LayerNormalization`` of ``model`` (an onnxruntime
    ``OnnxModel``) into ``Sum(a, b, c) -> LayerNormalization``, in place; returns how many.

    Only Adds whose output feeds nothing else are merged, so no intermediate tensor disappears from
    another consumer; a single Add before the LayerNormalization is left alone.
    """
    consumers = model.input_name_to_nodes()  # type: ignore[attr-defined]
    producers = model.output_name_to_node()  # type: ignore[attr-defined]
    remove: list[NodeProto] = []
    add: list[NodeProto] = []
    for norm in model.get_nodes_by_op_type("LayerNormalization"):  # type: ignore[attr-defined]
        outer = producers.get(norm.input[0])
        if not _sole_add(outer, consumers):
            continue
        terms: list[str] = []
        merged = [outer]
        for name in outer.input:
            inner = producers.get(name)
            if _sole_add(inner, consumers):
                terms.extend(inner.input)
                merged.append(inner)
            else:
                terms.append(name)
        if len(merged) == 1:
            continue
        node = helper.make_node("Sum", terms, [outer.output[0]], name=model.create_node_name("Sum", "ResidualSum"))  # type: ignore[attr-defined]
        remove.extend(merged)
        add.append(node)
    model.remove_nodes(remove)  # type: ignore[attr-defined]
    model.add_nodes(add)  # type: ignore[attr-defined]
    if add:
        model.topological_sort()  # type: ignore[attr-defined]
    logger.info("merged %d residual Add pairs into Sum", len(add))
    return len(add)


def _sole_add(node: NodeProto | None, consumers: dict[str, list[NodeProto]]) -> bool:
    return node is not None and node.op_type == "Add" and len(consumers.get(node.output[0], [])) == 1


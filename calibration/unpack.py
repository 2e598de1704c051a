"""An ``Attention`` that ``QAttention`` cannot express, rewritten so its projections can still be INT8.

``QAttention`` carries an Attention's input, packed weight, bias and mask only; MPNet's relative position bias
(``attention_bias``, input 5) has no slot there. Rather than leave the whole layer float, the INT8 route rewrites
such a node, in exact arithmetic, as::

    x ─► MatMul([Wq|Wk|Wv]) ─► Add([bq|bk|bv]) ─► Split(3) ─► q, k, v
    MultiHeadAttention(q, k, v, key_padding_mask = mask, attention_bias = bias; same heads, scale, fill)

The MatMul is then an ordinary quantization target (``MatMulIntegerToFloat`` at run time) and the attention runs in
float with every input it had. The FP32 files keep the packed ``Attention``; this rewrite is the INT8 file's only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibration.ranges import extra_attention_inputs

_MHA_ATTRIBUTES = ("num_heads", "scale", "mask_filter_value")


def unpack_biased_attention(model: onnx.ModelProto) -> list[str]:
    """Rewrite, in place, every ``Attention`` with inputs past its mask (and equal Q/K/V widths) as MatMul + Add +
    Split + ``MultiHeadAttention``; returns the names of the MatMuls made (one per rewritten node)."""
    weights = {init.name: init for init in model.graph.initializer}
    nodes, made = [], []
    for node in model.graph.node:
        if (node.op_type != "Attention" or not extra_attention_inputs(node)
                or any(a.name in ("qkv_hidden_sizes", "unidirectional") and helper.get_attribute_value(a)
                       for a in node.attribute)
                or len(node.input) < 3 or node.input[1] not in weights or node.input[2] not in weights):
            nodes.append(node)
            continue
        if [i for i, name in enumerate(node.input) if i > 3 and name] != [5]:
            nodes.append(node)  # past state and friends: nothing an encoder writes, left as it is
            continue
        base = node.name
        width = int(numpy_helper.to_array(weights[node.input[2]]).shape[0]) // 3
        split_sizes = f"{base}_qkv_split"
        model.graph.initializer.append(numpy_helper.from_array(np.array([width] * 3, np.int64), split_sizes))
        projected, biased = f"{base}_qkv_matmul_output", f"{base}_qkv_output"
        parts = [f"{base}_{part}" for part in ("q", "k", "v")]
        mask = node.input[3] if len(node.input) > 3 else ""
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _MHA_ATTRIBUTES}
        nodes += [
            helper.make_node("MatMul", [node.input[0], node.input[1]], [projected], f"{base}_qkv_MatMul"),
            helper.make_node("Add", [projected, node.input[2]], [biased], f"{base}_qkv_Add"),
            helper.make_node("Split", [biased, split_sizes], parts, f"{base}_qkv_Split", axis=-1),
            helper.make_node("MultiHeadAttention", [*parts, "", mask, node.input[5]], [node.output[0]],
                             f"{base}_MultiHeadAttention", domain="com.microsoft", **attributes),
        ]
        made.append(f"{base}_qkv_MatMul")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return made

"""ReLU feed-forward in the form onnxruntime's CPU provider fuses: ``Gemm`` + ``Relu`` -> ``FusedGemm``.

onnxruntime fuses a bias and a ReLU into the matrix multiply only for ``Gemm``, which is 2-D; a transformer's
feed-forward runs on ``[batch, sequence, hidden]``, so its ``MatMul`` -> ``Add`` -> ``Relu`` stays three
kernels. This pass flattens the tokens around the feed-forward::

    x [B, S, H] ─► MatMul(W1) ─► Add(b1) ─► Relu ─► MatMul(W2) ─► y [B, S, H]
    becomes
    x ─► Reshape([-1, H]) ─► Gemm(W1, b1) ─► Relu ─► MatMul(W2) ─► Reshape(Shape(x)) ─► y
                              └── FusedGemm(activation="Relu") in the onnxruntime session ──┘

The reshapes are free (no copy), and ``y`` has ``x``'s shape because the feed-forward maps H back to H.

Off by default (``FusionConfig.relu_gemm``): measured with onnxruntime 1.31 on this project's 2-core AVX-512
machine, FusedGemm was never faster than MatMul + Add + Relu (H=384/F=1536: 0.599 vs 0.595 ms at batch 1 and
5.07 vs 4.99 ms at batch 8, sequence 128; H=128/F=256 at batch 8: 0.53 vs 0.29 ms). Turn it on where a
provider or CPU does better with it; the fused graph is checked numerically either way. The fused-graph INT8
route quantizes MatMul and Attention only, so a Gemm made here stays FP32 there.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import NodeProto, helper, numpy_helper

from graphs.graph_view import GraphView

logger = logging.getLogger(__name__)


def fuse_relu_gemm(model: object) -> int:
    """Rewrite every ``MatMul -> Add(bias) -> Relu -> MatMul`` feed-forward of ``model`` (an onnxruntime
    ``OnnxModel``) as above, in place; returns how many were rewritten."""
    view = GraphView(model)
    sole, weight, producers = view.sole, view.array, view.producers

    remove: list[NodeProto] = []
    add: list[NodeProto] = []
    for relu in model.get_nodes_by_op_type("Relu"):  # type: ignore[attr-defined]
        bias_add = producers.get(relu.input[0])
        down = sole(relu.output[0])
        if bias_add is None or bias_add.op_type != "Add" or sole(bias_add.output[0]) != relu or down is None:
            continue
        found = None
        for side in (0, 1):
            up = producers.get(bias_add.input[side])
            bias = weight(bias_add.input[1 - side])
            if up is not None and up.op_type == "MatMul" and bias is not None and sole(up.output[0]) == bias_add:
                found = (up, bias_add.input[1 - side], bias)
        if found is None or down.op_type != "MatMul" or down.input[0] != relu.output[0]:
            continue
        up, bias_name, bias = found
        w1, w2 = weight(up.input[1]), weight(down.input[1])
        if w1 is None or w2 is None or w1.ndim != 2 or w2.ndim != 2 or bias.shape != (w1.shape[1],):
            continue
        if w2.shape[1] != w1.shape[0]:  # the output must have the input's shape for Reshape(Shape(x))
            continue
        name = up.name or model.create_node_name("Gemm", "ReluFeedForward")  # type: ignore[attr-defined]
        flat_shape = f"{name}_flat_shape"
        model.add_initializer(numpy_helper.from_array(np.array([-1, w1.shape[0]], np.int64), flat_shape))  # type: ignore[attr-defined]
        x = up.input[0]
        add += [
            helper.make_node("Reshape", [x, flat_shape], [f"{name}_flat"], f"{name}_flatten"),
            helper.make_node("Gemm", [f"{name}_flat", up.input[1], bias_name], [f"{name}_gemm"], f"{name}_gemm"),
            helper.make_node("Relu", [f"{name}_gemm"], [f"{name}_relu"], relu.name),
            helper.make_node("MatMul", [f"{name}_relu", down.input[1]], [f"{name}_out_flat"], down.name),
            helper.make_node("Shape", [x], [f"{name}_shape"], f"{name}_shape"),
            helper.make_node("Reshape", [f"{name}_out_flat", f"{name}_shape"], [down.output[0]], f"{name}_unflatten"),
        ]
        remove += [up, bias_add, relu, down]
    model.remove_nodes(remove)  # type: ignore[attr-defined]
    model.add_nodes(add)  # type: ignore[attr-defined]
    if add:
        model.topological_sort()  # type: ignore[attr-defined]
    logger.info("rewrote %d ReLU feed-forwards as Gemm + Relu", len(remove) // 4)
    return len(remove) // 4

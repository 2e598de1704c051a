"""NoNorm (``x * w + b``) folded exactly into the neighbouring weights, so it costs nothing inside the encoder.

A NoNorm model (``layer_norm_type: "no_norm"``) ends every residual block, and the embeddings, with an
elementwise ``Mul`` and ``Add``: two passes over the activations each time (2L + 1 of them). They are affine
per channel, so the residual stream can be carried in other units instead. Write the stream after a NoNorm as
``h = D * u + c`` (per channel ``D``, ``c``) and compute ``u``; a block then reads::

    h ─┬─► Attention / MatMul(W) + b  ...  ─► MatMul(Wo) ─► Add(bo) ─► Add ─► Mul(w) ─► Add(beta) ─► h'
       └────────────────────────────────────────────────────────────────┘ (residual)
    becomes
    u ─┬─► Attention / MatMul(D·W) + (b + c·W)  ...  ─► MatMul(Wo / D) ─► Add(bo / D) ─► Add ─► u'
       └──────────────────────────────────────────────────────────────────────┘

with ``u' = u + y / D``, ``D' = w * D`` and ``c' = w * c + beta``: the readers of ``h`` (an Attention, or a
MatMul whose bias is an Add or the bias input of BiasGelu/FastGelu) take ``D`` into the rows of their weights
and ``c`` into their biases, the branch's output projection divides its columns by
``D``, and the NoNorm disappears. The first NoNorm (after the embeddings) starts with ``u = e``,
``D = w``, ``c = beta``. Where the walk stops (the encoder output, or any reader it does not know), one
``Mul(D)`` + ``Add(c)`` gives back ``h`` under its own name, so every consumer and graph output sees the same
values as before. Exact in real arithmetic; a stream whose ``D`` leaves ``SCALE_RANGE`` (a near-zero channel, or
a product of many NoNorm weights drifting far from 1) is not folded past that point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper, numpy_helper

from graphs.graph_view import GraphView

logger = logging.getLogger(__name__)

#: The fold stops before a block whose stream scale D has a channel outside this range: dividing by a tiny D,
#: or carrying a stream u = (h - c) / D far larger than h, would cost precision (float16 tops out at 65504).
SCALE_RANGE = (1e-2, 1e2)
#: Fused activations that add their bias (input 1) before the activation, as a bias Add would.
_BIAS_ACTIVATIONS = ("BiasGelu", "FastGelu")


@dataclass
class _NoNorm:
    mul: NodeProto
    add: NodeProto
    x: str
    weight: np.ndarray
    bias: np.ndarray


class _Folder(GraphView):
    def __init__(self, model: object) -> None:
        super().__init__(model)
        self.uses: dict[str, int] = {}
        for node in self.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.remove: list[NodeProto] = []
        self.add: list[NodeProto] = []

    def set_array(self, node: NodeProto, index: int, value: np.ndarray) -> None:
        """Give ``node.input[index]`` the new value, copying the initializer when another node reads it too."""
        name = node.input[index]
        if self.uses.get(name, 0) > 1:
            self.uses[name] -= 1
            name = self.model.create_node_name("Initializer", f"{name}_nonorm_folded")  # type: ignore[attr-defined]
            node.input[index] = name
            self.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
            self.uses[name] = 1
            return
        self.model.get_initializer(name).CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))  # type: ignore[attr-defined]

    def nonorm_at(self, mul: NodeProto | None) -> _NoNorm | None:
        """``Mul(x, w) -> Add(., beta)`` with 1-D initializers of one width, the Mul read only by the Add."""
        if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            return None
        for side in (1, 0):
            weight = self.array(mul.input[side])
            add = self.sole(mul.output[0])
            if weight is None or weight.ndim != 1 or add is None or add.op_type != "Add":
                continue
            other = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
            bias = self.array(other)
            if bias is not None and bias.shape == weight.shape:
                return _NoNorm(mul, add, mul.input[1 - side], weight.astype(np.float64), bias.astype(np.float64))
        return None

    def biased_matmul(self, add: NodeProto | None) -> tuple[NodeProto, NodeProto, int] | None:
        """``Add(bias, MatMul(x, W))`` with initializer W (2-D) and bias (1-D): (matmul, add, bias index)."""
        if add is None or add.op_type != "Add":
            return None
        for side in (0, 1):
            matmul = self.producers.get(add.input[side])
            bias = self.array(add.input[1 - side])
            if (matmul is not None and matmul.op_type == "MatMul" and bias is not None and bias.ndim == 1
                    and self.sole(matmul.output[0]) == add and (w := self.array(matmul.input[1])) is not None
                    and w.ndim == 2):
                return matmul, add, 1 - side
        return None


def fold_nonorm(model: object) -> int:
    """Fold every NoNorm of ``model`` (an onnxruntime ``OnnxModel``) that can be folded exactly; in place.

    Returns how many NoNorm ``Mul``/``Add`` pairs were removed (0 when the graph has none or the first one
    is not in the expected place); see the module doc for the transformation.
    """
    folder = _Folder(model)
    first = next((n for node in folder.graph.node if (n := folder.nonorm_at(node)) is not None), None)
    if first is None:
        return 0
    folded = 1
    folder.remove += [first.mul, first.add]
    u, h = first.x, first.add.output[0]
    scale, shift = first.weight, first.bias
    while True:
        step = _fold_block(folder, h, u, scale, shift)
        if step is None:
            break
        u, h, scale, shift = step
        folded += 1
    # Give the last stream back in its own units under its own name.
    scale_name = model.create_node_name("Initializer", "nonorm_scale")  # type: ignore[attr-defined]
    shift_name = model.create_node_name("Initializer", "nonorm_shift")  # type: ignore[attr-defined]
    folder.graph.initializer.extend([numpy_helper.from_array(scale.astype(np.float32), scale_name),
                                     numpy_helper.from_array(shift.astype(np.float32), shift_name)])
    scaled = f"{h}_nonorm_unscaled"
    folder.add += [
        helper.make_node("Mul", [u, scale_name], [scaled], model.create_node_name("Mul", "NoNormOut")),  # type: ignore[attr-defined]
        helper.make_node("Add", [scaled, shift_name], [h], model.create_node_name("Add", "NoNormOut")),  # type: ignore[attr-defined]
    ]
    model.remove_nodes(folder.remove)  # type: ignore[attr-defined]
    model.add_nodes(folder.add)  # type: ignore[attr-defined]
    _drop_unread_initializers(folder.graph)
    model.topological_sort()  # type: ignore[attr-defined]
    logger.info("folded %d NoNorm Mul/Add pairs into weights (one Mul/Add kept at %s)", folded, h)
    return folded


def _drop_unread_initializers(graph: object) -> None:
    """Remove the initializers the fold left without a reader (the NoNorm weights and biases, the copies it
    replaced): onnxruntime would otherwise drop each one with a warning on the console at every session."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}  # type: ignore[attr-defined]
    for initializer in [i for i in graph.initializer if i.name not in read]:  # type: ignore[attr-defined]
        graph.initializer.remove(initializer)  # type: ignore[attr-defined]


def _fold_block(
    folder: _Folder, h: str, u: str, scale: np.ndarray, shift: np.ndarray
) -> tuple[str, str, np.ndarray, np.ndarray] | None:
    """Fold the residual block reading ``h = scale * u + shift`` and the NoNorm ending it; None (nothing
    changed) when the block is not the expected shape, so the caller gives ``h`` back unfolded."""
    magnitude = np.abs(scale)
    if h in folder.outputs or magnitude.min() < SCALE_RANGE[0] or magnitude.max() > SCALE_RANGE[1]:
        return None
    readers = folder.consumers.get(h, [])
    residual = [node for node in readers if node.op_type == "Add" and folder.nonorm_at(folder.sole(node.output[0]))]
    linears = [node for node in readers if node not in residual]
    if len(residual) != 1 or not linears:
        return None
    residual_add = residual[0]
    nonorm = folder.nonorm_at(folder.sole(residual_add.output[0]))
    branch = folder.biased_matmul(folder.producers.get(residual_add.input[1 if residual_add.input[0] == h else 0]))
    if nonorm is None or branch is None or residual_add.input[0] == residual_add.input[1]:
        return None
    width = len(scale)
    branch_weight = folder.array(branch[0].input[1])
    # The branch output y is divided by D: only the residual Add may read it, and every width must agree.
    if (folder.sole(branch[1].output[0]) != residual_add or branch_weight.shape[1] != width
            or folder.array(branch[1].input[branch[2]]).shape != (width,) or nonorm.weight.shape != (width,)):
        return None
    plans = []  # (node, weight index, bias node, bias index)
    for node in linears:
        if node.op_type == "Attention" and node.input[0] == h and h not in node.input[1:]:
            if folder.array(node.input[1]) is None or len(node.input) < 3 or folder.array(node.input[2]) is None:
                return None
            plans.append((node, 1, node, 2))
        elif node.op_type == "MatMul" and node.input[0] == h and folder.array(node.input[1]) is not None:
            reader = folder.sole(node.output[0])
            if reader is not None and reader.op_type in _BIAS_ACTIVATIONS and reader.input[0] == node.output[0]:
                bias = folder.array(reader.input[1]) if len(reader.input) > 1 else None
                if bias is None or bias.ndim != 1:
                    return None
                plans.append((node, 1, reader, 1))
                continue
            found = folder.biased_matmul(reader)
            if found is None or found[0] != node:
                return None
            plans.append((node, 1, found[1], found[2]))
        else:
            return None
    for node, w_index, bias_node, b_index in plans:
        weight, bias = folder.array(node.input[w_index]), folder.array(bias_node.input[b_index])
        if weight.ndim != 2 or weight.shape[0] != width or bias.shape != (weight.shape[1],):
            return None
    for node, w_index, bias_node, b_index in plans:
        weight = folder.array(node.input[w_index]).astype(np.float64)
        bias = folder.array(bias_node.input[b_index]).astype(np.float64)
        folder.set_array(node, w_index, scale[:, None] * weight)
        folder.set_array(bias_node, b_index, bias + shift @ weight)
        node.input[0] = u
    matmul, bias_add, b_index = branch
    folder.set_array(matmul, 1, folder.array(matmul.input[1]).astype(np.float64) / scale[None, :])
    folder.set_array(bias_add, b_index, folder.array(bias_add.input[b_index]).astype(np.float64) / scale)
    residual_add.input[list(residual_add.input).index(h)] = u
    folder.remove += [nonorm.mul, nonorm.add]
    return residual_add.output[0], nonorm.add.output[0], nonorm.weight * scale, nonorm.weight * shift + nonorm.bias

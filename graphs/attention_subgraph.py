"""Self-attention found from its Softmax, for graphs onnxruntime's BERT fusion cannot anchor or read.

onnxruntime 1.31's ``FusionAttention`` starts from a LayerNormalization and expects BERT's additive mask;
this base starts from the Softmax, so it needs neither. It matches the part every TorchScript export of
an eager BERT-family attention shares (transformers 4.57, opset 17) and leaves the mask stage, which
differs per model, to a subclass (:meth:`SoftmaxAttentionFusion.match_mask`)::

    X ─► MatMul(Wq) ─► Add(bq) ─► Reshape(0,0,heads,size) ─► Transpose(0,2,1,3) ─► [Div|Mul c] ┐
    X ─► MatMul(Wk) ─► Add(bk) ─► Reshape ─► Transpose(0,2,3,1) ──────────────────────────────┤
                                                                                  MatMul ─► [Div|Mul c]
                                                                                                │
                                                                     mask stage (subclass) ─────┤
                                                                                             Softmax
    X ─► MatMul(Wv) ─► Add(bv) ─► Reshape ─► Transpose(0,2,1,3) ─────────────────────────► MatMul ◄┘
                                                                                                │
                                                               Transpose(0,2,1,3) ─► Reshape ─► Y

becomes ``Y = Attention(X, [Wq|Wk|Wv], [bq|bk|bv], int32(mask))`` with ``num_heads`` read from this
layer's Q Reshape constant (pruned layers keep their own count), ``scale`` the product of the two
optional scalings (1/sqrt(size) in every export seen) and ``mask_filter_value`` the mask stage's fill.
The raw 2-D mask is kept, so left padding and holes stay exact. onnxruntime's
``FusionAttention.create_attention_node`` packs the weights and builds the node.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import NodeProto, helper
from onnxruntime.transformers.fusion_attention import AttentionMask, FusionAttention
from onnxruntime.transformers.fusion_options import AttentionMaskFormat
from onnxruntime.transformers.onnx_model import OnnxModel

logger = logging.getLogger(__name__)

_Q_PERM, _K_PERM, _OUT_PERM = [0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]


class SoftmaxAttentionFusion(FusionAttention):
    """Fuse every Softmax-centred self-attention whose mask stage :meth:`match_mask` recognises.

    ``fused_heads`` lists the ``num_heads`` of each node made, in the order fused.
    """

    def __init__(self, model: OnnxModel) -> None:
        mask = AttentionMask(model)
        mask.set_mask_format(AttentionMaskFormat.AttentionMask)
        super().__init__(model, hidden_size=0, num_heads=0, attention_mask=mask, search_op_types=["Softmax"])
        self.fused_heads: list[int] = []
        self.attention_bias: str | None = None
        """Set by a :meth:`match_mask` whose stage adds a bias before the mask: the Attention node's input 5."""

    def match_mask(
        self, softmax_input: str, output_name_to_node: dict[str, NodeProto]
    ) -> tuple[str, str, float, list[NodeProto]] | None:
        """Recognise the mask stage that produces ``softmax_input``.

        Returns ``(scores, mask_2d, fill_value, stage_nodes)``: the unmasked scores tensor, the 0/1 mask
        graph input (1 = attend), the value masked scores take, and the stage's own nodes (removed; the
        mask preparation they read from is pruned once nothing else uses it). None when not recognised.
        """
        raise NotImplementedError

    def fuse(self, node: NodeProto, input_name_to_nodes: dict, output_name_to_node: dict) -> None:
        model = self.model
        self.attention_bias = None
        mask = self.match_mask(node.input[0], output_name_to_node)
        if mask is None:
            return
        scores, mask_2d, fill, mask_nodes = mask
        qk, post_scale, scale_nodes = self._unscale(scores, output_name_to_node)
        if qk is None or qk.op_type != "MatMul":
            return
        pv = self._single_child(node, "MatMul", input_name_to_nodes)
        if pv is None or pv.input[0] != node.output[0]:
            return
        out_transpose = self._single_child(pv, "Transpose", input_name_to_nodes)
        out_reshape = out_transpose and self._single_child(out_transpose, "Reshape", input_name_to_nodes)
        if out_reshape is None or _perm(out_transpose) != _OUT_PERM:
            return
        q_side, pre_scale, pre_nodes = self._unscale(qk.input[0], output_name_to_node)
        q = self._projection(q_side, _Q_PERM, output_name_to_node)
        k = self._projection(model.get_parent(qk, 1, output_name_to_node), _K_PERM, output_name_to_node)
        v = self._projection(model.get_parent(pv, 1, output_name_to_node), _Q_PERM, output_name_to_node)
        if q is None or k is None or v is None:
            return
        (q_matmul, q_add, q_reshape), (k_matmul, k_add, _), (v_matmul, v_add, _) = q, k, v
        if not (q_matmul.input[0] == k_matmul.input[0] == v_matmul.input[0]):
            return
        heads = self._heads(q_reshape)
        if heads is None:
            return
        attention = self.create_attention_node(
            mask_index=self.attention_mask.process_mask(mask_2d),
            q_matmul=q_matmul,
            k_matmul=k_matmul,
            v_matmul=v_matmul,
            q_add=q_add,
            k_add=k_add,
            v_add=v_add,
            num_heads=heads,
            hidden_size=0,
            first_input=q_matmul.input[0],
            output=out_reshape.output[0],
            scale=float(pre_scale * post_scale),
        )
        if attention is None:
            return
        # create_attention_node reads mask_filter_value from the instance (onnxruntime 1.31).
        attention.attribute.extend([helper.make_attribute("mask_filter_value", float(fill))])
        if self.attention_bias is not None:  # input 4 (past) empty, input 5 the bias added before the mask
            while len(attention.input) < 5:
                attention.input.append("")
            attention.input.append(self.attention_bias)
        self.nodes_to_add.append(attention)
        self.node_name_to_graph_name[attention.name] = self.this_graph_name
        self.fused_heads.append(heads)
        path = [node, qk, pv, out_transpose, out_reshape, *mask_nodes, *scale_nodes, *pre_nodes]
        for matmul, add, reshape in (q, k, v):
            transpose = input_name_to_nodes[reshape.output[0]][0]
            path += [matmul, add, reshape, transpose]
        self.nodes_to_remove.extend(path)
        # The Reshapes' shape subgraphs and the mask preparation dangle now; pruning removes them.
        self.prune_graph = True

    def _unscale(self, name: str, output_name_to_node: dict) -> tuple[NodeProto | None, float, list[NodeProto]]:
        """Step back over one Div/Mul by a scalar constant: (producer of the unscaled tensor, factor, nodes)."""
        node = output_name_to_node.get(name)
        if node is not None and node.op_type in ("Div", "Mul"):
            value = self.model.get_constant_value(node.input[1])
            if value is not None and np.asarray(value).size == 1:
                factor = float(np.asarray(value).reshape(()))
                if factor != 0.0:
                    scale = 1.0 / factor if node.op_type == "Div" else factor
                    return output_name_to_node.get(node.input[0]), scale, [node]
        return node, 1.0, []

    def _projection(
        self, transpose: NodeProto | None, perm: list[int], output_name_to_node: dict
    ) -> tuple[NodeProto, NodeProto, NodeProto] | None:
        """Transpose(perm) <- Reshape <- Add(bias) <- MatMul(weight): (MatMul, Add, Reshape) or None."""
        if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != perm:
            return None
        path = self.model.match_parent_path(
            transpose, ["Reshape", "Add", "MatMul"], [0, 0, None], output_name_to_node
        )
        if path is None:
            return None
        reshape, add, matmul = path
        if self.model.get_initializer(matmul.input[1]) is None:
            return None
        if not any(self.model.get_initializer(name) is not None for name in add.input):
            return None
        return matmul, add, reshape

    def _heads(self, q_reshape: NodeProto) -> int | None:
        """This layer's head count: dimension 2 of the Q Reshape's target shape, a constant in 4.57 exports."""
        shape = self.model.get_constant_value(q_reshape.input[1])
        if shape is None:
            concat = self.model.get_parent(q_reshape, 1)
            if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
                return None
            shape = [self.model.get_constant_value(name) for name in concat.input]
            if shape[2] is None:
                return None
            return int(np.asarray(shape[2]).reshape(-1)[0])
        shape = np.asarray(shape).reshape(-1)
        return int(shape[2]) if shape.size == 4 and shape[2] > 0 else None

    def _single_child(self, node: NodeProto, op_type: str, input_name_to_nodes: dict) -> NodeProto | None:
        children = input_name_to_nodes.get(node.output[0], [])
        if len(children) != 1 or children[0].op_type != op_type:
            return None
        return children[0]


def _perm(node: NodeProto) -> list[int] | None:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return None


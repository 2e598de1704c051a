"""BERT/RoBERTa self-attention without a LayerNorm anchor (NoNorm checkpoints), fused into Attention.

A NoNorm model (nn_pruning's ``layer_norm_type: "no_norm"``) replaces every LayerNorm by ``x * w + b``,
so onnxruntime 1.31's ``FusionAttention``, which starts its search at a (Skip)LayerNormalization, never
looks at the attention. The attention itself is BERT's; this pass finds it from the Softmax with BERT's
additive mask stage (transformers 4.57 computes the extended mask once and every layer adds it)::

    attention_mask ─► Unsqueeze ─► Unsqueeze ─► Cast ─► Sub(1 - m) ─► Mul(finfo.min) ─┐ (shared)
                                                       scores (Q·Kᵀ / sqrt(d)) ──────► Add ─► Softmax

and the rest of the layer is the shared pattern of ``graphs.attention_subgraph``. Attention adds its
``mask_filter_value`` (the Mul constant) where the raw mask is 0, which is what (1 - m) * min adds.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from graphs.attention_subgraph import SoftmaxAttentionFusion


class FuseNoNormAttention(SoftmaxAttentionFusion):
    """Fuse BERT-style attention layers whose Softmax reads ``scores + (1 - mask) * fill``."""

    def match_mask(
        self, softmax_input: str, output_name_to_node: dict[str, NodeProto]
    ) -> tuple[str, str, float, list[NodeProto]] | None:
        model = self.model
        add = output_name_to_node.get(softmax_input)
        if add is None or add.op_type != "Add":
            return None
        for mask_side in (1, 0):
            path = model.match_parent_path(
                add, ["Mul", "Sub", "Cast", "Unsqueeze", "Unsqueeze"], [mask_side, None, None, 0, 0], output_name_to_node
            )
            if path is None:
                continue
            mul, sub, _cast, _, outer = path
            mask_input = outer.input[0]
            fill = _scalar(model, mul.input[1] if mul.input[0] == sub.output[0] else mul.input[0])
            one = _scalar(model, sub.input[0])
            if model.find_graph_input(mask_input) is None or fill is None or one != 1.0 or sub.input[1] != _cast.output[0]:
                continue
            return add.input[1 - mask_side], mask_input, fill, [add]
        return None


def _scalar(model: object, name: str) -> float | None:
    value = model.get_constant_value(name)  # type: ignore[attr-defined]
    if value is None or np.asarray(value).size != 1:
        return None
    return float(np.asarray(value).reshape(()))


def fuse_nonorm_attention(model: object) -> list[int]:
    """Fuse every LayerNorm-free BERT attention layer of ``model`` (an onnxruntime ``OnnxModel``) in place.

    Returns the ``num_heads`` of each Attention node made, in graph order of their Softmax.
    """
    fusion = FuseNoNormAttention(model)  # type: ignore[arg-type]
    fusion.apply()
    return fusion.fused_heads

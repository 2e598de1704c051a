"""DistilBERT self-attention: the masked_fill mask stage, fused into Attention with per-layer heads.

DistilBERT masks with ``scores.masked_fill(mask == 0, finfo.min)``, which the TorchScript exporter
(transformers 4.57, opset 17) writes per layer as::

    attention_mask ─► Equal(0) ─► Reshape(b,1,1,s) ─► Expand(shape of scores) ─► [Cast bool] ─┐
                                                                         finfo.min ─────────┤
                                                            scores (Q/sqrt(d) · Kᵀ) ─────► Where ─► Softmax

onnxruntime 1.31 recognises this mask but then looks for the fill value as a constant input of the
Expand, finds none and silently fuses nothing. Here the stage is read directly: the fill is the Where's
second input, the raw 0/1 mask is ``attention_mask`` itself, and the rest of the layer is the shared
Softmax-anchored pattern of ``graphs.attention_subgraph``. Where(mask == 0, fill, s) and Attention's
``s + fill`` on masked keys give the same softmax: exp(fill - max) is 0 in float32 either way.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from graphs.attention_subgraph import SoftmaxAttentionFusion


class FuseDistilBertAttention(SoftmaxAttentionFusion):
    """Fuse DistilBERT attention layers whose mask stage is ``Where(Expand(Reshape(Equal(mask, 0))))``."""

    def match_mask(
        self, softmax_input: str, output_name_to_node: dict[str, NodeProto]
    ) -> tuple[str, str, float, list[NodeProto]] | None:
        model = self.model
        where = output_name_to_node.get(softmax_input)
        if where is None or where.op_type != "Where":
            return None
        fill = model.get_constant_value(where.input[1])
        if fill is None or np.asarray(fill).size != 1:
            return None
        path = model.match_parent_paths(
            where,
            [
                (["Cast", "Expand", "Reshape", "Equal"], [0, 0, 0, 0]),
                (["Expand", "Reshape", "Equal"], [0, 0, 0]),
            ],
            output_name_to_node,
        )
        if path is None:
            return None
        equal = path[1][-1]
        mask_input, zero = equal.input
        if model.find_graph_input(mask_input) is None:
            mask_input, zero = zero, mask_input
        zero_value = model.get_constant_value(zero)
        if model.find_graph_input(mask_input) is None or zero_value is None or np.any(np.asarray(zero_value) != 0):
            return None
        return where.input[2], mask_input, float(np.asarray(fill).reshape(())), [where]


def fuse_distilbert_attention(model: object) -> list[int]:
    """Fuse every DistilBERT attention layer of ``model`` (an onnxruntime ``OnnxModel``) in place.

    Returns the ``num_heads`` of each Attention node made, in graph order of their Softmax.
    """
    fusion = FuseDistilBertAttention(model)  # type: ignore[arg-type]
    fusion.apply()
    return fusion.fused_heads

"""MPNet self-attention, fused into Attention with its relative position bias as ``attention_bias``.

MPNet adds a per-layer slice of one relative position bias to the scaled scores before BERT's additive mask::

    scores (Q·Kᵀ / sqrt(d)) ─► Add(bias[:, heads of this layer]) ─► Add((1 - m) * fill) ─► Softmax

onnxruntime's BERT fusion stops at the extra Add. This pass matches the mask stage as the NoNorm pass does, steps
back over the bias Add, and appends the bias (1, heads, seq, seq) to the Attention node as input 5
(``attention_bias``), which onnxruntime adds to the scaled scores before the mask, as MPNet does.
"""

from __future__ import annotations

from onnx import NodeProto

from graphs.fuse_nonorm_attention import FuseNoNormAttention


class FuseMPNetAttention(FuseNoNormAttention):
    """Fuse MPNet attention layers: BERT's mask stage after an Add of a non-constant (bias) tensor."""

    def match_mask(
        self, softmax_input: str, output_name_to_node: dict[str, NodeProto]
    ) -> tuple[str, str, float, list[NodeProto]] | None:
        matched = super().match_mask(softmax_input, output_name_to_node)
        if matched is None:
            return None
        biased, mask_input, fill, stage = matched
        add = output_name_to_node.get(biased)
        if add is None or add.op_type != "Add":
            return None
        for scores_side in (0, 1):
            scores, bias = add.input[scores_side], add.input[1 - scores_side]
            producer = output_name_to_node.get(scores)
            if producer is not None and producer.op_type in ("Div", "Mul", "MatMul") \
                    and self.model.get_constant_value(bias) is None:
                self.attention_bias = bias
                return scores, mask_input, fill, [*stage, add]
        return None


def fuse_mpnet_attention(model: object) -> list[int]:
    """Fuse every MPNet attention layer of ``model`` (an onnxruntime ``OnnxModel``) in place; the ``num_heads`` of
    each Attention node made, in graph order of their Softmax."""
    fusion = FuseMPNetAttention(model)  # type: ignore[arg-type]
    fusion.apply()
    return fusion.fused_heads

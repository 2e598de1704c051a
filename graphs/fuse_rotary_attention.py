"""Rotary self-attention (ModernBERT), fused into ``RotaryEmbedding`` x 2 + ``MultiHeadAttention``.

onnxruntime's CPU ``Attention`` kernel has no rotary input, so each layer becomes::

    q_proj ─► RotaryEmbedding(cos, sin) ┐
    k_proj ─► RotaryEmbedding(cos, sin) ┼─► MultiHeadAttention(num_heads, scale, attention_bias = mask) ─► Y
    v_proj ─────────────────────────────┘

matched from each Softmax in the graph the project's export forward writes (exporter/architectures/modernbert.py)::

    x·Wq ─► Reshape(0,-1,heads,d) ─► Transpose(0,2,1,3) ─► q·cos + rotate_half(q)·sin ┐
    x·Wk ─► Reshape ─► Transpose ─► k·cos + rotate_half(k)·sin ─► Transpose(0,1,3,2) ─┴► MatMul ─► Mul(scale)
                                                                      ─► Add(mask (B,1,S,S)) ─► Softmax ┐
    x·Wv ─► Reshape ─► Transpose(0,2,1,3) ────────────────────────────────────────────────────► MatMul ◄┘
                                                                  ─► Transpose(0,2,1,3) ─► Reshape ─► Y

The mask tensor (padding, and the band of a sliding-window layer) is the graph's own, passed as
``attention_bias``. The rotary tables become constant caches of ``max_length`` positions (``cos``/``sin`` of the
inverse frequencies found among the cos input's ancestors, the one float constant of ``head_size / 2``
values), so a sequence longer than the artifact's ``max_length`` is not served by the fused file (the runtime
truncates to it). ``num_heads`` comes from the layer's Q Reshape constant.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import NodeProto, helper, numpy_helper

logger = logging.getLogger(__name__)


class _Graph:
    def __init__(self, model: object) -> None:
        self.model = model
        self.producer: dict[str, NodeProto] = model.output_name_to_node()  # type: ignore[attr-defined]

    def node(self, name: str, op: str | tuple[str, ...]) -> NodeProto | None:
        found = self.producer.get(name)
        ops = (op,) if isinstance(op, str) else op
        return found if found is not None and found.op_type in ops else None

    def constant(self, name: str) -> np.ndarray | None:
        value = self.model.get_constant_value(name)  # type: ignore[attr-defined]
        return None if value is None else np.asarray(value)

    def perm(self, node: NodeProto) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    def split_heads(self, name: str) -> tuple[str, int, int] | None:
        """``Transpose(0,2,1,3)(Reshape(proj, [_, _, heads, d]))`` -> (proj, heads, d)."""
        transpose = self.node(name, "Transpose")
        if transpose is None or self.perm(transpose) != [0, 2, 1, 3]:
            return None
        reshape = self.node(transpose.input[0], "Reshape")
        if reshape is None:
            return None
        shape = self.constant(reshape.input[1])
        if shape is None:
            shape = self._concat_constant(reshape.input[1])
        if shape is None or len(shape) != 4 or shape[2] <= 0 or shape[3] <= 0:
            return None
        return reshape.input[0], int(shape[2]), int(shape[3])

    def _concat_constant(self, name: str) -> np.ndarray | None:
        """The trailing constants of a shape built by Concat(Unsqueeze(batch), c1, c2, c3): [-1, c1, c2, c3]."""
        concat = self.node(name, "Concat")
        if concat is None:
            return None
        values = [self.constant(part) for part in concat.input]
        if any(v is None for v in values[1:]):
            return None
        return np.array([-1] + [int(np.asarray(v).reshape(-1)[0]) for v in values[1:]])

    def rotated(self, name: str) -> tuple[str, int, int, str] | None:
        """``Add(Mul(t, cos), Mul(rotate_half(t), sin))`` with t = split heads of a projection -> (proj, heads, d,
        cos tensor)."""
        add = self.node(name, "Add")
        if add is None:
            return None
        for mul_name in add.input:
            mul = self.node(mul_name, "Mul")
            if mul is None:
                continue
            for side in (0, 1):
                split = self.split_heads(mul.input[side])
                if split is not None:
                    return (*split, mul.input[1 - side])
        return None

    def inverse_frequencies(self, cos: str, half: int) -> np.ndarray | None:
        """The one float constant of ``half`` values (a row) among the ancestors of ``cos`` (within a few nodes)."""
        seen, frontier, found = set(), [cos], []
        for _ in range(8):
            following = []
            for name in frontier:
                node = self.producer.get(name)
                if node is None or node.name in seen:
                    continue
                seen.add(node.name)
                for source in node.input:
                    value = self.constant(source) if source else None
                    if value is not None and value.dtype.kind == "f" and value.size == half and max(value.shape) == half:
                        found.append(value.reshape(-1))
                    elif source in self.producer:
                        following.append(source)
            frontier = following
        return found[0].astype(np.float32) if len(found) == 1 else None


def fuse_rotary_attention(model: object, max_length: int) -> list[int]:
    """Fuse every rotary attention layer of ``model`` (an onnxruntime ``OnnxModel``) in place; returns each fused
    node's ``num_heads`` in graph order of their Softmax. ``max_length``: positions the rotary caches cover."""
    graph = _Graph(model)
    consumers = model.input_name_to_nodes()  # type: ignore[attr-defined]
    caches: dict[bytes, tuple[str, str]] = {}
    fused: list[int] = []
    remove: list[NodeProto] = []
    positions: str | None = None
    for softmax in [n for n in model.nodes() if n.op_type == "Softmax"]:  # type: ignore[attr-defined]
        masked = graph.node(softmax.input[0], "Add")
        if masked is None:
            continue
        scaled = mask = None
        for side in (0, 1):
            candidate = graph.node(masked.input[side], "Mul")
            if candidate is not None:
                scaled, mask = candidate, masked.input[1 - side]
        if scaled is None:
            continue
        scores, scale = None, None
        for side in (0, 1):
            value = graph.constant(scaled.input[side])
            if value is not None and value.size == 1:
                scores, scale = graph.node(scaled.input[1 - side], "MatMul"), float(value.reshape(-1)[0])
        if scores is None or scale is None:
            continue
        query = graph.rotated(scores.input[0])
        key_t = graph.node(scores.input[1], "Transpose")
        key = graph.rotated(key_t.input[0]) if key_t is not None and graph.perm(key_t) == [0, 1, 3, 2] else None
        readers = consumers.get(softmax.output[0], [])
        context = readers[0] if len(readers) == 1 and readers[0].op_type == "MatMul" else None
        value = graph.split_heads(context.input[1]) if context is not None else None
        merge = consumers.get(context.output[0], []) if context is not None else []
        out_t = merge[0] if len(merge) == 1 and merge[0].op_type == "Transpose" else None
        reshaped = consumers.get(out_t.output[0], []) if out_t is not None else []
        out = reshaped[0] if len(reshaped) == 1 and reshaped[0].op_type == "Reshape" else None
        if query is None or key is None or value is None or out is None or graph.perm(out_t) != [0, 2, 1, 3]:
            logger.debug("Softmax %s: not a rotary attention", softmax.name)
            continue
        (q_proj, heads, size, cos), (k_proj, k_heads, k_size, k_cos) = query, key
        if (k_heads, k_size, k_cos) != (heads, size, cos) or value[1:] != (heads, size):
            continue
        inv_freq = graph.inverse_frequencies(cos, size // 2)
        if inv_freq is None:
            logger.debug("Softmax %s: no inverse frequencies of %d values above %s", softmax.name, size // 2, cos)
            continue
        key_bytes = inv_freq.tobytes()
        if key_bytes not in caches:
            index = len(caches)
            angles = np.arange(max_length, dtype=np.float32)[:, None] * inv_freq[None, :]
            names = (f"rotary_cos_cache_{index}", f"rotary_sin_cache_{index}")
            for name, table in zip(names, (np.cos(angles), np.sin(angles)), strict=True):
                model.add_initializer(numpy_helper.from_array(table.astype(np.float32), name))  # type: ignore[attr-defined]
            caches[key_bytes] = names
        cos_cache, sin_cache = caches[key_bytes]
        if positions is None:
            positions = _position_ids(model, q_proj)
        base = softmax.name.rsplit("/", 1)[0] or softmax.name
        rotated = []
        for part, proj in (("q", q_proj), ("k", k_proj)):
            name = f"{base}/RotaryEmbedding_{part}"
            rotated.append(f"{name}_output_0")
            model.add_node(helper.make_node(  # type: ignore[attr-defined]
                "RotaryEmbedding", [proj, positions, cos_cache, sin_cache], [rotated[-1]], name=name,
                domain="com.microsoft", interleaved=0, num_heads=heads))
        model.add_node(helper.make_node(  # type: ignore[attr-defined]
            "MultiHeadAttention", [rotated[0], rotated[1], value[0], "", "", mask], [out.output[0]],
            name=f"{base}/MultiHeadAttention", domain="com.microsoft", num_heads=heads, scale=scale))
        remove.append(out)
        fused.append(heads)
    model.remove_nodes(remove)  # type: ignore[attr-defined]
    model.prune_graph()  # type: ignore[attr-defined]
    return fused


def _position_ids(model: object, projection: str) -> str:
    """(batch, seq) positions 0..seq-1 from the shape of a (batch, seq, width) tensor. onnxruntime also takes a
    one-element start offset, but OpenVINO's conversion of RotaryEmbedding misreads that form (measured: outputs
    off by 0.75), so the graph spells the positions out."""
    names = ("rotary_positions_zero", "rotary_positions_one", "rotary_positions_axis")
    for name, value in zip(names, (np.array(0, np.int64), np.array(1, np.int64), np.array([0], np.int64)),
                           strict=True):
        model.add_initializer(numpy_helper.from_array(value, name))  # type: ignore[attr-defined]
    zero, one, axis = names
    for node in (
        helper.make_node("Shape", [projection], ["rotary_positions_shape"], "rotary_positions_Shape", end=2),
        helper.make_node("Gather", ["rotary_positions_shape", one], ["rotary_positions_length"],
                         "rotary_positions_Gather", axis=0),
        helper.make_node("Range", [zero, "rotary_positions_length", one], ["rotary_positions_range"],
                         "rotary_positions_Range"),
        helper.make_node("Unsqueeze", ["rotary_positions_range", axis], ["rotary_positions_row"],
                         "rotary_positions_Unsqueeze"),
        helper.make_node("Expand", ["rotary_positions_row", "rotary_positions_shape"], ["rotary_position_ids"],
                         "rotary_positions_Expand"),
    ):
        model.add_node(node)  # type: ignore[attr-defined]
    return "rotary_position_ids"

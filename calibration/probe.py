"""The paired strategy's probe: the FP32 graph with, beside each quantized node, its INT8 twin reading the same
float input, run once to rank the nodes by their own INT8 error. See :mod:`calibration.search`."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibration.search_core import MASK_INPUT, Batch, _tensors, cpu_session
from graphs.core.errors import QuantizationError

logger = logging.getLogger(__name__)


def probe_graph(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str],
    shifts: Mapping[str, np.ndarray] | None = None, inplace: bool = False,
) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """The FP32 graph with each of ``nodes``' INT8 form from ``quantized`` beside it, reading the same float input.

    ``float_model`` and ``quantized`` share tensor and node names (the FP32 twin and the INT8 graph of one plan).
    For each node, the INT8 *island* is what ``quantized`` computes the node's first output from: the nodes reached
    backwards from its producer until tensors that ``float_model`` also has (the float activation, shared
    biases, the mask). The island is copied with every tensor it makes renamed, so it reads the FP32 graph's
    activation and its output sits beside the FP32 output. ``shifts[node]`` (bias correction: what the INT8
    graph adds to the bias after the node) is added to the INT8 output. The probe's outputs are, per node,
    the squared error and the squared FP32 value summed over the last axis (``[batch, seq]`` for token outputs),
    so a run returns a few numbers per token, not activations. Returns the probe and ``{node: (error output,
    reference output)}``. ``inplace``: the probe is ``float_model`` itself, changed (no copy of the weights).
    """
    known = _tensors(float_model)
    probe = float_model if inplace else copy.deepcopy(float_model)
    producer = {out: node for node in quantized.graph.node for out in node.output}
    position = {id(node): index for index, node in enumerate(quantized.graph.node)}
    q_inits = {init.name: init for init in quantized.graph.initializer}
    float_nodes = {node.name: node for node in float_model.graph.node}
    opset = next((o.version for o in probe.opset_import if o.domain in ("", "ai.onnx")), 17)
    copied: set[str] = set()
    outputs: dict[str, tuple[str, str]] = {}
    del probe.graph.output[:]
    for index, name in enumerate(nodes):
        if name not in float_nodes:
            raise QuantizationError(f"cannot probe node {name!r}: not in the FP32 graph")
        target = float_nodes[name].output[0]
        if target not in producer:
            raise QuantizationError(f"cannot probe node {name!r}: the INT8 graph does not compute {target!r}")
        island, stack, seen = [], [producer[target]], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            island.append(node)
            stack += [producer[i] for i in node.input if i and i not in known and i in producer]
        tag = f"__probe{index}"
        made = {out for node in island for out in node.output}
        rename = {tensor: tensor + tag for tensor in made}
        for node in sorted(island, key=lambda n: position[id(n)]):
            twin = copy.deepcopy(node)
            twin.name = node.name + tag
            for slot, tensor in enumerate(twin.input):
                if tensor in rename:
                    twin.input[slot] = rename[tensor]
                elif tensor and tensor not in known and tensor in q_inits and tensor not in copied:
                    probe.graph.initializer.append(q_inits[tensor])
                    copied.add(tensor)
            for slot, tensor in enumerate(twin.output):
                twin.output[slot] = rename.get(tensor, tensor + tag)
            probe.graph.node.append(twin)
        estimate = rename[target]
        if shifts and name in shifts:
            shift = f"{name}{tag}_shift"
            probe.graph.initializer.append(numpy_helper.from_array(np.asarray(shifts[name], np.float32), shift))
            probe.graph.node.append(helper.make_node("Add", [estimate, shift], [estimate + "_shifted"]))
            estimate += "_shifted"
        probe.graph.node.append(helper.make_node("Sub", [estimate, target], [f"{name}{tag}_difference"]))
        pair = (f"{name}{tag}_error", f"{name}{tag}_reference")
        for source, out in ((f"{name}{tag}_difference", pair[0]), (target, pair[1])):
            if opset >= 18:
                axes = f"{out}_axes"
                probe.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                probe.graph.node.append(helper.make_node("ReduceSumSquare", [source, axes], [out], keepdims=0))
            else:
                probe.graph.node.append(helper.make_node("ReduceSumSquare", [source], [out], axes=[-1], keepdims=0))
            probe.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
        outputs[name] = pair
    for opset_id in quantized.opset_import:
        if opset_id.domain and not any(o.domain == opset_id.domain for o in probe.opset_import):
            probe.opset_import.append(opset_id)
    return probe, outputs


def paired_errors(
    float_model: onnx.ModelProto, quantized: onnx.ModelProto, nodes: Sequence[str], batches: Sequence[Batch],
    shifts: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Each node's INT8 output error against its FP32 output on the same float input, from one run of
    :func:`probe_graph` over ``batches``: ``sum |int8 - fp32|^2 / sum |fp32|^2`` over the real tokens (those
    the ``attention_mask`` feed marks; every row where there is none or the output is not per token).
    ``float_model`` is changed into the probe (pass a copy you do not need again)."""
    probe, outputs = probe_graph(float_model, quantized, nodes, shifts, inplace=True)
    del float_model
    error = dict.fromkeys(nodes, 0.0)
    reference = dict.fromkeys(nodes, 0.0)
    with tempfile.TemporaryDirectory(prefix="export-model-probe-") as work:
        session = cpu_session(probe, Path(work))
        del probe
        names = {graph_input.name for graph_input in session.get_inputs()}
        order = [output.name for output in session.get_outputs()]
        for feeds in batches:
            values = dict(zip(order, session.run(None, {k: v for k, v in feeds.items() if k in names}), strict=True))
            mask = feeds.get(MASK_INPUT)
            for name, (err, ref) in outputs.items():
                e, r = values[err], values[ref]
                weight = mask.astype(np.float64) if mask is not None and mask.shape == e.shape else 1.0
                error[name] += float(np.sum(e * weight))
                reference[name] += float(np.sum(r * weight))
    return {name: error[name] / max(reference[name], 1e-30) for name in nodes}

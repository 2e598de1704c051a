"""INT8 of the fused graph from scales a quantization-aware training learned: no calibration texts, no
SmoothQuant search, no GPTQ, no bias correction, no per-token re-scaling.

Each weight-bearing node of the fused graph (:func:`calibration.ranges.find_targets`) is matched to a learned
linear by the fingerprint of its float weight (the exporter computes the same fingerprint from the compacted
PyTorch modules, so a node pruned or packed by compaction and fusion still finds its scales). A matched node is
built by :func:`calibration.fused.build_int8` with::

    x -> [Mul(pre_quant_scale), SmoothQuant checkpoints] -> QuantizeLinear(amax / 127, zero point 128, uint8)
      -> QAttention / MatMulIntegerToFloat(int8 weight as trained, per-output-channel step)

A symmetric int8 activation step ``s`` with zero point 0 covers [-128 s, 127 s]; as uint8 with zero point 128 it
covers the same levels exactly, and QAttention takes only uint8 inputs (int8 with zero point 0 is "not
implemented" in onnxruntime 1.31/1.32). An affine unsigned input (torch.ao: step ``s``, zero point ``z``, range
[0, 127]) is uint8 with zero point ``z`` as trained; a range narrower than the uint8 one gets a ``Clip`` first
(:func:`_clip_ranges`), so the graph rounds and clamps as training did. The int8 weights keep the full trained range [-128, 127]: on x86 CPUs
without VNNI the session needs ``session.x64quantprecision=1`` to compute them exactly (the manifest says so).

Nodes without learned scales follow the per-node policy recorded in the report: a node with only a learned weight
scale runs in float with its fake-quantized weight (what the training computed), a node with none stays float.
The FP32 twin of every imported node also holds its fake-quantized weight, so a node put back in FP32 keeps it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibration.fused import FusedPlan, smooth_graph
from calibration.quantize import QuantizationReport, save_quantized
from calibration.ranges import InputPlan, Target, find_targets
from calibration.search import drop_unused_initializers, is_large
from calibration.settings import QuantizationConfig
from graphs.core.errors import QuantizationError

logger = logging.getLogger(__name__)

ZERO_POINT = 128
"""uint8 zero point that re-encodes a symmetric int8 activation step exactly."""


@dataclass(frozen=True)
class LearnedLinear:
    """One linear's learned INT8, in the fused graph's layout (``x @ W``, W of shape [in, out])."""

    weight_int8: np.ndarray  # [in, out] int8, as trained (clamped to the range, never re-scaled)
    weight_scale: np.ndarray  # [out] float32: the step of each output channel's weight
    input_scale: float | None  # step of the int8 input (amax / 127); None: no learned input range
    smooth: np.ndarray | None = None  # [in]: the graph divides the input by it (1 / pre_quant_scale)
    name: str = ""  # the checkpoint's module name(s), for the report
    input_qmin: int = -128  # -127: a narrow symmetric range (Q8BERT), kept exact by a Clip before quantizing
    input_qmax: int = 127  # with input_qmin: the trainer's integer range (torch.ao's quint8 default: [0, 127])
    input_zero_point: int = 0  # the trainer's zero point (torch.ao affine inputs); 0 for symmetric int8

    @property
    def input_uint8(self) -> tuple[int, int, int]:
        """(zero point, qmin, qmax) of the input as uint8: a signed range is shifted by 128 (the same levels),
        an unsigned one (torch.ao quint8) is kept."""
        shift = ZERO_POINT if self.input_qmin < 0 else 0
        return self.input_zero_point + shift, self.input_qmin + shift, self.input_qmax + shift

    @property
    def fake_quantized(self) -> np.ndarray:
        """The weight as the trainer's weight quantizer gives it, [in, out]; it reads the input divided by
        ``smooth``."""
        return (self.weight_int8.astype(np.float32) * self.weight_scale[None, :]).astype(np.float32)

    @property
    def fake_quantized_unsmoothed(self) -> np.ndarray:
        """:attr:`fake_quantized` for a node that reads the input itself (no smoothing Mul before it)."""
        if self.smooth is None:
            return self.fake_quantized
        return (self.fake_quantized.astype(np.float64) / self.smooth.astype(np.float64)[:, None]).astype(np.float32)


def fingerprint(weight: np.ndarray) -> str:
    """Identity of a float weight in the fused graph's layout: its shape and float32 bytes (row-major)."""
    array = np.ascontiguousarray(weight, dtype=np.float32)
    return f"{list(array.shape)}:{hashlib.sha256(array.tobytes()).hexdigest()}"


@dataclass
class LearnedPlan:
    plan: FusedPlan
    sources: dict[str, str]  # node -> checkpoint | float (fake-quantized weight) | float (no learned scale)
    modules: dict[str, str]  # node -> checkpoint module(s)


def plan_learned(
    model: onnx.ModelProto, learned: dict[str, LearnedLinear], op_types: Sequence[str], exclude: Sequence[str],
) -> LearnedPlan:
    """Match ``model``'s targets to ``learned`` (keyed by :func:`fingerprint`) and plan their INT8."""
    targets = find_targets(model, op_types, exclude)
    initializers = {init.name: init for init in model.graph.initializer}
    chosen: list[tuple[Target, LearnedLinear]] = []
    weight_only: list[tuple[Target, LearnedLinear]] = []
    sources: dict[str, str] = {}
    modules: dict[str, str] = {}
    for target in targets:
        entry = learned.get(fingerprint(numpy_helper.to_array(initializers[target.weight])))
        if entry is None:
            sources[target.name] = "float (no learned scale)"
            continue
        modules[target.name] = entry.name
        if entry.input_scale is None:
            sources[target.name] = "float (fake-quantized weight; no learned input range)"
            weight_only.append((target, entry))
        else:
            sources[target.name] = "checkpoint"
            chosen.append((target, entry))
    plans: dict[str, InputPlan] = {}
    for target, entry in chosen:
        width = entry.weight_int8.shape[0]
        smooth = np.ones(width, np.float32) if entry.smooth is None else entry.smooth.astype(np.float32)
        plan = InputPlan(smooth=smooth, alpha=0.0 if entry.smooth is None else 1.0,
                         scale=float(np.float32(entry.input_scale)), zero_point=entry.input_uint8[0])
        other = plans.get(target.activation)
        if other is not None and (other.scale != plan.scale or other.zero_point != plan.zero_point
                                  or not np.array_equal(other.smooth, plan.smooth)):
            raise QuantizationError(
                f"{target.name} reads {target.activation} with a learned input step {plan.scale:.6g} but another "
                f"node reading it learned {other.scale:.6g}; one quantized tensor takes one step: export the float "
                "model and calibrate instead")
        plans[target.activation] = plan
    smoothed = smooth_graph(model, [t for t, _ in chosen], plans, fold=False)
    chosen = _clip_ranges(smoothed, chosen, plans)
    nodes = {node.name: node for node in smoothed.graph.node}
    for target, entry in chosen + weight_only:
        node = nodes[target.name]
        node.input[1] = f"{target.weight}_fake_quantized"
        value = entry.fake_quantized if (target, entry) in chosen else entry.fake_quantized_unsmoothed
        smoothed.graph.initializer.append(numpy_helper.from_array(value, node.input[1]))
    _bake_other_weights(smoothed, {t.name for t in targets}, learned, sources, modules)
    drop_unused_initializers(smoothed)
    int8 = {t.name: (e.weight_int8.astype(np.int8), e.weight_scale.astype(np.float32)) for t, e in chosen}
    logger.info("learned scales: %d of %d nodes INT8 from the checkpoint, %d float with fake-quantized weights, "
                "%d float", len(chosen), len(targets), len(weight_only), len(targets) - len(chosen) - len(weight_only))
    return LearnedPlan(FusedPlan([t for t, _ in chosen], plans, smoothed, int8, {}), sources, modules)


def _bake_other_weights(model: onnx.ModelProto, targets: set[str], learned: dict[str, LearnedLinear],
                        sources: dict[str, str], modules: dict[str, str]) -> None:
    """Weights of learned linears the graph does not run as a target (the pooler and task head, exported as
    ``Gemm`` with the weight as stored, [out, in]): replaced by their fake-quantized values, in float. Only
    initializers that some node other than a target reads are looked at."""
    read = {name for node in model.graph.node if node.name not in targets for name in node.input}
    for init in model.graph.initializer:
        if init.name not in read or len(init.dims) != 2:
            continue
        weight = numpy_helper.to_array(init)
        for layout in (weight, weight.T):
            entry = learned.get(fingerprint(layout))
            if entry is not None:
                baked = entry.fake_quantized_unsmoothed if layout is weight else entry.fake_quantized_unsmoothed.T
                init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(baked), init.name))
                sources[init.name] = "float (fake-quantized weight; not an INT8 target, e.g. a Gemm)"
                modules[init.name] = entry.name
                break


def _clip_ranges(model: onnx.ModelProto, chosen: list[tuple[Target, LearnedLinear]],
                 plans: dict[str, InputPlan]) -> list[tuple[Target, LearnedLinear]]:
    """Targets whose learned input range is narrower than uint8's [0, 255] (Q8BERT's [-127, 127], torch.ao's
    [0, 127]) read their input through ``Clip(s (qmin - z), s (qmax - z))``: QuantizeLinear saturates at uint8's
    ends only, and would keep levels the trainer's quantizer clamped away::

        x -> Clip(s (qmin - z), s (qmax - z)) -> QuantizeLinear(s, z as uint8) -> ...   (the target's input)
    """
    ranges = {t.activation: e.input_uint8 for t, e in chosen if e.input_uint8[1:] != (0, 255)}
    narrow = set(ranges)
    if not narrow:
        return chosen
    nodes = list(model.graph.node)
    for activation in narrow:
        plan = plans.pop(activation)
        clipped = f"{activation}_clipped"
        plans[clipped] = plan
        zero, low, high = ranges[activation]
        bounds = [numpy_helper.from_array(np.array(float(level - zero) * plan.scale, np.float32), f"{clipped}_{end}")
                  for level, end in ((low, "min"), (high, "max"))]
        model.graph.initializer.extend(bounds)
        first = min(i for i, node in enumerate(nodes) if activation in node.input
                    and any(node.name == t.name for t, _ in chosen if t.activation == activation))
        nodes.insert(first, helper.make_node("Clip", [activation, bounds[0].name, bounds[1].name], [clipped],
                                             f"{activation}_clip"))
        for node in nodes:
            if any(node.name == t.name for t, _ in chosen if t.activation == activation):
                node.input[0] = clipped
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return [(Target(t.name, t.op_type, f"{t.activation}_clipped", t.weight) if t.activation in narrow else t, e)
            for t, e in chosen]


def quantize_learned(
    model_path: Path, output_path: Path, learned: dict[str, LearnedLinear],
    config: QuantizationConfig = QuantizationConfig(),  # noqa: B008 - frozen, so a shared default is safe
) -> tuple[QuantizationReport, dict[str, Any]]:
    """Write ``output_path``, the INT8 form of the fused graph ``model_path`` with every node that matches a
    learned linear (``learned``, keyed by :func:`fingerprint`) in INT8 from its learned scales, no calibration.

    Returns the quantization report (as for calibrated files; ``samples`` 0, ``weight_bits`` 8) and the import's
    own report: the scale source per node, the checkpoint module(s) behind each, and the session option CPUs
    without VNNI need."""
    start = time.perf_counter()
    model = onnx.load(str(model_path))
    large = is_large(model)
    planned = plan_learned(model, learned, config.op_types, config.exclude_nodes)
    del model
    names = [target.name for target in planned.plan.targets]
    if not names:
        raise QuantizationError(
            f"no node of {model_path.name} matched a linear with learned scales ({len(learned)} imported); the "
            "graph's weights differ from the checkpoint's: export the float model and calibrate instead")
    save_quantized(planned.plan.build(names), output_path, large)
    counts = Counter(target.op_type for target in planned.plan.targets)
    kept = sorted(name for name, source in planned.sources.items() if source != "checkpoint")
    report = QuantizationReport.of(config, counts, kept, object(), "", time.perf_counter() - start, None,
                                   graph="fused", smoothing=planned.plan.smoothing_report())
    full_range = any(int(np.abs(wq.astype(np.int16)).max()) > 63 for wq, _ in planned.plan.int8.values())
    report = dataclasses.replace(report, preset="learned", method="learned", weight_bits=8,
                                 config=report.config | {"scales": "learned (checkpoint)"})
    imported = {
        "calibration": "none: every INT8 node's scales are the checkpoint's (no texts, SmoothQuant search, GPTQ or "
                       "bias correction)",
        "scale_source": dict(sorted(planned.sources.items())),
        "modules": dict(sorted(planned.modules.items())),
        "weight_range": "full [-128, 127] as trained" if full_range else "within [-63, 63]",
        "session_options_without_vnni": {"session.x64quantprecision": "1"} if full_range else {},
    }
    logger.info("INT8 from learned scales: %s, %d nodes, in %.1f s -> %s", dict(counts), len(names),
                time.perf_counter() - start, output_path)
    return report, imported

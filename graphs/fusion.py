"""Graph fusion: onnxruntime's transformer optimizer, then a check of what it fused against the compaction plan.

onnxruntime's ``optimize_model(model_type="bert", num_heads=0, hidden_size=0)`` reads each layer's head
count from that layer's Q Reshape constant, which is what a model with uneven heads per layer needs. It
trusts that constant, though, and only logs what it could not fuse. So every fused Attention node is
mapped to its encoder layer (by data flow, see ``graphs.inspection``) and its ``num_heads`` compared with
the heads compaction left in that layer; then the fused graph is run next to the unfused one on padded
inputs. Anything short of "every layer fused with the right heads, same numbers" is a ``FusionError``
with a per-layer table.

Attention onnxruntime 1.31 leaves unfused is fused by our own passes: DistilBERT's masked_fill mask
(``graphs.fuse_distilbert_attention``) and NoNorm models, which have no LayerNorm to anchor on
(``graphs.fuse_nonorm_attention``), whose elementwise NoNorms are then folded into the weights
(``graphs.fold_nonorm``). Residual Adds stay in front of LayerNormalization as one Sum
(``graphs.residual_sum``) because onnxruntime's CPU SkipLayerNormalization is the slower kernel.

    exported.onnx --optimize_model--> --own passes--> fused graph --verify vs GraphPlan--> --compare vs exported--> output
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graphs import inspection
from graphs.core.errors import FusionError
from graphs.equivalence import compare_graphs
from graphs.fold_nonorm import fold_nonorm
from graphs.fuse_distilbert_attention import fuse_distilbert_attention
from graphs.fuse_mpnet_attention import fuse_mpnet_attention
from graphs.fuse_nonorm_attention import fuse_nonorm_attention
from graphs.fuse_relu_gemm import fuse_relu_gemm
from graphs.fuse_rotary_attention import fuse_rotary_attention
from graphs.residual_sum import sum_residuals

#: The project's own attention passes, by the name a family's file gives (``Architecture.attention_pass``): each
#: fuses the attention onnxruntime's optimizer cannot match and returns the layers it fused.
ATTENTION_PASSES: dict[str, Callable[[Any, GraphPlan], list[int]]] = {
    # q / sqrt(d) before the scores, masked_fill mask
    "distilbert": lambda model, plan: fuse_distilbert_attention(model),
    # no LayerNorm to anchor the match on
    "nonorm": lambda model, plan: fuse_nonorm_attention(model),
    # a relative position bias added before the mask: Attention's attention_bias
    "mpnet": lambda model, plan: fuse_mpnet_attention(model),
    # rotary Q and K (ModernBERT): RotaryEmbedding + MultiHeadAttention, the mask as attention_bias
    "rotary": lambda model, plan: fuse_rotary_attention(model, plan.max_length),
}

logger = logging.getLogger(__name__)

#: protobuf cannot serialize one message over 2 GiB; larger models keep their weights in external data.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31

_GELU_OPS = ("BiasGelu", "Gelu", "FastGelu", "GemmFastGelu")
_SKIP_LN_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
#: Name, in reports, of LayerNormalization fed by one residual Sum (see ``graphs.residual_sum``).
SUM_LAYER_NORM = "SumLayerNorm"
#: Name, in reports, of NoNorm Mul/Add pairs folded into weights (see ``graphs.fold_nonorm``).
NONORM_FOLDED = "NoNormFolded"
#: Name, in reports, of ReLU feed-forwards rewritten as Gemm + Relu (see ``graphs.fuse_relu_gemm``).
RELU_GEMM = "ReluGemm"


@dataclass(frozen=True)
class GraphPlan:
    """What compaction left, per layer; built by the exporter from its compaction report."""

    heads_per_layer: tuple[int, ...]
    """Surviving attention heads of each encoder layer, in order (each at least 1)."""
    hidden_size: int
    architecture: str
    """The family's name, for reports (``"bert"``, ``"roberta"``, ``"distilbert"``, ...)."""
    layer_norm: str = "layer_norm"
    """``"layer_norm"`` (default) or ``"no_norm"``."""
    activation: str = "gelu"
    """The config's ``hidden_act`` (default ``"gelu"``), e.g. ``"relu"``."""
    attention_pass: str | None = None
    """The project's own attention fusion the family needs after onnxruntime's (a key of
    :data:`ATTENTION_PASSES`), chosen by the family's file (``Architecture.attention_pass``); None: none."""
    pre_norm: bool = False
    """LayerNorm before each block (ModernBERT): no bias Add beside the residual, so no residual Sum is expected."""
    max_length: int = 512
    """Longest sequence the artifact serves: the positions of constant caches a pass writes (rotary tables)."""


@dataclass(frozen=True)
class FusionConfig:
    """How to fuse. Defaults keep the graph exact for any padding and any later stage."""

    use_raw_attention_mask: bool = True
    """Keep the raw 2-D mask (default True). False uses onnxruntime's MaskIndexEnd (a 1-D length), which
    is only correct for right padding."""
    enable_embed_layer_norm: bool = True
    """Fuse embeddings + LayerNorm into EmbedLayerNormalization (default True). Turn off before static
    quantization, whose recipes commonly expect the unfused embedding ops."""
    enable_skip_layer_norm: bool = False
    """Fuse residual Add + LayerNorm into SkipLayerNormalization (default False). onnxruntime 1.31's CPU
    kernel for it is several times slower than LayerNormalization, so by default the residual and bias
    Adds become one Sum in front of a LayerNormalization instead (``graphs.residual_sum``)."""
    enable_gelu_approximation: bool = False
    """Replace exact GELU by the tanh FastGelu (default False: it changes outputs by about 1e-3)."""
    fold_nonorm: bool = True
    """Fold NoNorm (``x * w + b``) into the neighbouring weights (default True; exact, see
    ``graphs.fold_nonorm``). Only NoNorm models have any."""
    relu_gemm: bool = False
    """Rewrite ReLU feed-forwards as Gemm + Relu, which onnxruntime runs as FusedGemm (default False: measured
    slower than MatMul + Add + Relu on onnxruntime 1.31 CPU, see ``graphs.fuse_relu_gemm``)."""
    check_numerics: bool = True
    """Run the unfused and fused graphs on right/left/hole-padded inputs and require them to agree
    (default True)."""
    atol: float = 1e-4
    """Absolute tolerance of the numeric check (default 1e-4)."""
    rtol: float = 1e-4
    """Tolerance relative to the largest reference output (default 1e-4): NoNorm models are not
    normalized, so their outputs can be large."""


@dataclass
class LayerFusion:
    """One encoder layer: the heads the plan expects, the heads its Attention node has (None: not fused),
    and its fused op counts (empty when no attention fused, since then layers cannot be told apart)."""

    layer: int
    expected_heads: int
    attention_heads: int | None
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class FusionReport:
    """What fusion produced: fused-op counts, per-layer detail, and a skip reason when attention did not fuse."""

    op_counts: dict[str, int]
    layers: list[LayerFusion]
    attention_fused: bool
    skip_reason: str | None
    """Why attention was left unfused; None since every accepted kind fuses (kept for manifest readers)."""
    seconds: float
    expected: dict[str, int] = field(default_factory=dict)
    """What a fully fused graph of this plan holds per op family (``Attention``, ``SkipLayerNorm``, ``Gelu``)."""
    max_abs_diff: float | None = None
    max_tokens: int | None = None
    """Longest sequence the fused graph takes where a pass wrote position caches (rotary); None: any."""
    """Numeric check: largest output difference to the unfused graph (None when not checked)."""

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def summary(self) -> str:
        """One line like ``fused: Attention 6/6, SkipLayerNorm 12/12, BiasGelu 6/6``."""
        found = {
            "Attention": sum(self.op_counts.get(op, 0) for op in inspection.ATTENTION_OPS),
            "SkipLayerNorm": sum(self.op_counts.get(op, 0) for op in _SKIP_LN_OPS),
            SUM_LAYER_NORM: self.op_counts.get(SUM_LAYER_NORM, 0),
            NONORM_FOLDED: self.op_counts.get(NONORM_FOLDED, 0),
            RELU_GEMM: self.op_counts.get(RELU_GEMM, 0),
            "RotaryEmbedding": self.op_counts.get("RotaryEmbedding", 0),
        }
        gelu_op = next((op for op in _GELU_OPS if self.op_counts.get(op)), "BiasGelu")
        found[gelu_op] = self.op_counts.get(gelu_op, 0)
        parts = []
        for name, count in found.items():
            family = "Gelu" if name in _GELU_OPS else name
            want = self.expected.get(family)
            if want or count:
                parts.append(f"{name} {count}/{want}" if want is not None else f"{name} {count}")
        if self.op_counts.get("EmbedLayerNormalization"):
            parts.append(f"EmbedLayerNorm {self.op_counts['EmbedLayerNormalization']}")
        line = "fused: " + (", ".join(parts) if parts else "nothing")
        return f"{line} (attention skipped: {self.skip_reason})" if self.skip_reason else line


def fuse_graph(
    model_path: Path, output_path: Path, plan: GraphPlan, config: FusionConfig = FusionConfig()
) -> FusionReport:
    """Fuse ``model_path`` with onnxruntime's BERT optimizer, verify it against ``plan``, write ``output_path``.

    Raises ``FusionError`` (nothing written) when some but not all layers fused, when any Attention node's
    head count differs from ``plan.heads_per_layer``, when a kind that should fuse fused no attention, or
    when the fused graph computes different numbers, or when no attention fused at all. Returns the report.
    """
    # Imported here: onnxruntime.transformers pulls in its whole fusion library (about a second).
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    start = time.perf_counter()
    model_path, output_path = Path(model_path), Path(output_path)
    logger.info(
        "fusing %s: %s, %d layers, heads %s, %s, %s",
        model_path,
        plan.architecture,
        len(plan.heads_per_layer),
        list(plan.heads_per_layer),
        plan.layer_norm,
        plan.activation,
    )
    options = FusionOptions("bert")
    options.attention_mask_format = (
        AttentionMaskFormat.AttentionMask
        if config.use_raw_attention_mask
        else AttentionMaskFormat.MaskIndexEnd
    )
    options.enable_embed_layer_norm = config.enable_embed_layer_norm
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = config.enable_skip_layer_norm
    options.enable_gelu_approximation = config.enable_gelu_approximation
    # opt_level=0: Python fusions only. Level 1+ first runs an onnxruntime session whose helper imports torch
    # (optimize_by_onnxruntime, onnxruntime 1.31), and its constant folding is not needed for TorchScript
    # exports. num_heads=0/hidden_size=0: read each layer's heads from its own Q Reshape (pruned models).
    optimizer = optimize_model(
        str(model_path),
        model_type="bert",
        num_heads=0,
        hidden_size=0,
        optimization_options=options,
        opt_level=0,
    )
    if plan.attention_pass is not None:
        ATTENTION_PASSES[plan.attention_pass](optimizer, plan)
    layers = len(plan.heads_per_layer)
    rewrites: dict[str, tuple[int, int]] = {}  # report name: (done, expected)
    if plan.layer_norm == "no_norm":
        rewrites[NONORM_FOLDED] = (fold_nonorm(optimizer) if config.fold_nonorm else 0, 2 * layers + 1)
    if config.relu_gemm and plan.activation == "relu":
        rewrites[RELU_GEMM] = (fuse_relu_gemm(optimizer), layers)
    if not config.enable_skip_layer_norm:
        sum_residuals(optimizer)
    fused = optimizer.model
    report = _verify(fused, plan)
    if plan.attention_pass == "rotary":
        report.max_tokens = plan.max_length  # the RotaryEmbedding caches hold max_length positions
    for name, (done, expected) in rewrites.items():
        report.op_counts[name], report.expected[name] = done, expected

    with tempfile.TemporaryDirectory(prefix="fusion-") as work:
        candidate = Path(work) / output_path.name
        _save(optimizer, candidate)
        if config.check_numerics:
            padding = ("right", "left", "hole") if config.use_raw_attention_mask else ("right",)
            check = compare_graphs(model_path, candidate, padding=padding)
            report.max_abs_diff = check.max_abs_diff
            if not check.within(config.atol, config.rtol):
                raise FusionError(
                    f"fused graph of {model_path.name} differs from the unfused graph by {check.max_abs_diff:.3g} "
                    f"(allowed {config.atol:g} + {config.rtol:g} x {check.max_abs_reference:.3g}) on "
                    f"{'/'.join(padding)} padding; {report.summary()}. onnxruntime fused a pattern it misread; try FusionConfig("
                    "enable_embed_layer_norm=False) or fuse with check_numerics=False only to inspect the graph."
                )
        output_path.parent.mkdir(parents=True, exist_ok=True)
        # Moved, not saved again: saving with external data rewrites the ModelProto in place (onnx 1.23).
        for written in Path(work).iterdir():
            shutil.move(str(written), str(output_path.parent / written.name))

    report.seconds = time.perf_counter() - start
    logger.info("fused %s in %.1f s: %s", output_path, report.seconds, report.summary())
    return report


def _verify(fused: onnx.ModelProto, plan: GraphPlan) -> FusionReport:
    counts = inspection.fused_op_counts(fused)
    counts[SUM_LAYER_NORM] = inspection.sum_layer_norm_count(fused)
    nodes = inspection.attention_nodes(fused)
    per_layer_ops = inspection.layer_op_counts(fused)
    n_layers = len(plan.heads_per_layer)
    layers = [
        LayerFusion(
            layer=i,
            expected_heads=heads,
            attention_heads=nodes[i].num_heads if i < len(nodes) else None,
            ops=per_layer_ops.get(i, {}),
        )
        for i, heads in enumerate(plan.heads_per_layer)
    ]
    expected = {"Attention": n_layers}
    if plan.layer_norm == "layer_norm" and not plan.pre_norm:
        expected["SkipLayerNorm" if counts.get("SkipLayerNormalization") else SUM_LAYER_NORM] = 2 * n_layers
    if plan.activation.startswith("gelu"):
        expected["Gelu"] = n_layers
    if plan.attention_pass == "rotary":
        expected["RotaryEmbedding"] = 2 * n_layers
    report = FusionReport(
        op_counts=counts,
        layers=layers,
        attention_fused=bool(nodes),
        skip_reason=None,
        seconds=0.0,
        expected=expected,
    )
    if not nodes:
        raise FusionError(
            f"expected {n_layers} fused Attention nodes for a {plan.architecture}/{plan.layer_norm} model, "
            "found 0. Export with exporter.onnx_export (torch.onnx.export(dynamo=False) over the project's own "
            "forward, exporter.export_forward), whose Q Reshapes carry each layer's head count as a constant; the "
            "dynamo exporter and transformers 5's -1 reshapes do not fuse."
        )

    problems = _layer_problems(nodes, plan)
    if problems:
        raise FusionError(
            f"fused attention does not match the compaction plan ({len(nodes)} Attention nodes for "
            f"{n_layers} layers; {'; '.join(problems)}). A layer's Q Reshape constant disagrees with the "
            "heads left in its weights, or a layer did not fuse; re-export with torch.onnx.export(dynamo=False) "
            f"and check the compaction report.\n{_table(nodes, plan)}"
        )
    return report


def _layer_problems(nodes: list[inspection.AttentionNode], plan: GraphPlan) -> list[str]:
    problems = []
    if len(nodes) != len(plan.heads_per_layer):
        problems.append(f"{len(nodes)} of {len(plan.heads_per_layer)} layers fused")
    for i, node in enumerate(nodes[: len(plan.heads_per_layer)]):
        want = plan.heads_per_layer[i]
        if node.num_heads != want:
            problems.append(f"layer {i}: {node.num_heads} heads, expected {want}")
        if node.input_hidden_size is not None and node.input_hidden_size != plan.hidden_size:
            problems.append(f"layer {i}: input width {node.input_hidden_size}, expected {plan.hidden_size}")
        if node.num_heads and node.head_size is None:
            problems.append(f"layer {i}: Q width does not divide into {node.num_heads} heads")
    return problems


def _table(nodes: list[inspection.AttentionNode], plan: GraphPlan) -> str:
    rows = [
        "layer | expected heads | found heads | head size | node",
        "----- | -------------- | ----------- | --------- | ----",
    ]
    for i in range(max(len(nodes), len(plan.heads_per_layer))):
        want = str(plan.heads_per_layer[i]) if i < len(plan.heads_per_layer) else "-"
        node = nodes[i] if i < len(nodes) else None
        found = str(node.num_heads) if node else "not fused"
        size = str(node.head_size) if node and node.head_size is not None else "-"
        mark = "" if node and want == found else "  <-"
        rows.append(f"{i:5d} | {want:>14} | {found:>11} | {size:>9} | {node.name if node else '-'}{mark}")
    return "\n".join(rows)


def _save(optimizer: object, path: Path) -> None:
    model: onnx.ModelProto = optimizer.model  # type: ignore[attr-defined]
    weights = sum(_tensor_bytes(t) for t in model.graph.initializer)
    external = weights >= EXTERNAL_DATA_THRESHOLD_BYTES
    optimizer.save_model_to_file(str(path), use_external_data_format=external)  # type: ignore[attr-defined]


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize

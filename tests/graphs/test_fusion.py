"""Graph fusion on tiny seeded models exported in code: structure by counts, numbers against PyTorch.

Each model is built, head-pruned unevenly (the tests' own ``prune_heads``: transformers 5 has none) and exported
once per module (TorchScript exporter, opset 17, the project's export forward of ``exporter.export_forward``, so
the graph is the same whichever transformers is installed), the way the exporter hands graphs to ``fuse_graph``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from torch import nn

from exporter.architectures import architecture_for
from exporter.export_forward import export_forward
from graphs import inspection
from graphs.core.errors import FusionError
from graphs.equivalence import sample_mask
from graphs.float16 import to_float16
from graphs.fusion import SUM_LAYER_NORM, FusionConfig, GraphPlan, fuse_graph
from tests.checkpoints import prune_heads

HIDDEN = 64
HEADS = 4
VOCAB = 100
MAX_POSITIONS = 160


@dataclass(frozen=True)
class Exported:
    """A torch model in eval mode, its ONNX export, and the plan compaction would hand to fusion."""

    model: nn.Module
    path: Path
    plan: GraphPlan
    input_names: tuple[str, ...]


class NoNorm(nn.Module):
    """nn_pruning's NoNorm: ``x * weight + bias``, no normalization."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(size))
        self.bias = nn.Parameter(0.1 * torch.randn(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _replace_layer_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm):
            setattr(module, name, NoNorm(child.normalized_shape[0]))
        else:
            _replace_layer_norms(child)


def _heads_left(pruned: dict[int, list[int]], layers: int) -> tuple[int, ...]:
    return tuple(HEADS - len(pruned.get(i, [])) for i in range(layers))


def _export(model: nn.Module, path: Path, input_names: tuple[str, ...]) -> None:
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    args = [ids, torch.ones_like(ids)]
    if "token_type_ids" in input_names:
        args.append(torch.zeros_like(ids))
    axes = {name: {0: "batch", 1: "sequence"} for name in (*input_names, "last_hidden_state")}
    with export_forward(model, architecture_for(model.config.model_type), "feature-extraction"):
        torch.onnx.export(
            model,
            tuple(args),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(input_names),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
        )


def _build(kind: str, directory: Path) -> Exported:
    torch.manual_seed(0)
    common = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        attn_implementation="eager",
    )
    names: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
    layer_norm, activation, arch = "layer_norm", "gelu", kind
    if kind in ("bert", "bert_nonorm", "bert_relu"):
        arch = "bert"
        act = "relu" if kind == "bert_relu" else "gelu"
        activation = act
        model = transformers.BertModel(
            transformers.BertConfig(num_hidden_layers=3, hidden_act=act, **common), add_pooling_layer=False
        )
        pruned = {0: [1], 1: [0, 2]}
        if kind == "bert_nonorm":
            _replace_layer_norms(model)
            layer_norm = "no_norm"
    elif kind == "roberta":
        model = transformers.RobertaModel(
            transformers.RobertaConfig(num_hidden_layers=2, pad_token_id=1, **common), add_pooling_layer=False
        )
        pruned, names = {0: [3]}, ("input_ids", "attention_mask")
    elif kind == "distilbert":
        model = transformers.DistilBertModel(
            transformers.DistilBertConfig(
                n_layers=2,
                dim=HIDDEN,
                n_heads=HEADS,
                hidden_dim=128,
                vocab_size=VOCAB,
                max_position_embeddings=MAX_POSITIONS,
                attn_implementation="eager",
            )
        )
        pruned, names = {1: [0, 3]}, ("input_ids", "attention_mask")
    else:
        raise ValueError(kind)
    prune_heads(model, pruned)
    layers = model.config.num_hidden_layers
    path = directory / f"{kind}.onnx"
    _export(model, path, names)
    plan = GraphPlan(_heads_left(pruned, layers), HIDDEN, arch, layer_norm=layer_norm, activation=activation,
                     attention_pass=architecture_for(arch).attention_pass(layer_norm))
    return Exported(model.eval(), path, plan, names)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    directory = tmp_path_factory.mktemp("exported")
    return {
        kind: _build(kind, directory)
        for kind in ("bert", "roberta", "distilbert", "bert_nonorm", "bert_relu")
    }


@pytest.fixture(scope="module")
def fused(exported: dict[str, Exported], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    directory = tmp_path_factory.mktemp("fused")
    results = {}
    for kind, item in exported.items():
        out = directory / f"{kind}_fused.onnx"
        results[kind] = (fuse_graph(item.path, out, item.plan), out)
    return results


def _inputs(names: tuple[str, ...], batch: int, seq: int, padding: tuple[str, ...], seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(3, VOCAB, size=(batch, seq)),
        "attention_mask": sample_mask(batch, seq, padding),
    }
    if "token_type_ids" in names:
        feeds["token_type_ids"] = rng.integers(0, 2, size=(batch, seq))
    return feeds


def _torch_output(model: nn.Module, feeds: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()


def _ort_output(path: Path, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["last_hidden_state"], feeds)[0]


def _max_diff_on_mask(expected: np.ndarray, actual: np.ndarray, mask: np.ndarray) -> float:
    keep = mask.astype(bool)
    return float(np.abs(expected[keep] - actual[keep]).max())


ALL_KINDS = ["bert", "roberta", "distilbert", "bert_nonorm", "bert_relu"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_each_layer_fuses_with_its_surviving_heads(fused: dict, exported: dict, kind: str) -> None:
    report, out = fused[kind]
    plan = exported[kind].plan
    graph = onnx.load(str(out))
    nodes = inspection.attention_nodes(graph)
    assert report.attention_fused and report.skip_reason is None
    assert [n.num_heads for n in nodes] == list(plan.heads_per_layer)
    assert len(set(plan.heads_per_layer)) > 1  # the test only means something with uneven heads
    assert all(n.head_size == HIDDEN // HEADS and n.input_hidden_size == HIDDEN for n in nodes)
    assert [layer.attention_heads for layer in report.layers] == list(plan.heads_per_layer)
    assert report.op_counts["Attention"] == len(plan.heads_per_layer)
    for layer in report.layers:
        assert layer.ops["Attention"] == 1
    # No unfused attention left behind: the Softmax went into the Attention op.
    assert "Softmax" not in inspection.op_counts(graph)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert report.to_dict()["layers"][0]["expected_heads"] == plan.heads_per_layer[0]


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "bert_relu"])
def test_residual_adds_feed_each_layer_norm_as_one_sum(fused: dict, exported: dict, kind: str) -> None:
    report, out = fused[kind]
    layers = len(exported[kind].plan.heads_per_layer)
    assert report.op_counts[SUM_LAYER_NORM] == 2 * layers
    assert report.op_counts["SkipLayerNormalization"] == 0
    assert all(layer.ops["LayerNormalization"] == 2 for layer in report.layers)
    assert report.expected[SUM_LAYER_NORM] == 2 * layers


def test_session_does_not_turn_sums_back_into_skip_layer_norm(fused: dict, tmp_path: Path) -> None:
    # onnxruntime's session-level SkipLayerNormFusion matches Add + LayerNormalization once shapes are
    # known (they are after EmbedLayerNormalization); its CPU kernel is the slow one (graphs.residual_sum).
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    ort.InferenceSession(str(fused["bert"][1]), options, providers=["CPUExecutionProvider"])
    ops = inspection.op_counts(onnx.load(options.optimized_model_filepath))
    assert ops.get("SkipLayerNormalization", 0) == 0
    assert ops["LayerNormalization"] == 6 and ops["EmbedLayerNormalization"] == 1


def test_skip_layer_norm_config_still_gives_skip_layer_norm(exported: dict, tmp_path: Path) -> None:
    item = exported["bert"]
    report = fuse_graph(item.path, tmp_path / "skip.onnx", item.plan, FusionConfig(enable_skip_layer_norm=True))
    assert report.op_counts["SkipLayerNormalization"] == 6 and report.op_counts[SUM_LAYER_NORM] == 0
    assert report.summary().startswith("fused: Attention 3/3, SkipLayerNorm 6/6")


def test_gelu_fuses_per_layer_and_summary_reads_as_counts(fused: dict) -> None:
    report, _ = fused["bert"]
    assert all(layer.ops.get("BiasGelu") == 1 for layer in report.layers)
    assert report.summary() == "fused: Attention 3/3, SumLayerNorm 6/6, BiasGelu 3/3, EmbedLayerNorm 1"
    relu, _ = fused["bert_relu"]
    assert relu.op_counts["BiasGelu"] == relu.op_counts["Gelu"] == 0
    assert relu.summary().startswith("fused: Attention 3/3, SumLayerNorm 6/6")
    assert fused["distilbert"][0].summary() == "fused: Attention 2/2, SumLayerNorm 4/4, BiasGelu 2/2"


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "bert_nonorm", "bert_relu"])
@pytest.mark.parametrize("padding", ["right", "left", "hole"])
def test_fused_graph_matches_torch(fused: dict, exported: dict, kind: str, padding: str) -> None:
    item = exported[kind]
    feeds = _inputs(item.input_names, batch=3, seq=16, padding=(padding,))
    expected = _torch_output(item.model, feeds)
    actual = _ort_output(fused[kind][1], feeds)
    assert _max_diff_on_mask(expected, actual, feeds["attention_mask"]) < 1e-4


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "bert_nonorm"])
def test_one_graph_serves_batch_1_to_8_and_seq_8_to_128(fused: dict, exported: dict, kind: str) -> None:
    item = exported[kind]
    session = ort.InferenceSession(str(fused[kind][1]), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 8), (3, 37), (8, 128)):
        feeds = _inputs(item.input_names, batch, seq, padding=("left", "right", "hole"), seed=batch)
        actual = session.run(["last_hidden_state"], feeds)[0]
        assert actual.shape == (batch, seq, HIDDEN)
        assert _max_diff_on_mask(_torch_output(item.model, feeds), actual, feeds["attention_mask"]) < 1e-4


def test_q_reshape_with_a_different_head_count_raises_with_a_table(exported: dict, tmp_path: Path) -> None:
    item = exported["bert"]
    model = onnx.load(str(item.path))
    graph = model.graph
    # Layer 1 keeps 2 heads of 16; make its Q Reshape claim 1 head of 32 (the weights are unchanged).
    by_output = {out: node for node in graph.node for out in node.output}
    reshape_q = next(n for n in graph.node if n.name == "/encoder/layer.1/attention/self/Reshape")
    concat = by_output[reshape_q.input[1]]
    heads_const, size_const = by_output[concat.input[2]], by_output[concat.input[3]]
    heads_const.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64)))
    size_const.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.array([32], dtype=np.int64)))
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    out = tmp_path / "out.onnx"
    with pytest.raises(FusionError) as caught:
        fuse_graph(edited, out, item.plan)
    message = str(caught.value)
    assert "layer | expected heads | found heads" in message
    assert "    1 |              2 |           1 |" in message
    assert "layer 1: 1 heads, expected 2" in message
    assert caught.value.exit_code == 4
    assert not out.exists()


def test_plan_that_disagrees_with_the_graph_raises(exported: dict, fused: dict, tmp_path: Path) -> None:
    item = exported["bert"]
    wrong = GraphPlan((3, 3, 4), HIDDEN, "bert")
    with pytest.raises(FusionError, match=r"layer 1: 2 heads, expected 3"):
        fuse_graph(item.path, tmp_path / "a.onnx", wrong)
    extra_layer = GraphPlan((*item.plan.heads_per_layer, 4), HIDDEN, "bert")
    with pytest.raises(FusionError, match=r"3 of 4 layers fused") as caught:
        fuse_graph(item.path, tmp_path / "b.onnx", extra_layer)
    assert "not fused" in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_zero_attention_on_a_kind_that_should_fuse_is_an_error(exported: dict, tmp_path: Path) -> None:
    item = exported["bert_nonorm"]
    claims_layer_norm = GraphPlan(item.plan.heads_per_layer, HIDDEN, "bert", layer_norm="layer_norm")
    with pytest.raises(FusionError, match=r"expected 3 fused Attention nodes .* found 0"):
        fuse_graph(item.path, tmp_path / "out.onnx", claims_layer_norm)


def test_mask_index_config_is_exact_for_right_padding_only(exported: dict, tmp_path: Path) -> None:
    item = exported["bert"]
    out = tmp_path / "mask_index.onnx"
    report = fuse_graph(item.path, out, item.plan, FusionConfig(use_raw_attention_mask=False))
    assert report.attention_fused
    right = _inputs(item.input_names, 3, 16, ("right",))
    left = _inputs(item.input_names, 3, 16, ("left",))
    assert (
        _max_diff_on_mask(_torch_output(item.model, right), _ort_output(out, right), right["attention_mask"])
        < 1e-4
    )
    # Why the raw mask is the default: MaskIndexEnd reads the mask as a length and attends to the pad tokens.
    assert (
        _max_diff_on_mask(_torch_output(item.model, left), _ort_output(out, left), left["attention_mask"])
        > 1e-3
    )


def test_graphs_package_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys, graphs.fusion, graphs.inspection, graphs.equivalence; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _nonorm_pairs(path: Path) -> int:
    """Elementwise Mul nodes reading a 1-D initializer (what a NoNorm costs in the graph)."""
    model = onnx.load(str(path))
    vectors = {init.name for init in model.graph.initializer if len(init.dims) == 1}
    return sum(1 for node in model.graph.node if node.op_type == "Mul" and any(i in vectors for i in node.input))


def test_nonorm_folds_into_weights_leaving_one_output_scale(fused: dict, exported: dict) -> None:
    report, path = fused["bert_nonorm"]
    layers = len(exported["bert_nonorm"].plan.heads_per_layer)
    assert _nonorm_pairs(exported["bert_nonorm"].path) == 2 * layers + 1
    assert _nonorm_pairs(path) == 1
    assert report.op_counts["NoNormFolded"] == report.expected["NoNormFolded"] == 2 * layers + 1
    assert "NoNormFolded 7/7" in report.summary()


def test_nonorm_fold_leaves_no_unread_initializer(fused: dict) -> None:
    """onnxruntime warned once per stale LayerNorm weight/bias (about 50 console lines per NoNorm export)."""
    _, path = fused["bert_nonorm"]
    model = onnx.load(str(path))
    read = {name for node in model.graph.node for name in node.input}
    assert [i.name for i in model.graph.initializer if i.name not in read] == []


def test_nonorm_fold_off_keeps_every_nonorm(exported: dict, tmp_path: Path) -> None:
    item = exported["bert_nonorm"]
    report = fuse_graph(item.path, tmp_path / "kept.onnx", item.plan, FusionConfig(fold_nonorm=False))
    assert _nonorm_pairs(tmp_path / "kept.onnx") == 7
    assert report.op_counts["NoNormFolded"] == 0


def test_nonorm_with_a_zero_channel_stops_folding_there_and_stays_exact(exported: dict, tmp_path: Path) -> None:
    item = exported["bert_nonorm"]
    model = copy.deepcopy(item.model)
    with torch.no_grad():
        model.encoder.layer[1].attention.output.LayerNorm.weight[5] = 0.0  # the 4th NoNorm of 7
    path = tmp_path / "zero.onnx"
    _export(model, path, item.input_names)
    out = tmp_path / "zero_fused.onnx"
    report = fuse_graph(path, out, item.plan)
    assert report.op_counts["NoNormFolded"] == 4  # embeddings, layer 0 (two), layer 1 attention; then stops
    assert _nonorm_pairs(out) == 1 + 3  # the output scale of the folded part, and the three left as they were
    feeds = _inputs(item.input_names, batch=3, seq=16, padding=("left", "hole"))
    diff = _max_diff_on_mask(_torch_output(model, feeds), _ort_output(out, feeds), feeds["attention_mask"])
    assert diff < 1e-4


@pytest.mark.parametrize("padding", ["right", "left", "hole"])
def test_relu_gemm_form_is_exact_and_onnxruntime_runs_it_as_fused_gemm(
    exported: dict, tmp_path: Path, padding: str
) -> None:
    item = exported["bert_relu"]
    out = tmp_path / "relu_gemm.onnx"
    report = fuse_graph(item.path, out, item.plan, FusionConfig(relu_gemm=True))
    layers = len(item.plan.heads_per_layer)
    assert report.op_counts["ReluGemm"] == layers and f"ReluGemm {layers}/{layers}" in report.summary()
    assert sum(node.op_type == "Gemm" for node in onnx.load(str(out)).graph.node) == layers
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    session_ops = [node.op_type for node in onnx.load(str(tmp_path / "session.onnx")).graph.node]
    assert session_ops.count("FusedGemm") == layers and "Relu" not in session_ops
    for batch, seq in ((1, 8), (3, 16)):
        feeds = _inputs(item.input_names, batch, seq, padding=(padding,))
        diff = _max_diff_on_mask(_torch_output(item.model, feeds), _ort_output(out, feeds), feeds["attention_mask"])
        assert diff < 1e-4


def test_relu_gemm_leaves_gelu_models_alone(exported: dict, tmp_path: Path) -> None:
    item = exported["bert"]
    report = fuse_graph(item.path, tmp_path / "gelu.onnx", item.plan, FusionConfig(relu_gemm=True))
    assert "ReluGemm" not in report.op_counts


@pytest.mark.parametrize("kind", ["bert", "distilbert", "bert_nonorm"])
def test_float16_variant_keeps_float32_io_and_close_numbers(fused: dict, exported: dict, kind: str,
                                                           tmp_path: Path) -> None:
    item = exported[kind]
    out = tmp_path / "fp16.onnx"
    report = to_float16(fused[kind][1], out)
    model = onnx.load(str(out))
    assert report.float16_initializers > 0 and report.casts >= 1
    assert {v.type.tensor_type.elem_type for v in model.graph.output} == {onnx.TensorProto.FLOAT}
    assert out.stat().st_size < 0.6 * fused[kind][1].stat().st_size
    feeds = _inputs(item.input_names, batch=3, seq=16, padding=("left", "hole"))
    expected, actual = _ort_output(fused[kind][1], feeds), _ort_output(out, feeds)
    keep = feeds["attention_mask"].astype(bool)
    a, b = expected[keep].astype(np.float64), actual[keep].astype(np.float64)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() > 0.999 and 0 < np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_nonorm_fold_stops_where_a_branch_output_has_another_reader(exported: dict, tmp_path: Path) -> None:
    """The branch output is divided by D when folded: a second reader (here a graph output) must stop the fold."""
    item = exported["bert_nonorm"]
    model = onnx.load(str(item.path))
    branch = "/encoder/layer.1/attention/output/dense/Add_output_0"
    assert any(branch in node.output for node in model.graph.node)
    model.graph.output.append(onnx.helper.make_tensor_value_info(branch, onnx.TensorProto.FLOAT, None))
    path = tmp_path / "tapped.onnx"
    onnx.save(model, str(path))
    report = fuse_graph(path, tmp_path / "tapped_fused.onnx", item.plan)  # its numeric check covers the tap too
    assert report.op_counts["NoNormFolded"] == 3  # embeddings and layer 0; stops before layer 1's attention block
    feeds = _inputs(item.input_names, batch=2, seq=16, padding=("hole",))
    session = ort.InferenceSession(str(tmp_path / "tapped_fused.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run([branch], feeds)[0], reference.run([branch], feeds)[0], atol=1e-4)

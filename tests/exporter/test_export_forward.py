"""The project's export forward: the exported graph does not depend on the installed transformers' forward code.

Tiny seeded BERT, RoBERTa and DistilBERT models are built in memory (so the same tests run on transformers 4.57
and 5.x), heads removed unevenly with the tests' own ``prune_heads`` and one more removed by compaction (a dead
head: zero value rows, non-zero value bias, folded), then exported with ``export_onnx`` and fused with
``fuse_graph``. Expected head counts come from the pruning plan, not from the model. Every ONNX file is compared
with the PyTorch model (its own forward, not the export forward) on right-, left- and hole-padded batches of
another batch size and sequence length than the traced ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from torch import nn

from exporter.architectures import TASK_OUTPUTS, architecture_for
from exporter.compaction import compact_model
from exporter.export_forward import export_forward, layer_heads
from exporter.onnx_export import export_onnx
from graphs import inspection
from graphs.core.errors import ExportError
from graphs.equivalence import sample_mask
from graphs.fusion import GraphPlan, fuse_graph
from tests.checkpoints import NUM_LABELS, TASK_CLASSES, prune_heads

HIDDEN, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 64, 4, 3, 96, 120, 80
PRUNED = {0: [1], 1: [0, 2]}  # physically removed before export, original indices
DEAD = (2, 3)  # (layer, original head): value rows zeroed, removed by compaction
EXPECTED_HEADS = (3, 2, 3)
TOLERANCE = 1e-4


class _NoNorm(nn.Module):
    """nn_pruning's NoNorm, ``x * weight + bias``, with weights away from (1, 0) so it differs from LayerNorm."""

    def __init__(self, size: int, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(size, generator=gen))
        self.bias = nn.Parameter(0.2 * torch.randn(size, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _config(architecture: str, task: str, act: str) -> transformers.PretrainedConfig:
    labels = {"num_labels": NUM_LABELS[task]} if task in NUM_LABELS else {}
    if architecture == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=VOCAB, max_position_embeddings=POSITIONS, n_layers=LAYERS, dim=HIDDEN, n_heads=HEADS,
            hidden_dim=FFN, activation=act, attn_implementation="eager", **labels,
        )
    config_class = transformers.RobertaConfig if architecture == "roberta" else transformers.BertConfig
    extra = {"pad_token_id": 1, "type_vocab_size": 1} if architecture == "roberta" else {}
    return config_class(
        vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_hidden_layers=LAYERS, hidden_size=HIDDEN,
        num_attention_heads=HEADS, intermediate_size=FFN, hidden_act=act, attn_implementation="eager",
        **labels, **extra,
    )


def _build(architecture: str, task: str, layer_norm: str, seed: int = 0) -> nn.Module:
    """A seeded model as the pipeline hands it to export: heads pruned (uneven), NoNorm swapped in, compacted."""
    act = "relu" if layer_norm == "no_norm" else "gelu"
    kwargs = {"add_pooling_layer": False} if task == "feature-extraction" and architecture != "distilbert" else {}
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, TASK_CLASSES[architecture][task])(_config(architecture, task, act), **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():  # clearly non-trivial values, biases included
            param.copy_(0.08 * torch.randn(param.shape, generator=gen) + (1.0 if name.endswith("LayerNorm.weight")
                                                                             or name.endswith("layer_norm.weight")
                                                                             else 0.0))
    prune_heads(model, PRUNED)
    if layer_norm == "no_norm":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(parent, name, _NoNorm(child.normalized_shape[0], gen))
    arch = architecture_for(architecture)
    layer, head = DEAD
    view = arch.layers(model)[layer]
    stored = head - sum(1 for h in PRUNED.get(layer, []) if h < head)
    size = HIDDEN // HEADS
    with torch.no_grad():
        view.value.weight[stored * size : (stored + 1) * size] = 0.0
    model.eval()
    compact_model(model, arch, model.config)
    return model


def _feeds(architecture: str, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(3, VOCAB, size=(batch, seq)),
        "attention_mask": sample_mask(batch, seq, ("right", "left", "hole")),
    }
    if architecture == "bert":
        feeds["token_type_ids"] = rng.integers(0, 2, size=(batch, seq))
    return feeds


def _torch(model: nn.Module, task: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
    return [outputs[name].numpy() for name in TASK_OUTPUTS[task]]


def _onnx(path: Path, task: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(TASK_OUTPUTS[task]), feeds)


CASES = [(arch, "feature-extraction", norm) for arch in ("bert", "roberta", "distilbert")
         for norm in ("layer_norm", "no_norm")]
CASES += [(arch, task, "layer_norm") for arch in ("bert", "roberta", "distilbert")
          for task in ("text-classification", "question-answering", "token-classification")]


@pytest.mark.slow
@pytest.mark.parametrize(("architecture", "task", "layer_norm"), CASES)
def test_export_fuses_per_layer_heads_and_matches_torch(
    tmp_path: Path, architecture: str, task: str, layer_norm: str
) -> None:
    model = _build(architecture, task, layer_norm)
    arch = architecture_for(architecture)
    assert layer_heads(model, arch) == EXPECTED_HEADS
    export_onnx(model, arch, task, tmp_path / "model.onnx")
    plan = GraphPlan(EXPECTED_HEADS, HIDDEN, architecture, layer_norm=layer_norm,
                     activation="relu" if layer_norm == "no_norm" else "gelu",
                     attention_pass=architecture_for(architecture).attention_pass(layer_norm))
    report = fuse_graph(tmp_path / "model.onnx", tmp_path / "model_optimized.onnx", plan)
    fused = onnx.load(str(tmp_path / "model_optimized.onnx"))
    nodes = inspection.attention_nodes(fused)
    assert [node.num_heads for node in nodes] == list(EXPECTED_HEADS)
    assert inspection.op_counts(fused).get("Attention") == LAYERS and "Softmax" not in inspection.op_counts(fused)
    assert [layer.ops.get("Attention") for layer in report.layers] == [1] * LAYERS
    if layer_norm == "layer_norm" and architecture == "bert":  # as on 4.57: RoBERTa's and DistilBERT's do not fuse
        assert report.op_counts.get("EmbedLayerNormalization") == 1
    for batch, seq, seed in ((4, 16, 1), (2, 37, 2)):
        feeds = _feeds(architecture, batch, seq, seed)
        expected = _torch(model, task, feeds)
        for path in (tmp_path / "model.onnx", tmp_path / "model_optimized.onnx"):
            for name, want, got in zip(TASK_OUTPUTS[task], expected, _onnx(path, task, feeds), strict=True):
                assert got.shape == want.shape
                diff = float(np.abs(want - got).max())
                assert diff < TOLERANCE, f"{path.name} {name} differs from torch by {diff:.3g} (batch {batch}, seq {seq})"


def _transformers_classes(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if type(m).__module__.startswith("transformers.")}


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["bert", "roberta", "distilbert"])
def test_trace_runs_none_of_transformers_forward_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, architecture: str
) -> None:
    task = "question-answering"
    model = _build(architecture, task, "layer_norm")
    traced: list[str] = []
    for cls in _transformers_classes(model):
        original = cls.forward

        def spy(self: nn.Module, *args: object, _original: object = original, **kwargs: object) -> object:
            if torch.jit.is_tracing():
                traced.append(type(self).__name__)
            return _original(self, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(cls, "forward", spy)
    export_onnx(model, architecture_for(architecture), task, tmp_path / "model.onnx")
    assert len(_transformers_classes(model)) >= 5  # the spies were on the model's real classes
    assert traced == []


@pytest.mark.slow
def test_model_is_restored_after_export_and_after_a_failed_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build("bert", "text-classification", "layer_norm")
    feeds = _feeds("bert", 3, 12, 5)
    before = _torch(model, "text-classification", feeds)
    arch = architecture_for("bert")
    export_onnx(model, arch, "text-classification", tmp_path / "model.onnx")
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    np.testing.assert_array_equal(_torch(model, "text-classification", feeds)[0], before[0])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, arch, "text-classification", tmp_path / "again.onnx")
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    np.testing.assert_array_equal(_torch(model, "text-classification", feeds)[0], before[0])


def test_export_forward_returns_the_task_outputs_and_restores_on_exit() -> None:
    model = _build("distilbert", "question-answering", "layer_norm")
    arch = architecture_for("distilbert")
    feeds = {k: torch.from_numpy(v) for k, v in _feeds("distilbert", 3, 10, 3).items()}
    with torch.no_grad():
        own = model(**feeds, return_dict=True)
        with export_forward(model, arch, "question-answering") as patched:
            start, end = patched(**feeds)
            assert "forward" in model.distilbert.transformer.layer[1].attention.__dict__
        assert "forward" not in model.distilbert.transformer.layer[1].attention.__dict__
    assert float((start - own.start_logits).abs().max()) < 1e-5
    assert float((end - own.end_logits).abs().max()) < 1e-5


def test_a_model_the_export_forward_does_not_describe_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build("bert", "feature-extraction", "layer_norm")
    intermediate = type(model.encoder.layer[0].intermediate)
    original = intermediate.forward
    # A transformers whose feed-forward computes something else than the one the export forward writes.
    monkeypatch.setattr(intermediate, "forward", lambda self, x: original(self, x) + 0.5)
    with pytest.raises(ExportError, match="differs from BertModel's own forward"):
        export_onnx(model, architecture_for("bert"), "feature-extraction", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_relative_positions_and_inconsistent_widths_are_refused() -> None:
    model = _build("roberta", "feature-extraction", "layer_norm")
    arch = architecture_for("roberta")
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(ExportError, match="only absolute positions"), export_forward(model, arch, "feature-extraction"):
        pass
    model.config.position_embedding_type = "absolute"
    view = arch.layers(model)[1]
    view.replace("key", nn.Linear(HIDDEN, view.key.out_features - 1))
    with pytest.raises(ExportError, match="layer 1: Q/K/V/O widths"):
        layer_heads(model, arch)

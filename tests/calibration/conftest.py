"""Shared fixtures: a tiny seeded BERT exported in the test, and a deterministic stand-in tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
SEQ = 16
VOCAB = 200


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    """A deterministic stand-in for a tokenizer: word ids by character sum, right padding to SEQ."""
    ids = np.zeros((len(texts), SEQ), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, text in enumerate(texts):
        words = [101] + [2 + sum(map(ord, word)) % (VOCAB - 2) for word in text.split()][: SEQ - 2] + [102]
        ids[row, : len(words)] = [w % VOCAB for w in words]
        mask[row, : len(words)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def export_tiny_bert(path: Path, initializer_range: float = 0.02) -> Path:
    """A seeded 2-layer BERT (hidden 64, 4 heads, FFN 128) exported by exporter.onnx_export, opset 17.

    A larger ``initializer_range`` makes the layers matter against the embedding residual, so INT8 error
    shows in the output (at the default 0.02 the output is almost the embeddings and INT8 is near exact).
    """
    from exporter.architectures import architecture_for
    from exporter.onnx_export import export_onnx

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        initializer_range=initializer_range,
        attn_implementation="eager",
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    # The project's export (its own forward, a constant head count per layer): the graph the pipeline
    # quantizes, on transformers 4.57 and 5.x alike.
    export_onnx(model, architecture_for("bert"), "feature-extraction", path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_bert(tmp_path_factory.mktemp("tiny") / "model.onnx")


@pytest.fixture(scope="session")
def sensitive_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with weights large enough (initializer range 0.3) that INT8 error reaches the output."""
    return export_tiny_bert(tmp_path_factory.mktemp("sensitive") / "model.onnx", initializer_range=0.3)

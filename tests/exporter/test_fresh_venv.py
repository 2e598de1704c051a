"""The deployment side in a fresh venv: only onnxruntime, numpy and tokenizers, and the project installed with
``pip install --no-deps`` (the README's torch-free install), against an artifact built here.

Issue 14's first must-show, as a deployment machine would meet it: ``import torch`` fails there, ``verify``
passes and exits 3 after one byte of a model file changes, and ``run`` gives the MiniLM artifact's sentence
embeddings within cosine 0.9999 (FP32 files) of sentence-transformers' own encode (of the torch computation of
it where sentence-transformers is not installed) and the INT8 file's within 0.99.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from graphs.core.telemetry import child_env

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "The committee postponed its decision on the new bridge until the spring.",
    "A warm front will bring rain to the northern valleys by Thursday evening.",
    "She tuned the old piano herself, one string at a time, over a whole weekend.",
    "Short one.",
    "Researchers found that the enzyme works best at slightly acidic pH, the paper said.",
]


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding onnxruntime, numpy and tokenizers (the versions this test process runs, with what they
    need) and the project from a copy of its source, installed with --no-deps."""
    root = tmp_path_factory.mktemp("deploy")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pins = [f"{name}=={version(name)}" for name in ("onnxruntime", "numpy", "tokenizers", "cryptography")]
    done = subprocess.run([*pip, *pins], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"installing {pins} failed: {done.stderr[-1500:]}"
    source = root / "source"  # a copy, so the build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("exporter", "graphs", "calibration"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([*pip, "--no-deps", str(source)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-1500:]
    return venv


def _in(venv: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=600,
                          cwd=venv.parent, env=child_env({"PATH": f"{venv / 'bin'}:/usr/bin:/bin",
                                                          "HOME": str(venv.parent)}))


def _reference(texts: list[str]) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer

        from tests.checkpoints import minilm_path

        return SentenceTransformer(str(minilm_path()), device="cpu", local_files_only=True).encode(texts)
    except ImportError:  # the compatibility stack: the same computation written out in torch
        from tests.exporter.test_runtime import _torch_sentence_embeddings

        return _torch_sentence_embeddings(texts, normalize=True)


@pytest.mark.slow
def test_verify_and_run_in_a_venv_without_torch(deploy_venv: Path, tmp_path: Path) -> None:
    from exporter.cli import main

    assert _in(deploy_venv, "python", "-c", "import torch").returncode != 0
    assert _in(deploy_venv, "python", "-c", "import transformers").returncode != 0
    artifact = tmp_path / "minilm"
    assert main(["--output", str(artifact), "--calibration-samples", "32"]) == 0

    done = _in(deploy_venv, "export-model", "verify", str(artifact))
    # one pass row per file onnxruntime checked at export (model_qdq.onnx too where the exporting venv had openvino);
    # this venv has no openvino: its one skip row says so
    manifest = json.loads((artifact / "manifest.json").read_text())
    files = sum(e["provider"] == "CPUExecutionProvider" for e in manifest["parity"])
    assert done.returncode == 0 and done.stdout.count(" pass ") == files, done.stdout + done.stderr[-2000:]
    assert "openvino is not installed" in done.stdout

    texts = [*TEXTS, " ".join(TEXTS * 8)]  # the last one is longer than max_seq_length 256
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    want = _reference(texts)
    for file, bar in (("model.onnx", 0.9999), ("model_optimized.onnx", 0.9999), ("model_quantized.onnx", 0.99)):
        done = _in(deploy_venv, "export-model", "run", str(artifact), "--input", str(rows), "--file", file)
        assert done.returncode == 0, done.stderr[-2000:]
        got = np.array([json.loads(line)["embedding"] for line in done.stdout.splitlines()])
        cosines = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert got.shape == want.shape and cosines.min() >= bar, (file, cosines)

    from tests.checkpoints import changed_copy

    copy = changed_copy(artifact, tmp_path / "changed", "model.onnx", at=1 / 3)
    done = _in(deploy_venv, "export-model", "verify", str(copy))
    assert done.returncode == 3 and "model.onnx: sha256 differs" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_signed_verify_in_a_venv_without_torch(deploy_venv: Path, tmp_path: Path) -> None:
    """Signed at export, checked on the deployment venv with the public key: passes; one changed byte in any
    file, or a manifest re-written with fresh hashes, is exit 3 naming what failed; unsigned fails
    --require-signature."""
    import hashlib

    from exporter.cli import main
    from tests.checkpoints import changed_copy
    from tests.exporter.test_loading import tiny_bert
    from tests.exporter.test_signing import write_key_pair

    private, public = write_key_pair(tmp_path / "keys")
    artifact = tmp_path / "signed"
    assert main(["--model", str(tiny_bert(tmp_path / "ckpt", max_position_embeddings=64)), "--output",
                 str(artifact), "--calibration-samples", "8", "--sign-key", str(private), "--latency", "off"]) == 0
    key = ["--public-key", str(public), "--require-signature"]
    done = _in(deploy_venv, "export-model", "verify", str(artifact), *key)
    assert done.returncode == 0 and "trust: signature by key" in done.stdout, done.stdout + done.stderr[-2000:]
    names = sorted(json.loads((artifact / "manifest.json").read_text())["files"])
    for index, name in enumerate([*names, "manifest.json"]):
        copy = changed_copy(artifact, tmp_path / f"changed{index}", name)
        done = _in(deploy_venv, "export-model", "verify", str(copy), *key)
        expected = "the signature does not match" if name == "manifest.json" else f"{name}:"
        assert done.returncode == 3 and expected in done.stderr, (name, done.stderr[-2000:])
    copy = changed_copy(artifact, tmp_path / "rehashed", "model.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    data = (copy / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    done = _in(deploy_venv, "export-model", "verify", str(copy), *key)
    assert done.returncode == 3 and "the signature does not match" in done.stderr, done.stderr[-2000:]
    unsigned = shutil.copytree(artifact, tmp_path / "unsigned")
    (unsigned / "manifest.sig").unlink()
    done = _in(deploy_venv, "export-model", "verify", str(unsigned), *key)
    assert done.returncode == 3 and "it is not signed" in done.stderr, done.stderr[-2000:]

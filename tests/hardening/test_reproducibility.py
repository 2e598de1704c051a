"""The same checkpoint, options and seed give byte-identical model files, in another process too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exporter.cli import main

MODEL_FILES = ("model.onnx", "model_optimized.onnx", "model_quantized.onnx")
# The second run in a fresh interpreter with another hash seed (set and dict-of-str orders change) and
# without the latency stage, which only measures.
_SECOND_RUN = (
    "import sys; from exporter.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(scope="module")
def two_manifests(base_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("repro")
    argv = ["--model", str(base_checkpoint), "--calibration-samples", "8", "--seed", "3", "--latency", "off"]
    assert main([*argv, "--output", str(root / "first")]) == 0
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    second = subprocess.run([sys.executable, "-c", _SECOND_RUN, *argv, "--output", str(root / "second")],
                            env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    return tuple(json.loads((root / name / "manifest.json").read_text()) for name in ("first", "second"))


def test_model_files_are_byte_identical(two_manifests: tuple[dict, dict]) -> None:
    first, second = two_manifests
    for name in MODEL_FILES:
        assert first["files"][name]["sha256"] == second["files"][name]["sha256"], name
    assert first["quantization"]["sample_sha256"] == second["quantization"]["sample_sha256"]
    assert first["source"]["sha256"] == second["source"]["sha256"]


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{path}{key}.")]
    return [] if a == b else [path.rstrip(".")]


def test_everything_that_differs_is_declared_varying(two_manifests: tuple[dict, dict]) -> None:
    first, second = two_manifests
    declared = tuple(first["varying_fields"])
    undeclared = [d for d in _differences(first, second) if not d.startswith(declared)]
    assert undeclared == []

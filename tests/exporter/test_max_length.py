"""`--max-length`: parity also runs a batch at the length the model is served at, and says so per shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("maxlen") / "ck", "bert", "feature-extraction").path


def test_parity_runs_a_batch_at_the_max_length(checkpoint: Path, tmp_path: Path) -> None:
    from exporter.cli import main

    out = tmp_path / "art"
    assert main(["--model", str(checkpoint), "--output", str(out), "--calibration-samples", "16",
                 "--max-length", "200"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["max_length"] == 200
    # calibration spans the lengths up to it: the texts at 128 tokens, then 16 joined rows of 200
    short, long = manifest["quantization"]["calibration_rows"]
    assert (short["texts"], short["tokens"]) == (16, 128)
    assert long["tokens"] == 200 and 1 <= long["texts"] <= 16
    assert manifest["parity_data"]["shapes"] == [[1, 16], [4, 64], [8, 128], [2, 200]]  # as run: joined texts
    for entry in (e for e in manifest["parity"] if e["status"] != "skip"):
        assert [s["shape"] for s in entry["per_shape"]] == manifest["parity_data"]["shapes"]
        assert max(s["max_abs_error"] for s in entry["per_shape"]) == pytest.approx(entry["max_abs_error"])
    assert "| 2x200 |" in (out / "report.md").read_text()
    latency = manifest["latency"]["CPUExecutionProvider"]
    assert latency["shapes"] == ["b1xs128", "b8xs128", "b1xs200"]  # a latency row at the max length too
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "verify", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_max_length_past_the_model_is_exit_2_with_nothing_written(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(checkpoint), "--output", str(out),
                           "--max-length", "4096"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 2 and "--max-length 4096 is longer than this model takes" in done.stderr, done.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(checkpoint), "--output", str(out),
                           "--max-length", "3"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 2 and "from 16 to 8192" in done.stderr

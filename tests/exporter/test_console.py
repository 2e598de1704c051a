"""The console of an export: one line per stage and the three closing lines when output is not a terminal (no
third-party warnings, no bars); progress bars for the long stages on a terminal (a pseudo-terminal here)."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nonorm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The NoNorm + ReLU BERT: the checkpoint whose fold used to flood onnxruntime warnings (issue 15)."""
    from tests.checkpoints import nonorm_relu_bert

    return nonorm_relu_bert(tmp_path_factory.mktemp("console") / "ck").path


def _argv(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "exporter.cli", "--model", str(model), "--output", str(out),
            "--calibration-samples", "16"]


def test_a_piped_export_prints_only_its_stage_lines(nonorm: Path, tmp_path: Path) -> None:
    done = subprocess.run(_argv(nonorm, tmp_path / "art"), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = done.stderr.splitlines()
    assert [re.match(r"\[(\d)/8\] (\w+)", line).group(2) for line in stages] == [  # type: ignore[union-attr]
        "load", "compact", "export", "fuse", "quantize", "parity", "latency", "package"], done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["artifact", "manifest", "parity", "total wall time"]


def test_a_terminal_sees_progress_bars(nonorm: Path, tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    process = subprocess.Popen(_argv(nonorm, tmp_path / "art"), stdin=subprocess.DEVNULL, stdout=secondary,
                               stderr=secondary, cwd=REPO, env={**os.environ, "COLUMNS": "120"})
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=60)
    os.close(primary)
    text = seen.decode("utf-8", "replace")
    assert process.returncode == 0, text[-2000:]
    assert "calibrating" in text and "latency on CPU" in text, text[-3000:]
    assert re.search(r"\d+/\d+ \[", text), "no tqdm counter drawn"
    assert "total wall time" in text and "Removing initializer" not in text

"""SIGINT and SIGTERM delivered to a real `export-model` process in the middle of a stage.

Each must end the run with exit code 130, one line on stderr, nothing at the output and no `.<name>.partial-*`
work folder; a second run on the same paths must then succeed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.cli import main
from tests.hardening.conftest import partial_siblings

EXPORT_MODEL = Path(sys.executable).parent / "export-model"


def _interrupt_during(checkpoint: Path, output: Path, after_line: str, signum: int) -> tuple[int, str]:
    """Start export-model, wait for the progress line `after_line`, deliver `signum`; (exit code, stderr)."""
    process = subprocess.Popen(
        [str(EXPORT_MODEL), "--model", str(checkpoint), "--output", str(output), "--calibration-samples", "8"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A suite started in the background of a non-interactive shell inherits SIGINT ignored, and so would the
        # child: give it the default disposition a terminal's Ctrl-C meets, so the case tests export-model itself.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if line.startswith(after_line):
                # The next stage is running now: its work folder exists and holds the stages done so far.
                assert partial_siblings(output), "no work folder while a stage runs"
                process.send_signal(signum)
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail(f"export-model ended before {after_line!r}:\n{''.join(seen)}")
        rest = process.stderr.read()
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, "".join(seen) + rest


@pytest.mark.skipif(not EXPORT_MODEL.is_file(), reason="the export-model console script is not installed")
@pytest.mark.parametrize(
    ("signum", "after_line"),
    # export takes ~0.1 s on this model, so SIGINT lands in export or fuse; latency takes ~10 s.
    [(signal.SIGINT, "[2/8] compact"), (signal.SIGTERM, "[6/8] parity")],
    ids=["SIGINT-during-export", "SIGTERM-during-latency"],
)
def test_interrupt_leaves_nothing_and_a_second_run_succeeds(
    checkpoint: Path, tmp_path: Path, signum: int, after_line: str, no_latency: None
) -> None:
    output = tmp_path / "out"
    code, err = _interrupt_during(checkpoint, output, after_line, signum)
    assert code == 130, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("export-model:")]
    assert errors == ["export-model: interrupted; no output was written"], err
    assert "[8/8] package" not in err  # the signal landed inside a stage, before the artifact was complete
    assert not output.exists()
    assert partial_siblings(output) == []
    assert main(["--model", str(checkpoint), "--output", str(output), "--calibration-samples", "8"]) == 0
    assert (output / "manifest.json").is_file() and partial_siblings(output) == []

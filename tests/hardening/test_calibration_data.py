"""Calibration files as people have them; each bad one is refused before any export work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hardening.conftest import assert_refused, run_cli


def _run(checkpoint: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str):  # noqa: ANN202
    argv = ["--model", str(checkpoint), "--calibration-data", str(data), "--calibration-samples", "8", *extra]
    return run_cli(argv, tmp_path / "out", capsys)


@pytest.mark.parametrize("content", ["", "\n\n   \n"], ids=["empty", "blank-lines"])
def test_empty_file(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                    content: str) -> None:
    import exporter.pipeline

    def too_late(*args: object, **kwargs: object) -> None:
        raise AssertionError("bad calibration data must be refused before the checkpoint is loaded")

    monkeypatch.setattr(exporter.pipeline, "load_checkpoint", too_late)
    data = tmp_path / "texts.txt"
    data.write_text(content)
    assert_refused(_run(checkpoint, data, tmp_path, capsys), "holds no texts", "add at least one non-blank line")


def test_fewer_samples_than_asked(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "texts.txt"
    data.write_text("one sentence.\nanother sentence.\na third.\n")
    run = _run(checkpoint, data, tmp_path, capsys)
    assert_refused(run, "holds 3 texts; 8 were asked for", "--calibration-samples at most that")


def test_undecodable_bytes(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "texts.txt"
    data.write_bytes(b"fine text\n" * 4 + b"caf\xe9 in latin-1\n" + b"more\n" * 4)
    run = _run(checkpoint, data, tmp_path, capsys)
    assert_refused(run, "line 5: not UTF-8", "re-encode the file as UTF-8")


def test_jsonl_line_without_the_field(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "texts.jsonl"
    lines = [{"text": f"sentence {i}"} for i in range(9)]
    lines[6] = {"body": "the field is misnamed"}
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = _run(checkpoint, data, tmp_path, capsys)
    assert_refused(run, "line 7: expected an object with field 'text', found ['body']", "--calibration-field")


def test_texts_longer_than_the_model_maximum_are_truncated(checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture, no_latency: None) -> None:
    """The checkpoint takes 64 positions; each text is about 3,000 tokens. This must work, not fail."""
    data = tmp_path / "long.txt"
    data.write_text("".join(f"text {i}: " + "the quick brown fox jumps over the lazy dog " * 330 + "\n"
                            for i in range(8)))
    run = _run(checkpoint, data, tmp_path, capsys)
    assert run.code == 0, run.err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["quantization"]["samples"] == 8
    assert {e["status"] for e in manifest["parity"] if e["provider"] == "CPUExecutionProvider"} == {"pass"}

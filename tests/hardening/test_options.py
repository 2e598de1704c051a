"""Options: an unknown task, a task the checkpoint's head does not fit, values and flags that contradict."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening.conftest import assert_refused, run_cli


def test_unknown_task(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_cli(["--model", str(checkpoint), "--task", "summarization"], tmp_path / "out", capsys)
    assert_refused(run, "invalid choice: 'summarization'", "choose from 'feature-extraction'", "--help")


def test_task_the_checkpoint_head_does_not_fit(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A bare encoder has no qa_outputs: exporting it for QA would ship a randomly initialised head.
    run = run_cli(["--model", str(checkpoint), "--task", "question-answering"], tmp_path / "out", capsys)
    assert_refused(run, "lacks 2 weights that task 'question-answering' needs", "qa_outputs",
                   "pass the --task its head was trained for")


@pytest.mark.parametrize(
    ("flags", "phrases"),
    [
        (["--calibration-field", "body"], ("has no effect without --calibration-data", "drop --calibration-field")),
        (["--calibration-field", "body", "--calibration-data", "{data}"], ("does not apply to", "a .txt file holds")),
        (["--calibration-samples", "0"], ("--calibration-samples 0", "samples must be positive")),
        (["--calibration-samples", "many"], ("--calibration-samples: invalid int value",)),
        (["--drop-heads", "0:7"], ("head 7 of layer 0", "present: [0, 1]")),
    ],
    ids=["field-without-data", "field-with-txt", "zero-samples", "samples-not-a-number", "drop-absent-head"],
)
def test_flags_that_conflict_or_cannot_hold(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            flags: list[str], phrases: tuple[str, ...]) -> None:
    data = tmp_path / "texts.txt"
    data.write_text("a text\n" * 20)
    argv = ["--model", str(checkpoint), *(f.format(data=data) for f in flags)]
    assert_refused(run_cli(argv, tmp_path / "out", capsys), *phrases)


def test_config_file_with_an_invalid_value(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    options = tmp_path / "options.json"
    options.write_text('{"quantization": {"method": "magic"}}')
    run = run_cli(["--model", str(checkpoint), "--config", str(options)], tmp_path / "out", capsys)
    assert_refused(run, f"--config {options}", "method 'magic'")


def test_traceback_only_with_debug(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (checkpoint / "config.json").write_text("{broken")
    run = run_cli(["--model", str(checkpoint), "--debug"], tmp_path / "out", capsys)
    assert run.code == 2 and "Traceback" in run.err and "export-model: error: " in run.err

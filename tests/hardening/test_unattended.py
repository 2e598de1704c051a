"""Issue 17: safe to run unattended. A mistyped --output, --force, memory and time bombs, killed and concurrent runs.

Findings covered here: 2 (--force replaces only an earlier artifact), 3 and 4 in part (reads that are bounded and
never block), 6 (work folders of killed runs swept, temporary files inside the work folder), 7 (tolerances that
cannot fail are usage errors), 9 (a lock on --output). The memory bombs run the real CLI in a child process under an
address-space limit (RLIMIT_AS) and a wall-clock limit; the child's peak resident memory is read from wait4.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from calibration.data import MAX_TEXT_CHARS, TXT_LINE_BYTES, load_texts
from exporter.cli import main
from exporter.text import CHARS_PER_POSITION, make_tokenize
from tests.hardening.conftest import assert_refused, partial_siblings, run_cli

EXPORT_MODEL = Path(sys.executable).parent / "export-model"
ADDRESS_SPACE = 6 << 30  # RLIMIT_AS of a bomb's child: it fails instead of taking the machine
RSS_BOUND = 1 << 30  # the peak resident memory a refused or bounded run may reach (an ordinary run: about 0.6 GiB)
# `python -c` entry point that skips the latency stage (the no_latency fixture, for a child process).
_NO_LATENCY = ("import sys, exporter.pipeline as p; p.measure_files = lambda *a, **k: {}; "
               "from exporter.cli import main; sys.exit(main(sys.argv[1:]))")


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (hidden ones too): file bytes, link targets, folders."""
    result: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            result[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            result[key] = "dir"
        else:
            result[key] = path.read_bytes()
    return result


def someones_files(folder: Path) -> Path:
    """A folder of someone's files: an ssh key, a git repository, notes."""
    (folder / ".ssh").mkdir(parents=True)
    (folder / ".ssh" / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nsentinel\n")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("do not delete\n")
    return folder


def fake_artifact(folder: Path, **manifest: Any) -> Path:
    """An earlier export-model artifact as far as --force can tell: a manifest naming the tool and its files."""
    (folder / "parity").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"old model")
    (folder / "parity" / "inputs.npz").write_bytes(b"old inputs")
    body = {"schema_version": 1, "tool": {"name": "export-model", "version": "0.0"},
            "files": {"model.onnx": {"bytes": 9}, "parity/inputs.npz": {"bytes": 10}}} | manifest
    (folder / "manifest.json").write_text(json.dumps(body))
    return folder


def lock_files(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name == f".{output.name}.lock")


# ---- finding 2: --force replaces only what export-model made ------------------------------------------------


@pytest.mark.parametrize("where", ["cwd", "home", "home-tilde"])
def test_force_never_replaces_the_working_directory_or_home(checkpoint: Path, tmp_path: Path, where: str,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture, no_latency: None) -> None:
    """`--output . --force` from a folder of someone's files, and `--output "$HOME" --force`: refused, untouched."""
    folder = someones_files(tmp_path / "someone")
    before = snapshot(folder)
    if where == "cwd":
        monkeypatch.chdir(folder)
        output, phrase = Path("."), "is the working directory"
    else:
        monkeypatch.setenv("HOME", str(folder))
        monkeypatch.chdir(tmp_path)
        output, phrase = (folder if where == "home" else Path("~")), "is the home folder"
    run = run_cli(["--model", str(checkpoint), "--force", "--calibration-samples", "8"], output, capsys)
    assert_refused(run, phrase, "never replaces it, even with --force", "pass a new folder", output_kept=True)
    assert folder.is_dir() and snapshot(folder) == before  # nothing moved, changed or deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "someone"]  # no work folder beside it either


def test_force_refuses_a_folder_that_is_not_an_artifact(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture, no_latency: None) -> None:
    added = fake_artifact(tmp_path / "added")  # an artifact with a person's files (and a link) added
    (added / "my-notes.txt").write_text("mine")
    (added / "parity" / "extra.npz").write_bytes(b"mine too")
    (added / "link").symlink_to(tmp_path)
    no_schema = fake_artifact(tmp_path / "no-schema")
    manifest = json.loads((no_schema / "manifest.json").read_text())
    del manifest["schema_version"]
    (no_schema / "manifest.json").write_text(json.dumps(manifest))
    cases: list[tuple[Path, tuple[str, ...]]] = [
        (someones_files(tmp_path / "data"), ("is not an export-model artifact", "no manifest.json", ".ssh/",
                                             "notes.txt")),
        (fake_artifact(tmp_path / "other-tool", tool={"name": "other-exporter"}),
         ("does not name export-model as its tool",)),
        (no_schema, ("does not name export-model as its tool",)),
        (added, ("manifest.json does not list", "my-notes.txt", "parity/extra.npz", "link (a symbolic link)")),
    ]
    for folder, phrases in cases:
        before = snapshot(folder)
        run = run_cli(["--model", str(checkpoint), "--force", "--calibration-samples", "8"], folder, capsys)
        assert_refused(run, *phrases, "--force replaces only an earlier export-model artifact", output_kept=True)
        assert snapshot(folder) == before, folder


def test_symlinked_output_is_refused_and_neither_link_nor_target_is_touched(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_latency: None) -> None:
    target = fake_artifact(tmp_path / "real-artifact")  # even an artifact: the link is not replaced, nor followed
    link = tmp_path / "current"
    link.symlink_to(target)
    before = snapshot(target)
    for flags in (["--force"], []):
        run = run_cli(["--model", str(checkpoint), *flags, "--calibration-samples", "8"], link, capsys)
        assert_refused(run, "is a symbolic link", "neither writes through nor replaces a link", output_kept=True)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert snapshot(target) == before


def test_output_through_a_symlink_into_the_checkpoint_is_refused(checkpoint: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture,
                                                                 no_latency: None) -> None:
    link = tmp_path / "models"
    link.symlink_to(checkpoint)
    before = snapshot(checkpoint)
    for flags in ([], ["--force"]):
        run = run_cli(["--model", str(checkpoint), *flags, "--calibration-samples", "8"], link / "exported", capsys)
        assert_refused(run, "inside the checkpoint being exported", "choose a folder outside it")
    assert snapshot(checkpoint) == before  # no artifact written inside the checkpoint


def test_force_replaces_an_earlier_artifact(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            no_latency: None) -> None:
    """What --force is for: a fake earlier artifact, then a real one (its manifest lists every file it wrote)."""
    output = fake_artifact(tmp_path / "out")
    argv = ["--model", str(checkpoint), "--force", "--calibration-samples", "8"]
    run = run_cli(argv, output, capsys)
    assert run.code == 0, run.err
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["source"]["name"] == "ckpt" and (output / "model.onnx").read_bytes() != b"old model"
    first = manifest["created"], (output / "model.onnx").stat().st_ino
    time.sleep(1.1)
    run = run_cli(argv, output, capsys)  # a real artifact is replaceable too
    assert run.code == 0, run.err
    assert (json.loads((output / "manifest.json").read_text())["created"],
            (output / "model.onnx").stat().st_ino) != first
    assert partial_siblings(output) == [] and lock_files(output) == []


# ---- finding 3 / 4 (part): bounded reads that never block ---------------------------------------------------


@dataclass
class Bounded:
    code: int
    err: str
    peak_rss: int  # bytes
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip() and not line.startswith("[")]


def run_bounded(argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> Bounded:
    """export-model (latency stage skipped) in a child under RLIMIT_AS and a wall-clock limit; its peak RSS."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    with tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        process = subprocess.Popen([sys.executable, "-c", _NO_LATENCY, *argv], cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit,
                                   env={**os.environ, **(env or {})})
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    assert seconds < timeout, f"still running after {timeout} s (killed):\n{text}"
    return Bounded(process.returncode, text, usage.ru_maxrss * 1024, seconds)


def assert_bounded_refusal(run: Bounded, *phrases: str, output: Path) -> None:
    assert run.code == 2, run.err
    assert "Traceback" not in run.err, run.err
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("export-model: error: "), run.err
    assert run.peak_rss < RSS_BOUND, f"peak RSS {run.peak_rss / 2**20:.0f} MiB"
    for phrase in phrases:
        assert phrase.lower() in run.error_lines[0].lower(), (phrase, run.error_lines[0])
    assert not output.exists() and partial_siblings(output) == []


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as handle:  # no disk used: NUL bytes and no newline, one 2 GiB line
        handle.truncate(size)
    return path


@pytest.mark.parametrize(
    ("flag", "make", "phrases"),
    [
        ("--config", lambda d: Path("/dev/zero"), ("is a character device", "not a regular file")),
        ("--config", lambda d: _sparse(d / "options.json", 2 << 30), ("over the 4 MiB limit",)),
        ("--calibration-data", lambda d: _link(d / "zero.txt", Path("/dev/zero")), ("is a character device",)),
        ("--calibration-data", lambda d: _fifo(d / "pipe.txt"), ("is a named pipe (FIFO)", "not a regular file")),
        ("--calibration-data", lambda d: _sparse(d / "one-line.txt", 2 << 30), ("over the 256 MiB limit",)),
        ("--calibration-data", lambda d: _jsonl(d / "huge.jsonl", 16, 10_000_000),
         ("line 1 is longer than 1 MiB", "shorten its text")),
    ],
    ids=["config-dev-zero", "config-2GiB", "data-dev-zero", "data-fifo-no-writer", "data-2GiB-one-line",
         "data-jsonl-16x10MB"],
)
def test_memory_and_blocking_bombs_are_refused_quickly(checkpoint: Path, tmp_path: Path, flag: str,
                                                       make: Callable[[Path], Path], phrases: tuple[str, ...]) -> None:
    data = make(tmp_path)
    output = tmp_path / "out"
    run = run_bounded(["--model", str(checkpoint), "--output", str(output), flag, str(data),
                       "--calibration-samples", "1"], tmp_path, timeout=90)
    assert_bounded_refusal(run, *phrases, output=output)
    print(f"{flag} {data.name}: exit {run.code}, peak RSS {run.peak_rss / 2**20:.0f} MiB, {run.seconds:.1f} s")


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _jsonl(path: Path, lines: int, chars: int) -> Path:
    with path.open("w") as handle:
        for i in range(lines):
            handle.write(json.dumps({"text": f"text {i} " + "x" * chars}) + "\n")
    return path


def test_long_lines_are_read_in_bounded_memory_and_cut(tmp_path: Path) -> None:
    """A 64 MiB one-line .txt (under the file limit): read through in chunks, the text cut, never held whole."""
    data = tmp_path / "one-line.txt"
    with data.open("w") as handle:
        for _ in range(64):
            handle.write("the quick brown fox jumps over the lazy dog " * 23_831)  # ~1 MiB, no newline
        handle.write("\nsecond line\n")
    tracemalloc.start()
    try:
        texts = load_texts(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [len(t) for t in texts] == [MAX_TEXT_CHARS, len("second line")]
    assert texts[0].startswith("the quick brown fox")
    assert peak < 4 * TXT_LINE_BYTES + (4 << 20), f"peak {peak / 2**20:.1f} MiB of Python allocations"
    jsonl = _jsonl(tmp_path / "long.jsonl", 4, 500_000)  # lines under the 1 MiB limit: texts cut when read
    assert [len(t) for t in load_texts(jsonl)] == [MAX_TEXT_CHARS] * 4


def test_tokenization_never_sees_more_than_the_character_cap() -> None:
    seen: list[int] = []

    def tokenizer(texts: list[str], pairs: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        seen.extend(len(t) for t in [*texts, *(pairs or [])])
        import numpy as np

        return {"input_ids": np.ones((len(texts), kwargs["max_length"]), dtype=np.int64),
                "attention_mask": np.ones((len(texts), kwargs["max_length"]), dtype=np.int64)}

    huge = "word " * 2_000_000  # 10 MB
    make_tokenize(tokenizer, ["input_ids", "attention_mask"], 128)([huge, (huge, huge)])
    make_tokenize(tokenizer, ["input_ids", "attention_mask"], 128, pairs=True)([huge, (huge, huge)])
    assert seen and max(seen) <= 128 * CHARS_PER_POSITION, max(seen)


def test_a_160MB_calibration_file_of_10MB_lines_exports_in_bounded_memory(checkpoint: Path, tmp_path: Path) -> None:
    """16 lines of 10 MB each: read with the line cap, cut before tokenization; the export succeeds within bounds."""
    data = tmp_path / "long.txt"
    sentence = "the quick brown fox jumps over the lazy dog "
    with data.open("w") as handle:
        for i in range(16):
            handle.write(f"text {i}: " + sentence * (10_000_000 // len(sentence)) + "\n")
    output = tmp_path / "out"
    run = run_bounded(["--model", str(checkpoint), "--output", str(output), "--calibration-data", str(data),
                       "--calibration-samples", "16"], tmp_path, timeout=300)
    assert run.code == 0, run.err
    assert run.peak_rss < RSS_BOUND, f"peak RSS {run.peak_rss / 2**20:.0f} MiB"
    assert json.loads((output / "manifest.json").read_text())["quantization"]["samples"] == 16
    print(f"160 MB of 10 MB lines: peak RSS {run.peak_rss / 2**20:.0f} MiB, {run.seconds:.1f} s")


# ---- finding 6: a killed run's leftovers are swept by the next run; temporary files stay in the work folder --


def test_temporary_files_live_inside_the_work_folder(checkpoint: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                     no_latency: None) -> None:
    import exporter.pipeline

    seen: list[tuple[str, str | None]] = []
    real = exporter.pipeline.quantize_model

    def quantize(*args: Any, **kwargs: Any) -> Any:
        seen.append((tempfile.gettempdir(), os.environ.get("TMPDIR")))
        return real(*args, **kwargs)

    monkeypatch.setattr(exporter.pipeline, "quantize_model", quantize)
    output = tmp_path / "out"
    run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], output, capsys)
    assert run.code == 0, run.err
    assert len(seen) == 1
    scratch = Path(seen[0][0])
    assert scratch.parent.parent == tmp_path and scratch.parent.name.startswith(".out.partial-"), scratch
    assert seen[0][1] == str(scratch)  # child processes too
    assert tempfile.gettempdir() != str(scratch) and partial_siblings(output) == []


@pytest.mark.skipif(not EXPORT_MODEL.is_file(), reason="the export-model console script is not installed")
def test_a_killed_runs_work_folder_is_swept_by_the_next_run(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            caplog: pytest.LogCaptureFixture, no_latency: None) -> None:
    output, system_tmp = tmp_path / "out", tmp_path / "system-tmp"
    system_tmp.mkdir()
    process = subprocess.Popen(
        [str(EXPORT_MODEL), "--model", str(checkpoint), "--output", str(output), "--calibration-samples", "8"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(system_tmp)})
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if line.startswith("[6/8] parity"):  # latency runs now (seconds): its work folder holds every stage
                break
        else:
            pytest.fail("export-model ended before the latency stage")
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stale = partial_siblings(output)
    assert len(stale) == 1 and not output.exists()  # the premise: SIGKILL leaves the work folder
    assert (tmp_path / stale[0] / "artifact" / "model_quantized.onnx").is_file()
    assert [p.name for p in system_tmp.iterdir() if p.name.startswith("export-model-")] == []
    # Beside it: a folder without the marker (not provably ours) and one whose run is still alive. Both stay.
    foreign = tmp_path / ".out.partial-foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not export-model's")
    live = subprocess.Popen(["sleep", "120"])
    try:
        alive = tmp_path / ".out.partial-alive"
        alive.mkdir()
        marker = json.loads((tmp_path / stale[0] / ".export-model-work").read_text())
        (alive / ".export-model-work").write_text(json.dumps(marker | {"pid": live.pid, "created": time.time()}))
        run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], output, capsys)
    finally:
        live.kill()
        live.wait()
    assert run.code == 0, run.err
    assert f"removed 1 work folder(s) left beside out by killed runs: {stale[0]}" in caplog.text
    assert partial_siblings(output) == [".out.partial-alive", ".out.partial-foreign"]
    assert (foreign / "keep.txt").read_text() == "not export-model's"
    assert (output / "manifest.json").is_file() and lock_files(output) == []


# ---- finding 7: a bar that cannot fail is a usage error --------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "options", "phrases"),
    [
        (["--parity-atol", "nan"], None, ("--parity-atol nan", "fp32_atol must be a finite number >= 0")),
        (["--parity-atol", "inf"], None, ("--parity-atol inf", "fp32_atol must be a finite number")),
        (["--parity-atol", "-1"], None, ("--parity-atol -1.0", "fp32_atol must be a finite number >= 0")),
        ([], '{"parity": {"fp32_atol": NaN}}', ("--config", "fp32_atol must be a finite number >= 0", "got nan")),
        ([], '{"parity": {"int8_min_cosine": Infinity}}', ("--config", "int8_min_cosine must be a number in [0.9, 1]")),
        ([], '{"parity": {"fp16_min_cosine": "high"}}', ("--config", "fp16_min_cosine must be a number")),
    ],
    ids=["atol-nan", "atol-inf", "atol-negative", "config-atol-nan", "config-cosine-inf", "config-cosine-text"],
)
def test_parity_bars_that_cannot_fail_are_usage_errors(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture, no_latency: None,
                                                       flags: list[str], options: str | None,
                                                       phrases: tuple[str, ...]) -> None:
    if options is not None:
        (tmp_path / "options.json").write_text(options)
        flags = ["--config", str(tmp_path / "options.json")]
    run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8", *flags], tmp_path / "out", capsys)
    assert_refused(run, *phrases)


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_accuracy_drop_that_cannot_fail_is_a_usage_error(checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture, value: str) -> None:
    """A regression guard, not a fix: this held before issue 17 (its range test already refuses NaN and
    infinities); pinned beside the parity bars so a rewrite of the check cannot lose it."""
    run = run_cli(["--model", str(checkpoint), "--max-accuracy-drop", value], tmp_path / "out", capsys)
    assert_refused(run, f"--max-accuracy-drop {float(value)!r}", "max_accuracy_drop must be a", "fraction in (0, 1)")


# ---- finding 9: one run at a time per --output -------------------------------------------------------------


@pytest.mark.skipif(not EXPORT_MODEL.is_file(), reason="the export-model console script is not installed")
def test_a_second_concurrent_run_to_the_same_output_is_refused_naming_the_first(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, no_latency: None) -> None:
    output = tmp_path / "out"
    first = subprocess.Popen(
        [str(EXPORT_MODEL), "--model", str(checkpoint), "--output", str(output), "--calibration-samples", "8"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert first.stderr is not None
        for line in first.stderr:
            if line.startswith("[1/8] load"):  # the first run holds the lock from before loading
                break
        else:
            pytest.fail("the first run ended before loading")
        capsys.readouterr()
        code = main(["--model", str(checkpoint), "--output", str(output), "--calibration-samples", "8"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        rest = first.stderr.read()
        assert first.wait(timeout=300) == 0, rest
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("export-model: error: "), err
    assert f"is being written by another export-model run (pid {first.pid} " in lines[0], lines[0]
    assert "wait for it to end, or choose another --output" in lines[0]
    assert json.loads((output / "manifest.json").read_text())["source"]["name"] == "ckpt"  # the first run's
    assert partial_siblings(output) == [] and lock_files(output) == []

"""Paths: a missing or wrong --model, an output that exists, cannot be written or runs out of space."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from exporter.workspace import move_in_place
from tests.hardening.conftest import assert_refused, partial_siblings, run_cli


def test_missing_model_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_cli(["--model", str(tmp_path / "no-such-ckpt")], tmp_path / "out", capsys)
    assert_refused(run, "no such folder", "pass a checkpoint folder")


def test_folder_without_config_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    run = run_cli(["--model", str(tmp_path / "empty")], tmp_path / "out", capsys)
    assert_refused(run, "has no config.json", "expected a transformers checkpoint folder")


def test_non_empty_output_is_refused_without_force_and_kept(checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier artifact")
    run = run_cli(["--model", str(checkpoint)], out, capsys)
    assert_refused(run, "exists and is not empty", "--force", output_kept=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_output_that_holds_the_checkpoint_is_refused_even_with_force(checkpoint: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    # --force would otherwise move the checkpoint aside and delete it along with the work folder.
    before = sorted(p.name for p in checkpoint.iterdir())
    for target in (checkpoint, checkpoint.parent):
        run = run_cli(["--model", str(checkpoint), "--force"], target, capsys)
        assert_refused(run, "holds the checkpoint being exported", "choose a folder outside it", output_kept=True)
    assert sorted(p.name for p in checkpoint.iterdir()) == before


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` really unwritable: a read-only bind mount as root (root ignores mode bits), else chmod."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    try:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"running as root and cannot bind-mount read-only here: {error}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


def test_output_folder_not_writable(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        with pytest.raises(OSError):  # the premise: this folder really refuses writes, even for root
            (parent / "probe").write_text("x")
        run = run_cli(["--model", str(checkpoint)], parent / "out", capsys)
        assert_refused(run, "is not writable", "choose a writable --output")
        assert list(parent.iterdir()) == []


def test_work_folder_that_cannot_be_created(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    """The access check can pass and mkdtemp still fail (ACLs, a read-only remount in between)."""
    import tempfile

    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    run = run_cli(["--model", str(checkpoint)], tmp_path / "out", capsys)
    assert_refused(run, "cannot create a work folder", "Permission denied", "choose a writable --output")


def test_full_disk_in_the_last_stage_leaves_nothing(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture, no_latency: None) -> None:
    """ENOSPC while the package stage writes the parity data: half a file exists when the write fails."""
    written: list[Path] = []

    def fill_disk(file: object, **arrays: object) -> None:
        path = Path(str(file))
        path.write_bytes(b"PK\x03\x04" + b"\0" * 4096)  # what a real write leaves when the device fills up
        written.append(path)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(np, "savez_compressed", fill_disk)
    run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], tmp_path / "out", capsys)
    assert_refused(run, "no space left", "during package", "free space there or choose another --output")
    assert written and not written[0].exists()  # the half-written file went with the work folder


def test_real_full_disk_on_a_small_tmpfs(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A 1 MiB tmpfs: the 4 MB model.onnx cannot fit; the error comes from the real export write."""
    small = tmp_path / "small"
    small.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {error}")
    try:
        run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], small / "out", capsys)
        assert_refused(run, "no space left", "during export", "free space there or choose another --output")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True, capture_output=True)


def test_force_keeps_the_previous_artifact_when_the_final_rename_fails(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    output, work = tmp_path / "out", tmp_path / ".out.partial-x"
    output.mkdir()
    (output / "manifest.json").write_text("previous")
    (work / "artifact").mkdir(parents=True)
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if Path(str(src)).name == "artifact":
            raise KeyboardInterrupt("SIGTERM")  # interrupted between moving the old artifact out and the new in
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        move_in_place(work / "artifact", output, work)
    assert (output / "manifest.json").read_text() == "previous"
    assert partial_siblings(output) == [".out.partial-x"]  # the caller's work_folder removes it

"""Shared pieces of the hardening battery: a tiny checkpoint built once, and the CLI contract every refusal keeps.

The contract (issue 6): the exit code (2 for bad input), exactly one `export-model: error:` line on stderr that
names the problem and the fix, no traceback without --debug, nothing at the output location and no hidden
`.<name>.partial-*` work folder beside it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter.cli import main
from tests.exporter.test_loading import tiny_bert

# Lines on stderr that are not the error: the stage progress lines and onnxruntime's pre-processing advice.
_NOISE = re.compile(r"^\[\d+/\d+\] |^Please consider")


@dataclass
class Run:
    code: int
    err: str
    output: Path

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip() and not _NOISE.match(line)]


def partial_siblings(output: Path) -> list[str]:
    """Work folders the pipeline left beside `output` (it builds in `.<name>.partial-*`)."""
    if not output.parent.is_dir():
        return []
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.partial-"))


class _OPTIONS:
    latency_off = False


def run_cli(argv: list[str], output: Path, capsys: pytest.CaptureFixture) -> Run:
    """main(argv + --output), with argparse's SystemExit turned into its code; stderr captured."""
    capsys.readouterr()
    extra = ["--latency", "off"] if _OPTIONS.latency_off and "--latency" not in argv else []
    try:
        code = main([*argv, *extra, "--output", str(output)])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return Run(code, capsys.readouterr().err, output)


def assert_refused(run: Run, *phrases: str, code: int = 2, output_kept: bool = False) -> str:
    """The refusal contract; returns the one error line. `phrases` must all appear in it (case-insensitive)."""
    assert run.code == code, run.err
    assert "Traceback" not in run.err, run.err
    assert len(run.error_lines) == 1, run.err
    line = run.error_lines[0]
    assert line.startswith("export-model: error: "), line
    for phrase in phrases:
        assert phrase.lower() in line.lower(), f"{phrase!r} not in {line!r}"
    if not output_kept:
        assert not run.output.exists(), f"{run.output} was left behind"
    assert partial_siblings(run.output) == [], "a work folder was left beside the output"
    return line


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (hidden 32, max 64 positions) with the MiniLM tokenizer; built once, never modified."""
    return tiny_bert(tmp_path_factory.mktemp("base") / "ckpt", max_position_embeddings=64)


@pytest.fixture
def checkpoint(base_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the base checkpoint, free to mutate."""
    return Path(shutil.copytree(base_checkpoint, tmp_path / "ckpt"))


@pytest.fixture
def no_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the latency stage (about 10 s of timing loops that no hardening case depends on) the way a user
    would: `--latency off`, added by `run_cli` while this fixture is active."""
    monkeypatch.setattr(_OPTIONS, "latency_off", True)


def edit_config(folder: Path, edit: Callable[[dict], object]) -> None:
    import json

    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))

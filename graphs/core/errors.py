"""The project's one exception family, and the exit code each member maps to.

Every message says what was expected, what was found and what to try, in one line; the CLI prints
``str(error)`` and exits with ``error.exit_code``. This module imports nothing heavy, so ``graphs/`` and
``calibration/`` share it without pulling in torch.
"""

from __future__ import annotations


class ExportError(Exception):
    """A failure of the pipeline that is not the user's input (exit code 4)."""

    exit_code: int = 4


class UsageError(ExportError):
    """Bad input or usage: a path, option, checkpoint or data file the tool cannot accept (exit code 2)."""

    exit_code = 2


class OutputError(UsageError):
    """The output location cannot take the artifact: not writable, the checkpoint itself, or a full disk."""


class CheckpointError(UsageError):
    """The checkpoint cannot be loaded as given: missing, corrupt, unsupported or inconsistent."""


class CalibrationDataError(UsageError):
    """Calibration texts missing, empty, undecodable or malformed."""


class EvalDataError(CalibrationDataError):
    """A labelled evaluation file (``--eval-data``) missing, malformed, or with a row the task cannot score."""


class ProviderUnavailableError(UsageError):
    """An execution provider was requested that this onnxruntime build does not offer."""


class FusionError(ExportError):
    """Graph fusion produced a graph that does not match the compaction plan (wrong or missing fusions)."""


class QuantizationError(ExportError):
    """Static INT8 quantization failed or could not meet its accuracy criterion."""


class ParityError(ExportError):
    """An artifact does not compute what the PyTorch reference computes (exit code 3; artifact kept)."""

    exit_code = 3


def from_onnxruntime(error: BaseException) -> bool:
    """True for onnxruntime's own exceptions (its compiled ``Fail``, ``InvalidGraph``, ... subclass plain
    ``Exception``, so only their module tells them apart)."""
    return type(error).__module__.startswith("onnxruntime")


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message (its type name when the message is empty), cut to ``limit``."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s whole message on one line (whitespace collapsed), cut to ``limit``; its type name if empty."""
    return " ".join(str(error).split())[:limit] or type(error).__name__

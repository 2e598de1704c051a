"""The pipeline's stage lines ("[i/N] stage detail (s)"), each stage's wall time and peak resident memory, and the
memory released between stages. Imports no torch: the same lines serve every stage."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from graphs.core.errors import ExportError, first_line, from_onnxruntime

log = logging.getLogger("exporter.pipeline")  # the console's stage lines are the pipeline's


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere only
    the collection). Between stages, what one stage freed (a traced graph, an optimizer's model copies) otherwise
    stays resident and every later stage's peak sits on top of it."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS (Linux ``clear_refs`` 5; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory since the last :func:`_reset_peak_rss`, in MB (None off Linux)."""
    from exporter.memory_probe import status_bytes

    try:
        return round(status_bytes("VmHWM") / 2**20, 1)
    except (OSError, ValueError):
        return None


class Stages:
    """Prints "[i/N] stage: detail (s)" per stage and keeps the timings for the manifest."""

    def __init__(self, total: int) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        """Per stage, the process's peak resident memory during it (Linux: the peak mark is reset at each
        stage's start, so a stage's figure is its own peak, not an earlier stage's)."""
        self.total = total
        self._index = 0
        self.current = "setup"

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        self._index += 1
        self.current = name
        note: dict[str, str] = {"detail": ""}
        release_memory()
        _reset_peak_rss()
        start = time.perf_counter()
        try:
            yield note
        except Exception as error:
            if not from_onnxruntime(error):
                raise
            # onnxruntime's own exceptions (pybind Fail, InvalidGraph, ...) are a stage failure, not a crash.
            raise ExportError(
                f"onnxruntime failed in the {name} stage ({type(error).__name__}: {first_line(error)}); "
                "rerun with --debug for the traceback, or report it with the manifest options"
            ) from error
        self.timings[name] = round(time.perf_counter() - start, 3)
        peak = _peak_rss_mb()
        if peak is not None:
            self.peak_rss_mb[name] = peak
        log.info("[%d/%d] %-9s %s (%.1f s)", self._index, self.total, name, note["detail"], self.timings[name])

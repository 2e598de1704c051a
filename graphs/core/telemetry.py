"""onnxruntime telemetry off, in this process and in every process the tool starts.

onnxruntime's Python package (1.31) sends usage events to Microsoft's collector once a session is created (DNS
look-ups of its events host from native threads). An export, a `verify` or a `run` must not reach the network
unless a hub id is given, so the tool turns this off: in-process with ``onnxruntime.disable_telemetry_events()``,
and for child processes with ``ORT_DISABLE_TELEMETRY=1`` in the environment they inherit.

This module imports nothing heavy: onnxruntime only if it is installed, and only when called.
"""

from __future__ import annotations

import os

ENV = {"ORT_DISABLE_TELEMETRY": "1"}
_done = False


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) with telemetry turned off, for ``subprocess`` children."""
    return {**(os.environ if base is None else base), **ENV}


def quiet_onnxruntime() -> None:
    """Turn onnxruntime telemetry off here and for children (idempotent; a no-op without onnxruntime)."""
    global _done
    os.environ.update(ENV)  # children, and an onnxruntime imported later in this process
    if _done:
        return
    try:
        import onnxruntime
    except ImportError:
        return
    disable = getattr(onnxruntime, "disable_telemetry_events", None)
    if disable is not None:
        disable()
    _done = True

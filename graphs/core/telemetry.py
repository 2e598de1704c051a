"""onnxruntime telemetry off, in this process and in every process the tool starts.

onnxruntime's Python package (1.31) sends usage events to Microsoft's collector once a session is created (DNS
look-ups of its events host from native threads). An export, a `verify` or a `run` must not reach the network
unless a hub id is given, so the tool turns this off: in-process with ``onnxruntime.disable_telemetry_events()``,
and for child processes with ``ORT_DISABLE_TELEMETRY=1`` in the environment they inherit.

OpenVINO (2026.4, the optional extra) sends a usage event to Google Analytics from ``import openvino`` itself
(``openvino/tools/ovc/__init__.py``: ``telemetry.send_event("ov", "import", ...)`` through the
``openvino-telemetry`` package, which counts a missing consent file as consent when the dialog is off), and NNCF
(3.4, the benchmark's INT8 peer) does the same through the same package. Both fall back to their own no-op stubs
when ``openvino_telemetry`` cannot be imported, so :func:`quiet_onnxruntime` makes it unimportable in this process
(``sys.modules["openvino_telemetry"] = None``) before anything imports openvino; ``NNCF_CI=1`` (NNCF's own switch,
``nncf/telemetry/wrapper.py``) goes to children as well. Writing an opt-out file into the user's home (the
package's documented switch) would be a side effect of running the tool, so it is not done.

This module imports nothing heavy: onnxruntime only if it is installed, and only when called.
"""

from __future__ import annotations

import os
import sys

ENV = {"ORT_DISABLE_TELEMETRY": "1", "NNCF_CI": "1"}
SILENCED = "openvino_telemetry"
"""The module made unimportable (OpenVINO's and NNCF's telemetry sender; both then use their no-op stubs)."""
_done = False


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: ``os.environ``) with telemetry turned off, for ``subprocess`` children."""
    return {**(os.environ if base is None else base), **ENV}


def quiet_onnxruntime() -> None:
    """Turn onnxruntime's, OpenVINO's and NNCF's telemetry off here and for children (idempotent; a no-op for
    each that is not installed). Call it before openvino is imported."""
    global _done
    os.environ.update(ENV)  # children, and an onnxruntime imported later in this process
    sys.modules.setdefault(SILENCED, None)  # type: ignore[arg-type]  # an import of it now raises ImportError
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

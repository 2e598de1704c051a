"""The one place the project creates onnxruntime sessions.

Every session is quiet (log severity 3), runs with telemetry off (graphs/core/telemetry.py), on exactly the
provider asked for: short names (cpu, cuda, tensorrt, openvino) or onnxruntime's full ones, an absent provider is a
:class:`ProviderUnavailableError` listing what this onnxruntime offers, and a non-CPU session never falls back to
the CPU silently. A model is a path, or bytes already read (the deployment side builds its sessions from the
bytes it hashed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphs.core.cpu import EXACT_INT8_OPTIONS
from graphs.core.errors import ProviderUnavailableError
from graphs.core.telemetry import quiet_onnxruntime

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "openvino": "OpenVINOExecutionProvider"}
CPU = PROVIDERS["cpu"]


def full_name(provider: str) -> str:
    """onnxruntime's name for `provider` ("cpu" -> "CPUExecutionProvider"; full names pass through)."""
    return PROVIDERS.get(provider.lower(), provider)


def available() -> list[str]:
    quiet_onnxruntime()
    import onnxruntime as ort

    return list(ort.get_available_providers())


def require(provider: str) -> str:
    """The full name of `provider` if this onnxruntime offers it; ProviderUnavailableError otherwise."""
    name, offered = full_name(provider), available()
    if name not in offered:
        short = [k for k, v in PROVIDERS.items() if v in offered]
        raise ProviderUnavailableError(f"{name} requested; this onnxruntime offers {offered} (short names: "
                                       f"{', '.join(short)}); install its onnxruntime build or pick one of those")
    return name


def open_session(model: Path | str | bytes, provider: str = "cpu", threads: int = 0, optimize: bool = True,
                 spinning: bool | None = None, entries: Mapping[str, str] | None = None) -> Any:
    """An onnxruntime session on exactly `provider`. `threads`: intra-op threads (0: onnxruntime's default);
    `optimize=False` runs the graph as written (no onnxruntime fusions); `spinning=False` stops idle worker
    threads from spinning (fairer when several sessions are timed in turn); `entries`: session config entries,
    only those of :data:`graphs.core.cpu.EXACT_INT8_OPTIONS` (what an INT8 file may ask for)."""
    import onnxruntime as ort

    name = require(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if name != CPU:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (entries or {}).items():
        if EXACT_INT8_OPTIONS.get(key) != value:
            raise ValueError(f"session option {key}={value!r} is not one export-model sets")
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=[name])
    if session.get_providers()[0] != name:
        raise ProviderUnavailableError(f"{name} requested but the session runs on {session.get_providers()}")
    return session

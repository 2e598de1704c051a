"""The one place the project compiles models with OpenVINO (the optional ``openvino`` package).

Every compiled model gets its settings explicitly, never OpenVINO's defaults: ``INFERENCE_NUM_THREADS`` (default
every core), ``NUM_STREAMS=1``, ``PERFORMANCE_HINT=LATENCY`` and ``INFERENCE_PRECISION_HINT``. The last one matters
most: on a CPU with AVX-512 BF16 or AMX, OpenVINO's default inference precision is bf16, so an ONNX FP32 graph
left to the defaults silently runs in bfloat16. Here "fp32" compiles with ``f32`` and "bf16" with ``bf16``, and
the compiled model's own reading of each setting is compared with what was asked (a mismatch is a
:class:`ProviderUnavailableError`, never a silent change). bf16 is only asked for where the CPU's flags show
``avx512_bf16`` or ``amx_bf16`` (:func:`bf16_flags`).

A model is a path or the bytes already read (OpenVINO's ONNX frontend reads in-memory ONNX): the deployment side
hands over the bytes it hashed. :class:`OpenVINOSession` answers the small part of onnxruntime's session
interface the project uses (``get_inputs``, ``get_outputs``, ``run``), so parity, latency and the runtime run it
unchanged. Telemetry: ``import openvino`` itself sends a usage event unless :mod:`graphs.core.telemetry` has
turned it off first, so openvino is imported only after :func:`graphs.core.telemetry.quiet_onnxruntime`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphs.core.errors import ProviderUnavailableError
from graphs.core.telemetry import quiet_onnxruntime

ENGINE = "OpenVINO CPU"
"""The engine's name in parity rows (``provider``) and, with the precision, in latency keys."""
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
"""Precision variants and the ``INFERENCE_PRECISION_HINT`` each compiles with. An INT8 (QDQ) file runs with
``f32``: its quantized MatMuls run on OpenVINO's INT8 kernels, the rest in float32."""
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INSTALL = "pip install export-model[openvino]"


def version() -> str | None:
    """The installed openvino version, or None where the package is absent (imported with telemetry off)."""
    quiet_onnxruntime()  # before openvino's import, which would otherwise send a usage event
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def missing_reason() -> str:
    return f"openvino is not installed here; {INSTALL} to check and time the files on OpenVINO"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of the first processor listed in ``/proc/cpuinfo`` (empty where it is absent)."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_flags(flags: set[str] | None = None) -> list[str]:
    """The flags that allow a bf16 variant (``avx512_bf16``, ``amx_bf16``) this CPU has; empty: no bf16 here."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in BF16_FLAGS if flag in flags]


def settings(precision: str = "fp32", threads: int = 0) -> dict[str, str]:
    """The properties every compiled model gets. `precision`: "fp32" or "bf16"; `threads`: 0 means every core."""
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision {precision!r} is not one of {sorted(PRECISIONS)}")
    return {"INFERENCE_NUM_THREADS": str(threads or os.cpu_count() or 1), "NUM_STREAMS": "1",
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISIONS[precision]}


@dataclass(frozen=True)
class Port:
    """An input or output as onnxruntime's ``NodeArg`` describes it (name and ``tensor(<type>)``)."""

    name: str
    type: str


_TYPES = {"i64": "int64", "i32": "int32", "f32": "float", "f16": "float16", "bf16": "bfloat16", "boolean": "bool"}


class OpenVINOSession:
    """A compiled OpenVINO model behind onnxruntime's session calls. Use :func:`open_compiled`."""

    def __init__(self, compiled: Any, applied: dict[str, str]) -> None:
        self.compiled = compiled
        self.settings = applied
        self._request = compiled.create_infer_request()

    def get_inputs(self) -> list[Port]:
        return [Port(p.get_any_name(), f"tensor({_TYPES.get(p.get_element_type().get_type_name(), '?')})")
                for p in self.compiled.inputs]

    def get_outputs(self) -> list[Port]:
        return [Port(p.get_any_name(), f"tensor({_TYPES.get(p.get_element_type().get_type_name(), '?')})")
                for p in self.compiled.outputs]

    def get_providers(self) -> list[str]:
        return [ENGINE]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs `output_names` (None: all) for `feeds`. The request reads the inputs in place and writes into
        its own buffers (no copy either way, as onnxruntime's run does not copy either); only the outputs asked
        for are copied out, since the next call reuses those buffers."""
        result = self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()},
                                     share_inputs=True, share_outputs=True)
        by_name = {port.get_any_name(): port for port in self.compiled.outputs}
        names = output_names or list(by_name)
        return [np.array(result[by_name[name]], copy=True) for name in names]


def _read(core: Any, model: Path | str | bytes) -> Any:
    if isinstance(model, bytes):
        return core.read_model(model=model)
    return core.read_model(str(model))


def open_compiled(model: Path | str | bytes, precision: str = "fp32", threads: int = 0) -> OpenVINOSession:
    """`model` compiled for OpenVINO's CPU plugin with :func:`settings` (`precision`: "fp32" or "bf16"; `threads`:
    0 = every core). ProviderUnavailableError where openvino is absent, where bf16 is asked for on a CPU without
    the flags for it, or where the compiled model reports other settings than the ones asked for. A model
    OpenVINO cannot read raises its own RuntimeError (callers record it as that file's row)."""
    quiet_onnxruntime()  # the environment switches (NNCF's telemetry) before anything of OpenVINO's is imported
    if version() is None:
        raise ProviderUnavailableError(f"{ENGINE} requested; {missing_reason()}")
    if precision == "bf16" and not bf16_flags():
        raise ProviderUnavailableError(f"bf16 on {ENGINE} requested; this CPU has none of {list(BF16_FLAGS)}")
    import openvino as ov

    asked = settings(precision, threads)
    core = ov.Core()
    compiled = core.compile_model(_read(core, model), "CPU", asked)
    applied = {key: _property(compiled, key) for key in asked}
    if applied != asked:
        raise ProviderUnavailableError(f"{ENGINE} was asked for {asked} but the compiled model reports {applied}")
    return OpenVINOSession(compiled, applied)


def _property(compiled: Any, key: str) -> str:
    """A compiled model's setting as text in the form it was set (``f32``, ``LATENCY``, ``2``)."""
    value = compiled.get_property(key)
    if hasattr(value, "get_type_name"):
        return str(value.get_type_name())
    return str(getattr(value, "name", value))

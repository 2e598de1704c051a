"""Which (file, engine, precision) of an artifact `run` serves, and the session for it.

Engines: onnxruntime on the requested provider, and OpenVINO's CPU plugin (the optional ``openvino`` package)
at each precision its parity rows passed at (fp32, bf16 where this CPU has AVX-512 BF16 or AMX, int8 for a QDQ
file, and int8-bf16, its float parts in bf16, where bf16 is allowed). Deployable: the file passed parity at export (a pass row and no fail row, :func:`deployable_files`) and,
for OpenVINO, its own row at that precision passed. The default choice is the deployable run with the least
summed median latency over the shapes every candidate was timed at in the manifest's ``latency`` table (keys:
onnxruntime's provider name, or ``"OpenVINO CPU <precision>"``); without common timings, onnxruntime with the
fused FP32 graph first. OpenVINO is a candidate only when the provider asked for is the CPU and openvino is
installed here. A file named by the user runs at its own precision on either engine (an FP32 file is never
served in bf16, nor an INT8 file's float parts, unless the default choice picked that run from the latency
table).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exporter.runtime.openvino_check import INT8_BF16, hint
from graphs.core.errors import ParityError, UsageError
from graphs.core.openvino_sessions import ENGINE, bf16_flags, open_compiled, version
from graphs.core.sessions import CPU, open_session

ENGINES = ("auto", "onnxruntime", "openvino")
FALLBACK_ORDER = ("model_optimized.onnx", "model.onnx", "model_quantized.onnx", "model_fp16.onnx")


@dataclass(frozen=True)
class Run:
    """One way to serve a file: `provider` is onnxruntime's provider name or ``ENGINE`` for OpenVINO."""

    file: str
    provider: str
    precision: str

    @property
    def openvino(self) -> bool:
        return self.provider == ENGINE

    @property
    def latency_key(self) -> str:
        return f"{ENGINE} {self.precision}" if self.openvino else self.provider

    def describe(self) -> str:
        return f"{self.file} on {self.latency_key}"


def deployable_files(manifest: dict[str, Any]) -> list[str]:
    """Model files the artifact holds whose parity passed: at least one `pass` row and no `fail` row."""
    status: dict[str, set[str]] = {}
    for entry in manifest.get("parity", []):
        if entry.get("file") in manifest.get("files", {}):
            status.setdefault(entry["file"], set()).add(entry.get("status", ""))
    return [name for name, seen in status.items() if "pass" in seen and "fail" not in seen]


def candidates(manifest: dict[str, Any], provider: str, engine: str = "auto", file: str | None = None) -> list[Run]:
    """The deployable runs on this machine (see the module docstring), restricted to `engine` and `file`."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r} is not one of {list(ENGINES)}")
    files = [name for name in deployable_files(manifest) if file is None or name == file]
    precision = {e.get("file"): e.get("precision", "fp32") for e in manifest.get("parity", []) if e.get("provider") != ENGINE}
    runs = [Run(name, provider, precision.get(name, "fp32")) for name in files] if engine != "openvino" else []
    if engine != "onnxruntime" and provider == CPU and version() is not None:
        allowed = {"fp32", "int8"} | ({"bf16", INT8_BF16} if bf16_flags() else set())
        runs += [Run(e["file"], ENGINE, e["precision"]) for e in manifest.get("parity", [])
                 if e.get("provider") == ENGINE and e.get("status") == "pass" and e.get("file") in files
                 and e.get("precision") in allowed
                 and (file is None or e.get("precision") == precision.get(file, "fp32"))]
    return runs


def choose_run(manifest: dict[str, Any], provider: str, engine: str = "auto", file: str | None = None) -> Run:
    """The fastest deployable run by the manifest's latency table; see the module docstring."""
    runs = candidates(manifest, provider, engine, file)
    if not runs:
        where = f" on {engine}" if engine != "auto" else ""
        raise ParityError(f"no model file of this artifact passed parity{where} (manifest.json 'parity'"
                          f"{'; openvino is not installed here' if engine == 'openvino' and version() is None else ''}"
                          "); it is not deployable: re-export it, or name a file with --file to run it anyway")
    latency = manifest.get("latency") or {}
    timed: dict[Run, dict[str, float]] = {}
    for run in runs:
        measured = ((latency.get(run.latency_key) or {}).get("files") or {}).get(run.file) or {}
        shapes = {shape: row["median_ms"] for shape, row in measured.items()
                  if isinstance(row, dict) and isinstance(row.get("median_ms"), (int, float))}
        if shapes:
            timed[run] = shapes
    if timed:
        common = set.intersection(*(set(shapes) for shapes in timed.values()))
        if common:
            return min(timed, key=lambda r: (sum(timed[r][s] for s in common), r.openvino, r.file, r.precision))
    return min(runs, key=lambda r: (r.openvino, FALLBACK_ORDER.index(r.file) if r.file in FALLBACK_ORDER
                                    else len(FALLBACK_ORDER), r.file, r.precision))


def open_run(source: bytes | Any, run: Run, entries: Mapping[str, str] | None = None) -> Any:
    """A session for `run` from `source` (the checked bytes, or a private copy's path); `entries`: the onnxruntime
    session options the file asks for on this machine (see ``exporter.runtime.parity.session_entries``)."""
    if run.openvino:
        return open_compiled(source, hint(run.precision))
    return open_session(source, run.provider, entries=entries)

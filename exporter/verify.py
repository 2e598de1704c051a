"""`export-model verify DIR`: the check a deployment pipeline runs before it ships an artifact.

Re-hashes every file against the manifest, then re-runs parity for each model file from the stored reference
inputs and PyTorch outputs (`parity/*.npz`) on whatever providers this machine offers. Needs no torch and no
checkpoint: only onnxruntime and the artifact itself.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import UsageError
from exporter.manifest import sha256_file
from exporter.parity import Batch, ParityConfig, ParityEntry, check_file
from exporter.telemetry import quiet_onnxruntime

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    folder: Path
    hash_failures: list[str] = field(default_factory=list)  # "file: why"
    parity: list[ParityEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.hash_failures and all(e.status != "fail" for e in self.parity)

    def table(self) -> str:
        rows = [f"  hash    {line}" for line in self.hash_failures]
        rows += [f"  parity  {e.file} on {e.provider}: {e.reason}" for e in self.parity if e.status == "fail"]
        return "\n".join(rows)


def load_batches(npz_path: Path) -> list[Batch]:
    """Batches saved by the pipeline as "<index>/<name>" arrays, in index order."""
    with np.load(npz_path) as data:
        batches: dict[int, Batch] = {}
        for key in data.files:
            index, _, name = key.partition("/")
            batches.setdefault(int(index), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def verify_artifact(folder: Path, providers: tuple[str, ...] = ("auto",)) -> VerifyReport:
    """Check `folder` against its manifest.json; see the module docstring."""
    quiet_onnxruntime()
    manifest = _read_manifest(folder)
    report = VerifyReport(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            report.hash_failures.append(f"{name}: missing")
        elif path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            report.hash_failures.append(f"{name}: sha256 differs from the manifest (file changed since export)")
    try:
        options = manifest["options"]["parity"]
        config = ParityConfig(fp32_atol=float(options["fp32_atol"]), int8_min_cosine=float(options["int8_min_cosine"]),
                              fp16_min_cosine=float(options.get("fp16_min_cosine", ParityConfig.fp16_min_cosine)),
                              providers=providers)
    except (KeyError, TypeError, ValueError) as error:  # a bar that cannot fail (NaN, negative) is refused too
        raise UsageError(f"{folder / 'manifest.json'}: its parity options cannot be used ({error}); "
                         "re-export the artifact") from None
    data = manifest["parity_data"]
    inputs, reference = load_batches(folder / data["inputs"]), load_batches(folder / data["reference"])
    # Files the artifact holds; a parity row of a file never built (model_fp16.onnx without CUDA) is a skip.
    precisions = {e["file"]: e["precision"] for e in manifest["parity"] if e["file"] in manifest["files"]}
    for name, precision in precisions.items():
        if any(line.startswith(f"{name}:") for line in report.hash_failures):
            report.parity.append(ParityEntry(name, "-", precision, "fail", reason="file changed: not run"))
            continue
        report.parity += check_file(folder / name, precision, manifest["task"], inputs, reference, config)
    log.info("verify %s: %s", folder, "pass" if report.ok else "FAIL")
    return report


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; pass an artifact folder written by export-model")
    if not path.is_file():
        raise UsageError(f"{folder} has no manifest.json; pass an artifact folder written by export-model")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is not valid JSON ({error}); the artifact is damaged: re-export it") from None
    for key in ("files", "parity", "parity_data", "options", "task"):
        if key not in manifest:
            raise UsageError(f"{path} lacks {key!r}; it was not written by this export-model version: re-export")
    return manifest

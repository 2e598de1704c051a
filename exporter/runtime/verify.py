"""`export-model verify DIR`: the check a deployment pipeline runs before it ships an artifact.

Opens the folder through :class:`exporter.runtime.artifact.Artifact` (contained, bounded, checked against a signature or
pinned digest when one is given), re-hashes every file the manifest lists, reports every file it does not list,
then re-runs parity for each model file from the stored reference inputs and PyTorch outputs (``parity/*.npz``) on
whatever providers this machine offers, and (with ``--providers auto``, the default) on OpenVINO where the
optional ``openvino`` package is installed, each session built from the bytes that were hashed. Needs no torch
and no checkpoint: only onnxruntime, numpy and the artifact (and openvino for its rows). Called from Python it bounds paths and sizes but not the
graph's compute; the CLI runs it in a bounded child (exporter/runtime/sandbox.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from exporter.runtime.artifact import Artifact, FileMismatch
from exporter.runtime.files import Limits
from exporter.runtime.openvino_check import absent_entries, check_openvino
from exporter.runtime.parity import ParityConfig, ParityEntry, check_file, session_entries
from exporter.runtime.trust import Trust
from graphs.core.errors import ParityError
from graphs.core.openvino_sessions import ENGINE
from graphs.core.telemetry import quiet_onnxruntime

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    folder: Path
    trust: str = ""  # what anchors the artifact: a signature, a pinned digest, or nothing outside the folder
    manifest_sha256: str = ""
    hash_failures: list[str] = field(default_factory=list)  # "file: why"
    unlisted: list[str] = field(default_factory=list)  # entries of the folder the manifest does not list
    parity: list[ParityEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.hash_failures and not self.unlisted and any(e.status == "pass" for e in self.parity)
                and all(e.status != "fail" for e in self.parity))

    def table(self) -> str:
        rows = [f"  hash      {line}" for line in self.hash_failures]
        rows += [f"  unlisted  {name}: in the folder, not in the manifest" for name in self.unlisted]
        rows += [f"  parity    {e.file} on {e.provider}: {e.reason}" for e in self.parity if e.status == "fail"]
        if not any(e.status == "pass" for e in self.parity) and not rows:
            rows.append("  parity    no parity check ran on this machine")
        return "\n".join(rows)


def verify_artifact(folder: Path, providers: tuple[str, ...] = ("auto",), trust: Trust | None = None,
                    limits: Limits | None = None) -> VerifyReport:
    """Check `folder` against its manifest.json (and `trust`); see the module docstring."""
    quiet_onnxruntime()
    with Artifact.open(folder, trust, limits) as artifact:
        manifest = artifact.manifest
        report = VerifyReport(Path(folder), artifact.trust, artifact.manifest_sha256)
        # Files the artifact holds; a parity row of a file never built (model_fp16.onnx without CUDA) is a skip.
        precisions = {e["file"]: e["precision"] for e in manifest["parity"]
                      if e["file"] in manifest["files"] and e["provider"] != ENGINE}
        data = manifest["parity_data"]
        # The parity data and the models are checked as they are read (once), everything else here.
        report.hash_failures = artifact.check_all(
            skip={data["inputs"], data["reference"], *precisions, *(f"{name}.data" for name in precisions)})
        report.unlisted = artifact.unlisted()
        bars = manifest["options"]["parity"]
        config = ParityConfig(fp32_atol=float(bars["fp32_atol"]), int8_min_cosine=float(bars["int8_min_cosine"]),
                              fp16_min_cosine=float(bars.get("fp16_min_cosine", ParityConfig.fp16_min_cosine)),
                              bf16_min_cosine=float(bars.get("bf16_min_cosine", ParityConfig.bf16_min_cosine)),
                              providers=providers)
        on_openvino = tuple(providers) == ("auto",)  # OpenVINO is checked beside every provider, as at export
        report.parity += absent_entries() if on_openvino else []
        try:
            inputs, reference = artifact.batches(data["inputs"]), artifact.batches(data["reference"])
        except FileMismatch as error:
            report.hash_failures.append(error.line)
            raise ParityError(f"{folder}: the parity data changed since export ({report.table().strip()}); "
                              "re-export the artifact") from None
        if len(inputs) != len(reference) or any(len(next(iter(a.values()))) != len(next(iter(b.values())))
                                                for a, b in zip(inputs, reference, strict=False)):
            raise ParityError(f"{folder}: the parity inputs and reference outputs do not pair up; re-export it")
        for name, precision in precisions.items():
            try:
                with artifact.model_source(name) as source:
                    report.parity += check_file(name, precision, manifest["task"], inputs, reference, config,
                                                model=source, options=session_entries(manifest, name))
                    if on_openvino:
                        report.parity += check_openvino(name, precision, manifest["task"], inputs, reference,
                                                        config, source)
            except FileMismatch as error:
                report.hash_failures.append(error.line)
                report.parity.append(ParityEntry(name, "-", precision, "fail", reason="file changed: not run"))
    log.info("verify %s: %s", folder, "pass" if report.ok else "FAIL")
    return report

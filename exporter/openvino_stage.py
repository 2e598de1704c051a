"""The export's OpenVINO rows: parity of every file OpenVINO reads, at each precision this CPU allows, and the
latency of each (file, precision) that passed, keyed ``"OpenVINO CPU <precision>"`` in the manifest's ``latency``
beside onnxruntime's providers (same shapes, same runs, so the ratios between them are meaningful)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporter.latency import Feeds, measure_latency
from exporter.runtime.openvino_check import absent_entries, check_openvino, hint
from exporter.runtime.parity import Batch, ParityConfig, ParityEntry
from graphs.core.openvino_sessions import ENGINE, open_compiled


def openvino_parity(built: Path, checked: Sequence[tuple[str, str]], task: str, batches: Sequence[Batch],
                    expected: Sequence[Batch], config: ParityConfig) -> list[ParityEntry]:
    """OpenVINO parity rows of the `checked` (file, precision) pairs in folder `built` (one skip row without
    openvino)."""
    entries = absent_entries()
    for name, precision in checked:
        entries += check_openvino(name, precision, task, batches, expected, config, built / name)
    return entries


def openvino_latency(built: Path, entries: Sequence[ParityEntry], feeds: dict[str, Feeds], length: int,
                     full: bool = False) -> dict[str, Any]:
    """``{"OpenVINO CPU <precision>": {"files": {name: percentiles per shape}, "settings": ..., ...}}`` for each
    (file, precision) whose OpenVINO parity row passed."""
    passed: dict[str, list[str]] = {}
    for entry in entries:
        if entry.provider == ENGINE and entry.status == "pass":
            passed.setdefault(entry.precision, []).append(entry.file)
    result: dict[str, Any] = {}
    for precision, names in passed.items():
        files, applied = {}, {}
        for name in names:
            session = open_compiled(built / name, hint(precision))
            applied = session.settings
            files[name] = measure_latency(built / name, ENGINE, feeds, session=session)
        result[f"{ENGINE} {precision}"] = {
            "files": files, "engine": "openvino", "precision": precision, "settings": applied,
            "sequence": length, "threads": os.cpu_count() or 1, "io_binding": False,
            "mode": "full" if full else "quick", "shapes": list(feeds)}
    return result

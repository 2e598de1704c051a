"""The artifact's manifest.json (data) and report.md (for people), and the hashes they rest on."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from exporter.report_html import engine_label, evaluation_cells, render_html, thread_grid

SCHEMA_VERSION = 1
TOOL = "export-model"
# Fields whose values legitimately differ between machines or runs; everything else is reproducible.
VARYING_FIELDS = ("created", "host", "timings", "peak_rss_mb", "latency", "source.path", "options.output", "options.model",
                  "fusion.seconds", "quantization.seconds", "quantization.search.seconds",
                  "files.report.md", "files.report.html")
_DEPENDENCIES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxscript", "numpy",
                 "openvino")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_hash(folder: Path, read: Sequence[Path] | None = None) -> dict[str, Any]:
    """sha256 over the checkpoint files the export read (names relative to `folder` and bytes, sorted), plus
    per-file hashes. `read` is `Checkpoint.files_read` (config, weight index and every shard, tokenizer files);
    None hashes the config and weight files found in `folder`."""
    if read is None:
        read = [p for p in folder.iterdir() if p.is_file() and (
            p.name == "config.json" or p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))]
    names = sorted({str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in read})
    files = {name: sha256_file(folder / name) for name in names}
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in files.items()).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def file_table(folder: Path, exclude: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude
    }


def versions() -> dict[str, str]:
    result = {"python": platform.python_version()}
    for name in _DEPENDENCIES:
        try:
            result[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            result[name] = "not installed"
    return result


def tool_version() -> str:
    try:
        return metadata.version(TOOL)
    except metadata.PackageNotFoundError:
        return "unknown"


def write_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Complete `body` with schema, versions and file hashes; write folder/report.md and report.html, then
    manifest.json (which hashes every file, the reports included)."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": TOOL, "version": tool_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "varying_fields": list(VARYING_FIELDS),
        "host": {"platform": platform.platform(), "machine": platform.machine(), "python": sys.version.split()[0]},
        "versions": versions(),
        **body,
    }
    reports = {"report.md": render_report, "report.html": render_html}
    manifest["files"] = file_table(folder, exclude=("manifest.json", *reports))
    for name, render in reports.items():
        report = folder / name
        report.write_text(render(manifest), encoding="utf-8")
        manifest["files"][name] = {"sha256": sha256_file(report), "bytes": report.stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return manifest


def render_report(manifest: dict[str, Any]) -> str:
    """A Markdown summary of the manifest, for people."""
    comp = manifest["compaction"]
    lines = [
        f"# export-model report: {manifest['source']['name']}",
        "",
        f"- task: **{manifest['task']}**, architecture: **{manifest['architecture']}**, "
        f"layer norm: {manifest['layer_norm']}, activation: {manifest['activation']}",
        f"- deployable: **{'yes' if manifest['deployable'] else 'NO (parity failed)'}**",
        f"- source sha256: `{manifest['source']['sha256'][:16]}...`",
        f"- built with transformers {manifest['versions'].get('transformers')}, torch {manifest['versions'].get('torch')}, "
        f"onnxruntime {manifest['versions'].get('onnxruntime')}, onnx {manifest['versions'].get('onnx')}",
        "",
        "## Compaction",
        "",
        comp["summary"],
        "",
        "| layer | heads (config -> checkpoint -> after) | removed heads | FFN before -> after | folded consts (attn / ffn) | params before -> after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for layer in comp["layers"]:
        removed = ", ".join(f"{h} ({why})" for h, why in layer["removed"].items()) or "-"
        lines.append(
            f"| {layer['layer']} | {layer['heads_config']} -> {len(layer['heads_before'])} -> {len(layer['heads_after'])} "
            f"| {removed} | {layer['ffn_before']} -> {layer['ffn_after']} "
            f"| {layer['folded_attention_constant']:.3g} / {layer['folded_ffn_constant']:.3g} "
            f"| {layer['params_before']:,} -> {layer['params_after']:,} |"
        )
    notes = [f"layer {layer['layer']} head {h}: {note}" for layer in comp["layers"] for h, note in layer["kept_notes"].items()]
    if notes:
        lines += ["", "Kept although partly zero:", *[f"- {n}" for n in notes]]
    fusion = manifest["fusion"]
    lines += ["", "## Fusion", "", fusion.get("summary", ""), ""]
    if fusion.get("skip_reason"):
        lines += [f"Attention not fused: {fusion['skip_reason']}", ""]
    quant = manifest["quantization"]
    lines += ["## INT8", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in quant.items() if not isinstance(v, (list, dict))]
    lines += ["", "## Parity (PyTorch reference vs each file)", "",
              "| file | provider | status | max abs err | mean cosine | task metric | tolerance | reason |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in manifest["parity"]:
        metric = ", ".join(f"{k} {v:.4f}" for k, v in e["metric"].items())
        err = f"{e['max_abs_error']:.2e}" if e["max_abs_error"] is not None else "-"
        cos = f"{e['mean_cosine']:.6f}" if e["mean_cosine"] is not None else "-"
        lines.append(f"| {e['file']} | {engine_label(e)} | {e['status']} | {err} | {cos} | {metric} | {e['tolerance']} | {e['reason'] or ''} |")
    checked = [e for e in manifest["parity"] if e.get("per_shape")]
    if checked:
        shapes = [f"{s['shape'][0]}x{s['shape'][1]}" for s in checked[0]["per_shape"]]
        lines += ["", f"Parity per batch shape (as run; max length {manifest.get('max_length', '?')}): max abs error "
                  "/ min cosine", "", "| file | provider | " + " | ".join(shapes) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in shapes) + " |"]
        lines += [f"| {e['file']} | {engine_label(e)} | " + " | ".join(
            f"{s['max_abs_error']:.2e} / {s['min_cosine']:.5f}" for s in e["per_shape"]) + " |" for e in checked]
    for provider, measured in (manifest.get("latency") or {}).items():
        shapes = list(next(iter(measured["files"].values())))
        lines += ["", f"## Latency on {provider} (p50 / p99 ms, {measured['threads']} threads, one run)", "",
                  "| file | " + " | ".join(shapes) + " | size MB |", "| --- | " + " | ".join("---" for _ in shapes) + " | --- |"]
        for name, per in measured["files"].items():
            size = manifest["files"].get(name, {}).get("bytes", 0) / 1e6
            cells = " | ".join(f"{per[s]['median_ms']:.1f} / {per[s]['p99_ms']:.1f}" for s in shapes)
            lines.append(f"| {name} | {cells} | {size:.1f} |")
        header, rows = thread_grid(measured)
        if rows:
            lines += ["", f"Thread settings on {provider} (p50 ms; peak MB = resident memory the session added)", "",
                      "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        for name, modes in measured.get("throughput", {}).items():
            lines.append(f"\n{name} throughput at batch {modes['batch']}: best is {modes['best']} "
                         f"({', '.join(f'{k} {v:.0f}' for k, v in modes.items() if k.endswith('per_s'))})")
    if manifest.get("evaluation"):
        lines += ["", *evaluation_table(manifest)]
    peaks = manifest.get("peak_rss_mb") or {}
    lines += ["", "## Stage timings and peak memory", "", "| stage | seconds | peak RSS MB |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.1f} | {peaks[k]:.0f} |" if k in peaks else f"| {k} | {v:.1f} | - |"
              for k, v in manifest["timings"].items()]
    return "\n".join(lines) + "\n"


def evaluation_table(manifest: dict[str, Any]) -> list[str]:
    header, rows = evaluation_cells(manifest)
    data = manifest.get("eval_data", {})
    lines = [f"## Accuracy on the labelled data ({data.get('path', '')}, {data.get('examples', '?')} examples)", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


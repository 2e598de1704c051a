"""`report.html`: one self-contained page (inline CSS and SVG, no scripts, no network) rendered from the manifest.

Sections: verdict, heads per layer as a grid, FFN widths, fusion per layer, the parity matrix, latency tables,
and two plots: latency vs accuracy (bubble area = file size) and latency vs batch size per provider.
"""

from __future__ import annotations

import html
from typing import Any

from graphs.core.openvino_sessions import ENGINE

# Colours are distinct per role so a rendering test can find each figure in a screenshot.
KEPT, DEAD, REQUESTED, PRUNED = "#2e8b57", "#e4572e", "#f2a541", "#9aa0a6"
BUBBLE, LINES = "#1f77b4", ("#6a3d9a", "#e7298a", "#17becf", "#bcbd22")
BASELINE = "#ff7f0e"  # the PyTorch checkpoint's bubble in the gold chart
STATUS = {"pass": "#c8f7c5", "fail": "#f7c5c5", "skip": "#eeeeee"}

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f4f4f4}h1{font-size:22px}h2{font-size:17px;margin-top:28px}.grid td{width:18px;height:18px;padding:0}
.verdict{font-size:18px;padding:8px 12px;display:inline-block}figure{display:inline-block;margin:0 24px 0 0}"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _heads_grid(compaction: dict[str, Any]) -> str:
    rows = []
    for layer in compaction["layers"]:
        cells = []
        for head in range(layer["heads_config"]):
            why = layer["removed"].get(str(head), layer["removed"].get(head))
            if head in layer["heads_after"]:
                colour, title = KEPT, "kept"
            elif head not in layer["heads_before"]:
                colour, title = PRUNED, "pruned in checkpoint (config.pruned_heads)"
            elif why and why.startswith("requested"):
                colour, title = REQUESTED, why
            else:
                colour, title = DEAD, f"removed: {why}"
            cells.append(f'<td style="background:{colour}" title="head {head}: {_e(title)}"></td>')
        rows.append(f"<tr><th>layer {layer['layer']}</th>{''.join(cells)}"
                    f"<td style='width:auto;padding:0 8px'>{len(layer['heads_after'])}/{layer['heads_config']}</td></tr>")
    legend = " ".join(f'<span style="background:{c};padding:0 8px">&nbsp;</span> {t}' for c, t in
                      ((KEPT, "kept"), (DEAD, "dead, removed"), (REQUESTED, "removed on request"), (PRUNED, "pruned in checkpoint")))
    return f"<table class='grid'>{''.join(rows)}</table><p>{legend}</p>"


def _ffn_bars(compaction: dict[str, Any]) -> str:
    layers = compaction["layers"]
    width, bar, gap = 520, 16, 6
    full = max(layer["ffn_before"] for layer in layers) or 1
    parts = []
    for i, layer in enumerate(layers):
        y = 10 + i * (bar + gap)
        parts.append(f'<rect x="70" y="{y}" width="{(width - 90) * layer["ffn_before"] / full:.1f}" height="{bar}" fill="#ddd"/>')
        parts.append(f'<rect x="70" y="{y}" width="{(width - 90) * layer["ffn_after"] / full:.1f}" height="{bar}" fill="{KEPT}"/>')
        parts.append(f'<text x="4" y="{y + 12}" font-size="11">layer {layer["layer"]}</text>')
        parts.append(f'<text x="{width - 16}" y="{y + 12}" font-size="11" text-anchor="end">{layer["ffn_after"]}/{layer["ffn_before"]}</text>')
    height = 20 + len(layers) * (bar + gap)
    return f'<svg id="ffn-widths" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def _axes(w: int, h: int, xlabel: str, ylabel: str, xmin: float, xmax: float, ymin: float, ymax: float) -> list[str]:
    parts = [f'<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>',
             f'<line x1="60" y1="{h - 40}" x2="{w - 10}" y2="{h - 40}" stroke="#333"/>',
             f'<line x1="60" y1="10" x2="60" y2="{h - 40}" stroke="#333"/>',
             f'<text x="{w / 2}" y="{h - 8}" font-size="12" text-anchor="middle">{_e(xlabel)}</text>',
             f'<text x="14" y="{h / 2}" font-size="12" transform="rotate(-90 14 {h / 2})" text-anchor="middle">{_e(ylabel)}</text>',
             f'<text x="60" y="{h - 26}" font-size="10" text-anchor="middle">{xmin:.3g}</text>',
             f'<text x="{w - 10}" y="{h - 26}" font-size="10" text-anchor="end">{xmax:.3g}</text>',
             f'<text x="56" y="{h - 40}" font-size="10" text-anchor="end">{ymin:.4g}</text>',
             f'<text x="56" y="18" font-size="10" text-anchor="end">{ymax:.4g}</text>']
    return parts


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / ((high - low) or 1.0) * (end - start)


def _bubble_plot(manifest: dict[str, Any]) -> str:
    """Latency at the largest batch vs mean cosine to PyTorch; bubble area = file size."""
    cpu = manifest.get("latency", {}).get("CPUExecutionProvider")
    if not cpu:
        return "<p>no CPU latency measured</p>"
    shape = list(next(iter(cpu["files"].values())))[-1]
    cosines = {e["file"]: e["mean_cosine"] for e in manifest["parity"] if e["provider"] == "CPUExecutionProvider"}
    points = [(name, per[shape]["median_ms"], cosines.get(name) or 0.0, manifest["files"][name]["bytes"] / 1e6)
              for name, per in cpu["files"].items()]
    w, h = 520, 320
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    xmin, xmax = 0.0, max(xs) * 1.15
    ymin = min(min(ys) - 0.002, 0.99)
    ymax = 1.0 + (1.0 - ymin) * 0.12  # headroom so the FP32 bubbles at cosine 1.0 are not clipped
    parts = _axes(w, h, f"latency {shape} (p50 ms)", "mean cosine to PyTorch", xmin, xmax, ymin, ymax)
    biggest = max(p[3] for p in points) or 1.0
    for name, x, y, size in points:
        cx, cy = _scale(x, xmin, xmax, 60, w - 10), _scale(y, ymin, ymax, h - 40, 10)
        r = 6 + 22 * (size / biggest) ** 0.5
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="{BUBBLE}" fill-opacity="0.75" stroke="{BUBBLE}" stroke-width="2"/>')
        parts.append(f'<text x="{cx + r + 3:.1f}" y="{cy + 4:.1f}" font-size="11">{_e(name)} ({size:.0f} MB)</text>')
    return f'<svg id="latency-vs-accuracy" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def evaluation_cells(manifest: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the gold evaluation: size, latency mean +- std per model call, the metric (SQuAD EM / F1
    in percent, the rest as fractions), the change from the PyTorch checkpoint."""
    rows = manifest.get("evaluation") or []
    if not rows:
        return [], []
    metric = rows[0]["metric"]
    base = next((r["value"] for r in rows if r["file"] == "pytorch"), None)
    batch = rows[0].get("batch_size")
    header = ["file", "provider", "size MB", f"latency ms per call (batch {batch}), mean +- std", metric,
              "vs PyTorch", "examples"]
    if manifest["task"] == "question-answering":
        header.insert(4, "exact_match")
    table = []
    for row in rows:
        mean, std = row.get("latency_ms_mean"), row.get("latency_ms_std")
        cells = [row["file"], row["provider"], f"{row['size_mb']:.1f}",
                 "-" if mean is None else f"{mean:.2f} +- {std:.2f}", f"{row['value']:.4f}",
                 "-" if base is None or row["file"] == "pytorch" else f"{row['value'] - base:+.4f}",
                 str(row["examples"])]
        if manifest["task"] == "question-answering":
            cells.insert(4, f"{row['metrics']['exact_match']:.2f}")
        table.append(cells)
    return header, table


def _gold_bubbles(manifest: dict[str, Any]) -> str:
    """Latency per call (mean) vs the gold metric, one bubble per (file, provider) and the PyTorch checkpoint;
    bubble area = size."""
    rows = [r for r in manifest.get("evaluation") or [] if r.get("latency_ms_mean") is not None]
    if not rows:
        return ""
    metric = rows[0]["metric"]
    w, h = 640, 340
    xs, ys = [r["latency_ms_mean"] for r in rows], [r["value"] for r in rows]
    xmin, xmax = 0.0, max(xs) * 1.5  # room for the labels right of the slowest bubble
    spread = (max(ys) - min(ys)) or abs(max(ys)) * 0.05 or 1.0
    ymin, ymax = min(ys) - spread * 0.3, max(ys) + spread * 0.3
    parts = _axes(w, h, f"latency per call (mean ms, batch {rows[0].get('batch_size')})", metric, xmin, xmax, ymin, ymax)
    biggest = max(r["size_mb"] for r in rows) or 1.0
    for row in rows:
        cx, cy = _scale(row["latency_ms_mean"], xmin, xmax, 60, w - 10), _scale(row["value"], ymin, ymax, h - 40, 10)
        radius = 4 + 26 * (row["size_mb"] / biggest) ** 0.5  # area proportional to size
        colour = BASELINE if row["file"] == "pytorch" else BUBBLE
        opacity = 1.0 if row["file"] == "pytorch" else 0.6  # the baseline drawn first, opaque, under the files
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius:.1f}" fill="{colour}" fill-opacity="{opacity}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        provider = "" if row["file"] == "pytorch" else f" · {row['provider'].replace('ExecutionProvider', '')}"
        parts.append(f'<text x="{cx + radius + 3:.1f}" y="{cy + 4:.1f}" font-size="11">{_e(row["file"] + provider)} '
                     f'({row["size_mb"]:.0f} MB)</text>')
    return (f'<svg id="gold-bubbles" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">'
            f'{"".join(parts)}</svg>')


def _batch_plot(provider: str, measured: dict[str, Any]) -> str:
    files = measured["files"]
    shapes = list(next(iter(files.values())))
    batches = [int(s[1:].split("x")[0]) for s in shapes]
    w, h = 520, 320
    ymax = max(per[s]["median_ms"] for per in files.values() for s in shapes) * 1.1
    parts = _axes(w, h, "batch size", f"p50 ms on {provider}", min(batches), max(batches), 0.0, ymax)
    for index, (name, per) in enumerate(files.items()):
        colour = LINES[index % len(LINES)]
        coords = [(_scale(b, min(batches), max(batches), 60, w - 10), _scale(per[s]["median_ms"], 0.0, ymax, h - 40, 10))
                  for b, s in zip(batches, shapes, strict=True)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="3" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>' for x, y in coords]
        parts.append(f'<text x="70" y="{24 + 14 * index}" font-size="11" fill="{colour}">{_e(name)}</text>')
    return f'<svg class="latency-vs-batch" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def thread_grid(measured: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of p50 ms per file at each thread setting of ``by_threads`` and at all threads, with the
    peak memory at the largest shape; no rows when only one thread setting was measured."""
    by_threads = measured.get("by_threads") or {}
    if not by_threads:
        return [], []
    settings = [*sorted(by_threads, key=int), str(measured["threads"])]
    shapes = list(next(iter(next(iter(by_threads.values())).values())))
    header = ["file"] + [f"{shape} @{threads} thr" for shape in shapes for threads in settings] + ["peak MB"]
    rows = []
    for name, per in measured["files"].items():
        cells = []
        for shape in shapes:
            for threads in settings:
                source = per if threads == str(measured["threads"]) else by_threads[threads].get(name, {})
                cells.append(f"{source[shape]['median_ms']:.1f}" if shape in source else "-")
        peak = per[shapes[-1]].get("peak_mb") if shapes[-1] in per else None
        rows.append([name, *cells, "-" if peak is None else f"{peak:.0f}"])
    return header, rows


def render_html(manifest: dict[str, Any]) -> str:
    comp, fusion = manifest["compaction"], manifest["fusion"]
    deployable = manifest["deployable"]
    verdict = (f"<div class='verdict' style='background:{STATUS['pass' if deployable else 'fail']}'>"
               f"{'deployable: every parity check passed' if deployable else 'NOT deployable: parity failed'}</div>")
    parity_rows = [[e["file"], _e(engine_label(e)), f"<span style='background:{STATUS[e['status']]};padding:0 6px'>{e['status']}</span>",
                    f"{e['max_abs_error']:.2e}" if e["max_abs_error"] is not None else "-",
                    f"{e['mean_cosine']:.6f}" if e["mean_cosine"] is not None else "-",
                    _e(", ".join(f"{k} {v:.4f}" for k, v in e["metric"].items())), _e(e["tolerance"]),
                    _e(" ".join(filter(None, [e["reason"], e.get("first_divergence")])))] for e in manifest["parity"]]
    fusion_rows = [[str(layer["layer"]), str(layer["expected_heads"]), str(layer["attention_heads"]),
                    ", ".join(f"{k} {v}" for k, v in layer["ops"].items())] for layer in fusion["layers"]]
    latency_html = []
    for provider, measured in (manifest.get("latency") or {}).items():
        shapes = list(next(iter(measured["files"].values())))
        rows = [[name] + [f"{per[s]['median_ms']:.1f} / {per[s]['p90_ms']:.1f} / {per[s]['p99_ms']:.1f}" for s in shapes]
                for name, per in measured["files"].items()]
        latency_html.append(f"<h3>{_e(provider)} ({measured['threads']} threads), p50 / p90 / p99 ms</h3>"
                            + _table(["file", *shapes], rows) + f"<figure>{_batch_plot(provider, measured)}</figure>")
        header, grid = thread_grid(measured)
        if grid:
            latency_html.append(f"<h3>{_e(provider)}: thread settings, p50 ms (peak MB = resident memory the "
                                f"session added)</h3>" + _table(header, grid))
        for name, modes in measured.get("throughput", {}).items():
            latency_html.append(f"<p>{_e(name)} at batch {modes['batch']}: best serving mode is <b>{_e(modes['best'])}</b></p>")
    gold_html = ""
    if manifest.get("evaluation"):
        header, rows = evaluation_cells(manifest)
        data = manifest.get("eval_data", {})
        gold_html = (f"<h2>Accuracy on the labelled data</h2><p>{_e(data.get('path', ''))}: {data.get('examples')} "
                     f"examples ({_e(data.get('format', ''))})</p>" + _table(header, rows)
                     + f"<figure>{_gold_bubbles(manifest)}<figcaption>latency vs {_e(header[-3])}; bubble area = "
                     "size; the orange bubble is the PyTorch checkpoint</figcaption></figure>")
    quant = manifest["quantization"]
    quant_rows = [[k, str(v)] for k, v in quant.items() if not isinstance(v, (list, dict))]
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>export-model report: {_e(manifest['source']['name'])}</title>
<style>{_CSS}</style></head><body>
<h1>export-model report: {_e(manifest['source']['name'])}</h1>
{verdict}
<p>task <b>{_e(manifest['task'])}</b>, architecture <b>{_e(manifest['architecture'])}</b>, layer norm {_e(manifest['layer_norm'])},
activation {_e(manifest['activation'])}; source sha256 <code>{_e(manifest['source']['sha256'][:16])}…</code>;
built by export-model {_e(manifest['tool']['version'])} with transformers {_e(manifest['versions'].get('transformers'))},
torch {_e(manifest['versions'].get('torch'))}, onnxruntime {_e(manifest['versions'].get('onnxruntime'))}</p>
<h2>What was removed</h2><p>{_e(comp['summary'])}</p>
<h3>Attention heads per layer</h3>{_heads_grid(comp)}
<h3>FFN width per layer (kept / original)</h3>{_ffn_bars(comp)}
<h2>What fused</h2><p>{_e(fusion.get('summary', ''))}</p>{_table(['layer', 'expected heads', 'Attention heads', 'fused ops'], fusion_rows)}
<h2>Parity: every file against the PyTorch reference</h2>{_table(['file', 'provider', 'status', 'max abs error', 'mean cosine', 'task metric', 'tolerance', 'reason'], parity_rows, raw=True)}
{gold_html}
<h2>Latency vs accuracy</h2><figure>{_bubble_plot(manifest)}</figure>
<h2>Latency</h2>{''.join(latency_html)}
<h2>INT8</h2>{_table(['setting', 'value'], quant_rows)}
<h2>Stage timings (s)</h2>{_table(['stage', 'seconds'], [[k, f'{v:.1f}'] for k, v in manifest['timings'].items()])}
</body></html>
"""


def engine_label(entry: dict[str, Any]) -> str:
    """A parity row's provider as the reports show it: OpenVINO's rows with their precision ("OpenVINO CPU bf16")."""
    return f"{entry['provider']} {entry['precision']}" if entry["provider"] == ENGINE else entry["provider"]

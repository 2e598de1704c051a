"""`report.html`: one self-contained page (inline CSS and SVG, no scripts, no network) rendered from the manifest.

Sections: verdict, heads per layer as a grid, FFN widths, fusion per layer, the parity matrix (an engine that
skipped every file, such as CUDA in a CPU-only build, in one row), latency tables, and the plots of
exporter/report_plots.py: latency vs accuracy and latency per shape, one series per (file, engine, precision).
"""

from __future__ import annotations

import html
from typing import Any

from exporter.report_plots import (
    DEAD,
    KEPT,
    PRUNED,
    REQUESTED,
    engine_label,
    ffn_widths,
    gold_bubbles,
    latency_vs_accuracy,
    latency_vs_batch,
)

STATUS = {"pass": "#c8f7c5", "fail": "#f7c5c5", "skip": "#eeeeee"}

_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f4f4f4}h1{font-size:22px}h2{font-size:17px;margin-top:28px}.grid td{width:18px;height:18px;padding:0}
.verdict{font-size:18px;padding:8px 12px;display:inline-block}figure{margin:0 0 12px 0}
svg.plot{max-width:100%;height:auto}"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """A table; a row of one cell spans the whole width (a summary line among the rows)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    span = f" colspan='{len(header)}'" if len(header) > 1 else ""
    body = "".join("<tr>" + "".join(f"<td{span if len(row) == 1 else ''}>{c if raw else _e(c)}</td>" for c in row)
                   + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


ACCURACY_CAPTION = ("one point per (file, engine, precision): p50 latency against 1 &minus; mean cosine to the "
                    "PyTorch outputs on the parity inputs (log scale; an exact match is drawn at 1e-16); colour = "
                    "file, marker = engine and precision")
BATCH_CAPTION = "one line per (file, engine, precision): p50 latency at each measured shape; the tables below " \
                "give p50 / p90 / p99"


def _figure(svg: str, caption: str, missing: str) -> str:
    """A plot with its caption (raw HTML), or a line saying why there is none."""
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>" if svg else f"<p>{_e(missing)}</p>"


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


def _status(status: str) -> str:
    """A parity status as a coloured badge."""
    return f"<span style='background:{STATUS[status]};padding:0 6px'>{status}</span>"


def absent_engines(parity: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The engines that skipped every file (a provider not in this build, bf16 on a CPU without it), each with its
    rows: a whole provider when all its rows skipped, else a whole engine label. A lone row (one file, or one
    "every file" row) is already one line and stays as it is."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for key in (lambda e: e["provider"], engine_label):
        for entry in parity:
            if not any(entry in rows for rows in groups.values()):
                groups.setdefault(key(entry), []).append(entry)
        groups = {name: rows for name, rows in groups.items()
                  if len(rows) > 1 and all(e["status"] == "skip" for e in rows)}
    return groups


def parity_rows(parity: list[dict[str, Any]]) -> list[list[str]]:
    """The parity table's rows (HTML cells): one per (file, engine), except an absent engine, which gets one
    full-width line for all its files with its reasons (each reason once, with its files when they differ)."""
    absent = absent_engines(parity)
    rows, done = [], set()
    for e in parity:
        name = next((n for n, group in absent.items() if e in group), None)
        if name is None:
            rows.append([_e(e["file"]), _e(engine_label(e)), _status(e["status"]),
                         f"{e['max_abs_error']:.2e}" if e["max_abs_error"] is not None else "-",
                         f"{e['mean_cosine']:.6f}" if e["mean_cosine"] is not None else "-",
                         _e(", ".join(f"{k} {v:.4f}" for k, v in e["metric"].items())), _e(e["tolerance"]),
                         _e(" ".join(filter(None, [e["reason"], e.get("first_divergence")])))])
        elif name not in done:
            done.add(name)
            group = absent[name]
            reasons: dict[str, list[str]] = {}
            for entry in group:
                reasons.setdefault(entry["reason"] or "no reason given", []).append(entry["file"])
            why = "; ".join(reason if len(reasons) == 1 else f"{', '.join(files)}: {reason}"
                            for reason, files in reasons.items())
            files = f"all {len(group)} files" if len(group) > 1 else group[0]["file"]
            rows.append([f"{_status('skip')} <b>{_e(name)}</b>: skipped for {_e(files)}: {_e(why)}"])
    return rows


def render_html(manifest: dict[str, Any]) -> str:
    """The whole page, from the manifest alone."""
    comp, fusion = manifest["compaction"], manifest["fusion"]
    deployable = manifest["deployable"]
    verdict = (f"<div class='verdict' style='background:{STATUS['pass' if deployable else 'fail']}'>"
               f"{'deployable: every parity check passed' if deployable else 'NOT deployable: parity failed'}</div>")
    fusion_rows = [[str(layer["layer"]), str(layer["expected_heads"]), str(layer["attention_heads"]),
                    ", ".join(f"{k} {v}" for k, v in layer["ops"].items())] for layer in fusion["layers"]]
    latency_html = []
    for provider, measured in (manifest.get("latency") or {}).items():
        shapes = list(next(iter(measured["files"].values())))
        rows = [[name] + [f"{per[s]['median_ms']:.1f} / {per[s]['p90_ms']:.1f} / {per[s]['p99_ms']:.1f}" for s in shapes]
                for name, per in measured["files"].items()]
        latency_html.append(f"<h3>{_e(provider)} ({measured['threads']} threads), p50 / p90 / p99 ms</h3>"
                            + _table(["file", *shapes], rows))
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
                     + f"<figure>{gold_bubbles(manifest)}<figcaption>latency vs {_e(header[-3])}; bubble area = "
                     "size; the orange bubble is the PyTorch checkpoint; the bar is one standard deviation"
                     "</figcaption></figure>")
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
<h3>FFN width per layer (kept / original)</h3><figure>{ffn_widths(comp)}</figure>
<h2>What fused</h2><p>{_e(fusion.get('summary', ''))}</p>{_table(['layer', 'expected heads', 'Attention heads', 'fused ops'], fusion_rows)}
<h2>Parity: every file against the PyTorch reference</h2>{_table(['file', 'provider', 'status', 'max abs error', 'mean cosine', 'task metric', 'tolerance', 'reason'], parity_rows(manifest['parity']), raw=True)}
{gold_html}
<h2>Latency vs accuracy</h2>{_figure(latency_vs_accuracy(manifest), ACCURACY_CAPTION, "no latency measured")}
<h2>Latency</h2>{_figure(latency_vs_batch(manifest), BATCH_CAPTION, "no latency measured")}{''.join(latency_html)}
<h2>INT8</h2>{_table(['setting', 'value'], quant_rows)}
<h2>Stage timings (s)</h2>{_table(['stage', 'seconds'], [[k, f'{v:.1f}'] for k, v in manifest['timings'].items()])}
</body></html>
"""


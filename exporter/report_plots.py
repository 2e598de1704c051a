"""The figures of `report.html`, drawn with matplotlib and returned as inline SVG text.

matplotlib is imported inside the functions (the object API, `matplotlib.figure.Figure`, no pyplot and no display)
so `import exporter` stays fast and the deployment side never sees it. Each figure is one `<svg>` element with an
id, its text kept as text (readable and searchable in the page) and its internal ids salted with that id, so that
several figures in one page never share a definition. A series is one (file, engine, precision): the colour names
the file, the marker and line style the engine and precision, and the legend spells out each series.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from typing import Any

from graphs.core.openvino_sessions import ENGINE

# The report's palette. The heads grid and FFN bars use the role colours; every plotted series takes the colour
# of its file from FILES (no orange in it: orange marks the PyTorch checkpoint in the gold chart only).
KEPT, DEAD, REQUESTED, PRUNED = "#2e8b57", "#e4572e", "#f2a541", "#9aa0a6"
FILES = ("#1f77b4", "#6a3d9a", "#e7298a", "#17becf", "#bcbd22", "#8c564b", "#393b79")
BASELINE = "#ff7f0e"  # the PyTorch checkpoint in the gold chart
MARKERS, LINESTYLES = ("o", "s", "^", "v", "D", "P", "X"), ("-", "--", ":", "-.")
FLOOR = 1e-16  # 1 - cosine is drawn on a log axis; an exact match (0) is drawn here


def engine_label(entry: dict[str, Any]) -> str:
    """A parity row's provider as the reports show it: OpenVINO's rows with their precision ("OpenVINO CPU bf16"),
    which is also how the manifest's ``latency`` keys name OpenVINO's runs."""
    return f"{entry['provider']} {entry['precision']}" if entry["provider"] == ENGINE else entry["provider"]


@contextlib.contextmanager
def _style(salt: str) -> Iterator[None]:
    """Small legible type, text kept as SVG text, and the SVG ids salted per figure (also makes the page
    reproducible: the default salt is random)."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9,
                                "axes.titlesize": 10, "legend.fontsize": 8, "axes.grid": True,
                                "grid.color": "#dddddd", "grid.linewidth": 0.6, "axes.axisbelow": True}):
        yield


def _figure(width: float, height: float) -> Any:
    """A figure (inches) that lays itself out so labels and legends are never cut."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(figure: Any, element_id: str) -> str:
    """The figure as one `<svg id=...>` element: no XML prologue, no DOCTYPE, no metadata block, and every id
    inside it prefixed with `element_id`."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # matplotlib numbers its elements per figure ("axes_1", "line2d_3"): prefixed, ids stay unique in the page.
    text = re.sub(r'(\bid="|url\(#|href="#)', rf"\g<1>{element_id}-", text)
    return text.replace("<svg", f'<svg id="{element_id}" class="plot"', 1)


def _shape_key(shape: str) -> tuple[int, int]:
    """(tokens per call, batch) of a shape named like "b8xs128", to order the batch axis by work done."""
    match = re.fullmatch(r"b(\d+)xs(\d+)", shape)
    if not match:
        return (0, 0)
    batch, sequence = int(match[1]), int(match[2])
    return (batch * sequence, batch)


def _engine(key: str, measured: dict[str, Any]) -> str:
    """The engine of a latency key without its precision, shortened: "CPU", "CUDA", "OpenVINO CPU"."""
    precision = measured.get("precision")
    if precision and key.endswith(f" {precision}"):
        key = key[: -len(precision) - 1]
    return key.replace("ExecutionProvider", "")


def latency_series(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (file, engine, precision) timed in the manifest's ``latency``: its label, the latency per
    shape, the matching parity row (None when there is none), and its colour, marker and line style."""
    parity = {(e["file"], engine_label(e)): e for e in manifest.get("parity") or []}
    files: list[str] = []
    series = []
    for index, (key, measured) in enumerate((manifest.get("latency") or {}).items()):
        for name, per in measured["files"].items():
            if name not in files:
                files.append(name)
            entry = parity.get((name, key))
            precision = measured.get("precision") or (entry or {}).get("precision") or ""
            series.append({"file": name, "engine": _engine(key, measured), "precision": precision,
                           "label": " ".join(filter(None, [f"{name} · {_engine(key, measured)}", precision])),
                           "per": per, "parity": entry, "colour": FILES[files.index(name) % len(FILES)],
                           "marker": MARKERS[index % len(MARKERS)], "linestyle": LINESTYLES[index % len(LINESTYLES)]})
    return series


def _log_if_wide(axes: Any, which: str, values: list[float], ratio: float = 8.0) -> None:
    """A log scale on axis `which` ("x" or "y") where the values span more than `ratio` (a linear one would crush
    the fast ones together), with ticks at 1, 2 and 5 times the powers of ten, labelled as plain numbers (0.2,
    50) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > ratio:
        (axes.set_xscale if which == "x" else axes.set_yscale)("log")
        axis = axes.xaxis if which == "x" else axes.yaxis
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(NullFormatter())


def _legend_outside(axes: Any, handles: list[Any] | None = None) -> None:
    """The legend right of the axes: each series named once, never over the data."""
    kwargs = {"handles": handles} if handles is not None else {}
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, **kwargs)


def ffn_widths(compaction: dict[str, Any]) -> str:
    """Kept FFN units per layer as horizontal bars over the original width (grey), kept / original at the end."""
    layers = compaction["layers"]
    with _style("ffn-widths"):
        figure = _figure(6.5, 0.8 + 0.26 * len(layers))
        axes = figure.add_subplot()
        names = [f"layer {layer['layer']}" for layer in layers]
        positions = range(len(layers))
        axes.barh(positions, [layer["ffn_before"] for layer in layers], color="#dddddd", height=0.7,
                  label="original")
        axes.barh(positions, [layer["ffn_after"] for layer in layers], color=KEPT, height=0.7, label="kept")
        for position, layer in zip(positions, layers, strict=True):
            axes.annotate(f"{layer['ffn_after']}/{layer['ffn_before']}", (layer["ffn_before"], position),
                          xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        axes.set_yticks(list(positions), names)
        axes.invert_yaxis()
        axes.set_xlabel("FFN units")
        axes.set_xlim(0, max(layer["ffn_before"] for layer in layers) * 1.15 or 1)
        axes.grid(axis="y", visible=False)
        _legend_outside(axes)
        return _svg(figure, "ffn-widths")


def latency_vs_accuracy(manifest: dict[str, Any]) -> str:
    """Per (file, engine, precision): p50 latency against 1 - mean cosine to PyTorch (log: fp32, bf16 and int8
    sit decades apart), at the first measured shape and the largest; an empty string with nothing to draw."""
    from matplotlib.colors import to_rgba

    series = [s for s in latency_series(manifest) if s["parity"] and s["parity"].get("mean_cosine") is not None]
    if not series:
        return ""
    shapes = list(dict.fromkeys(shape for s in series for shape in s["per"]))
    panels = list(dict.fromkeys([shapes[0], max(shapes, key=_shape_key)]))
    with _style("latency-vs-accuracy"):
        figure = _figure(4.2 + 3.3 * len(panels), 3.8)
        axes_list = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
        for axes, shape in zip(axes_list, panels, strict=True):
            drawn = [s for s in series if shape in s["per"]]
            for s in drawn:
                distance = max(1.0 - s["parity"]["mean_cosine"], FLOOR)
                failed = s["parity"]["status"] == "fail"
                axes.plot([s["per"][shape]["median_ms"]], [distance], linestyle="none", marker=s["marker"],
                          markersize=9, markerfacecolor=to_rgba(s["colour"], 0.45),  # overlaps stay visible
                          markeredgecolor="#d62728" if failed else s["colour"], markeredgewidth=1.6,
                          label=s["label"] + (" (parity FAILED)" if failed else ""))
            axes.set_yscale("log")
            _log_if_wide(axes, "x", [s["per"][shape]["median_ms"] for s in drawn])
            axes.margins(x=0.12, y=0.15)
            axes.set_xlabel(f"p50 latency, ms ({shape})")
            axes.set_title(f"shape {shape}")
        axes_list[0].set_ylabel("1 − mean cosine to PyTorch (lower is better)")
        _legend_outside(axes_list[-1])
        return _svg(figure, "latency-vs-accuracy")


def latency_vs_batch(manifest: dict[str, Any]) -> str:
    """Per (file, engine, precision) one line of p50 latency over the measured shapes, ordered by tokens per
    call (batch x sequence), so a line never doubles back; an empty string when nothing was timed."""
    series = latency_series(manifest)
    if not series:
        return ""
    shapes = sorted(dict.fromkeys(shape for s in series for shape in s["per"]), key=_shape_key)
    with _style("latency-vs-batch"):
        figure = _figure(9.5, 4.2)
        axes = figure.add_subplot()
        values = []
        for s in series:
            points = [(shapes.index(shape), s["per"][shape]["median_ms"]) for shape in shapes if shape in s["per"]]
            values += [ms for _, ms in points]
            axes.plot([x for x, _ in points], [ms for _, ms in points], color=s["colour"], marker=s["marker"],
                      linestyle=s["linestyle"], linewidth=1.6, markersize=6, label=s["label"])
        axes.set_xticks(range(len(shapes)),
                        [f"{shape}\n{_shape_key(shape)[0]} tokens" if _shape_key(shape)[0] else shape
                         for shape in shapes])
        _log_if_wide(axes, "y", values)
        if axes.get_yscale() == "linear":
            axes.set_ylim(bottom=0)
        axes.set_xlabel("shape (batch x sequence), ordered by tokens per call")
        axes.set_ylabel("p50 latency, ms")
        _legend_outside(axes)
        return _svg(figure, "latency-vs-batch")


def gold_bubbles(manifest: dict[str, Any]) -> str:
    """Mean latency per call (with its standard deviation) against the gold metric, one bubble per (file,
    provider) and the PyTorch checkpoint; bubble area = size. An empty string when nothing was timed."""
    from matplotlib.lines import Line2D

    rows = [r for r in manifest.get("evaluation") or [] if r.get("latency_ms_mean") is not None]
    if not rows:
        return ""
    files = list(dict.fromkeys(r["file"] for r in rows if r["file"] != "pytorch"))
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["file"] != "pytorch"))
    biggest = max(r["size_mb"] for r in rows) or 1.0
    with _style("gold-bubbles"):
        figure = _figure(9.0, 4.2)
        axes = figure.add_subplot()
        handles = []
        for row in sorted(rows, key=lambda r: -r["size_mb"]):  # the biggest first, under the others
            baseline = row["file"] == "pytorch"
            colour = BASELINE if baseline else FILES[files.index(row["file"]) % len(FILES)]
            marker = "o" if baseline else MARKERS[providers.index(row["provider"]) % len(MARKERS)]
            provider = row["provider"].replace("ExecutionProvider", "")
            label = f"{row['file']} · {provider} ({row['size_mb']:.0f} MB)"
            axes.errorbar([row["latency_ms_mean"]], [row["value"]], xerr=[row.get("latency_ms_std") or 0.0],
                          color=colour, linewidth=1, capsize=3, zorder=1)
            axes.scatter([row["latency_ms_mean"]], [row["value"]], s=60 + 500 * row["size_mb"] / biggest,
                         color=colour, marker=marker, alpha=1.0 if baseline else 0.7, edgecolors="white",
                         linewidths=0.8, zorder=2)
            handles.append(Line2D([], [], linestyle="none", marker=marker, markersize=8, color=colour, label=label))
        _log_if_wide(axes, "x", [r["latency_ms_mean"] for r in rows])
        axes.margins(x=0.15, y=0.2)
        axes.set_xlabel(f"latency per call, mean ms (batch {rows[0].get('batch_size')})")
        axes.set_ylabel(rows[0]["metric"])
        _legend_outside(axes, handles)
        return _svg(figure, "gold-bubbles")

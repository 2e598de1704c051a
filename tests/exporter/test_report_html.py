"""report.html opens in headless Chromium and renders its figures (checked in a screenshot's pixels)."""

from __future__ import annotations

import html as html_lib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.report_html import absent_engines, render_html
from exporter.report_plots import DEAD, FILES, KEPT, PRUNED
from tests.exporter.test_cli import exported  # noqa: F401  (module-scoped fixture: one export)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def _count(image: object, colour: tuple[int, int, int], tolerance: int = 12) -> int:
    pixels = np.asarray(image, dtype=np.int16)[..., :3]
    return int((np.abs(pixels - np.array(colour)) <= tolerance).all(axis=-1).sum())


def _screenshot(report: Path, png: Path, tmp_path: Path) -> None:
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600", f"--screenshot={png}",
         report.as_uri()],
        check=True, capture_output=True, timeout=120,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium); .ci/run installs it")
def test_report_renders_its_figures(exported: tuple[Path, Path, int], tmp_path: Path) -> None:  # noqa: F811
    from PIL import Image

    _, out, code = exported
    assert code == 0
    png = tmp_path / "report.png"
    _screenshot(out / "report.html", png, tmp_path)
    image = Image.open(png).convert("RGB").resize((600, 1300))
    assert _count(image, _rgb(KEPT)) > 200  # heads grid and FFN bars
    assert _count(image, _rgb(FILES[0]), tolerance=40) > 100  # the first file's points and lines


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium); .ci/run installs it")
def test_screenshot_check_can_fail(exported: tuple[Path, Path, int], tmp_path: Path) -> None:  # noqa: F811
    """Guards the test above: a page without the figures has none of their colours."""
    from PIL import Image

    _, out, _ = exported
    html = (out / "report.html").read_text()
    stripped = tmp_path / "report.html"
    cut = html[: html.index("<h3>Attention heads per layer")] + "</body></html>"
    stripped.write_text(cut)
    png = tmp_path / "stripped.png"
    _screenshot(stripped, png, tmp_path)
    image = Image.open(png).convert("RGB").resize((600, 1300))
    assert _count(image, _rgb(KEPT)) == 0 and _count(image, _rgb(FILES[0]), tolerance=40) == 0


def test_report_is_self_contained(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    _, out, _ = exported
    html = (out / "report.html").read_text()
    assert_self_contained(html)
    for name in ("ffn-widths", "latency-vs-accuracy", "latency-vs-batch"):
        assert f'<svg id="{name}"' in html
    for colour in (KEPT, DEAD, PRUNED):
        assert colour in html


# ----- the page from a hand-made manifest (no export): series, collapsed skips, self-containment -----

SHAPES = ("b1xs128", "b8xs128", "b1xs512")


def _times(scale: float) -> dict[str, dict[str, float]]:
    return {shape: {"median_ms": scale * (i + 1), "p90_ms": scale * (i + 1.2), "p99_ms": scale * (i + 1.5)}
            for i, shape in enumerate(SHAPES)}


def _row(file: str, provider: str, precision: str, status: str, cosine: float | None = None,
         reason: str | None = None) -> dict[str, Any]:
    return {"file": file, "provider": provider, "precision": precision, "status": status, "mean_cosine": cosine,
            "max_abs_error": None if cosine is None else 1e-5, "metric": {}, "tolerance": "mean_cosine >= 0.99",
            "reason": reason}


def synthetic_manifest(bf16: bool = True) -> dict[str, Any]:
    """Three files on CPU, two on OpenVINO fp32 (and bf16 when `bf16`, else its rows skip), the int8 one refused
    by OpenVINO, CUDA absent for every file (with two different reasons)."""
    cuda = "not available in this onnxruntime build; install onnxruntime-gpu"
    parity = [_row("model_fp16.onnx", "CUDAExecutionProvider", "fp16", "skip", reason="CUDA absent, not built")]
    latency: dict[str, Any] = {"CPUExecutionProvider": {"threads": 2, "files": {}}}
    for engine in ("fp32", "bf16", "int8"):
        latency[f"OpenVINO CPU {engine}"] = {"threads": 2, "precision": engine, "engine": "openvino", "files": {}}
    for index, (name, precision) in enumerate((("model.onnx", "fp32"), ("model_optimized.onnx", "fp32"),
                                               ("model_quantized.onnx", "int8"))):
        parity += [_row(name, "CUDAExecutionProvider", precision, "skip", reason=cuda),
                   _row(name, "CPUExecutionProvider", precision, "pass", 1.0 - 10.0 ** (-12 + 9 * (precision == "int8")))]
        latency["CPUExecutionProvider"]["files"][name] = _times(10.0 + index)
        if precision == "int8":
            parity.append(_row(name, "OpenVINO CPU", "int8", "skip", reason="OpenVINO cannot read it: QAttention"))
            continue
        parity.append(_row(name, "OpenVINO CPU", "fp32", "pass", 1.0 - 1e-13))
        parity.append(_row(name, "OpenVINO CPU", "bf16", "pass" if bf16 else "skip", 1.0 - 1e-5 if bf16 else None,
                           None if bf16 else "this CPU has no bf16"))
        latency["OpenVINO CPU fp32"]["files"][name] = _times(8.0 + index)
        if bf16:
            latency["OpenVINO CPU bf16"]["files"][name] = _times(5.0 + index)
    latency = {key: value for key, value in latency.items() if value["files"]}
    layers = [{"layer": i, "heads_config": 2, "heads_before": [0, 1], "heads_after": [0, 1 - i][: 2 - i],
               "removed": {} if i == 0 else {"1": "value weights zero"}, "ffn_before": 64, "ffn_after": 64 - 16 * i}
              for i in range(2)]
    return {"compaction": {"layers": layers, "summary": "1 head removed"},
            "fusion": {"layers": [{"layer": 0, "expected_heads": 2, "attention_heads": 2, "ops": {"Attention": 1}}],
                       "summary": "fused"},
            "deployable": True, "parity": parity, "latency": latency, "task": "feature-extraction",
            "architecture": "bert", "layer_norm": "layer_norm", "activation": "gelu",
            "source": {"name": "tiny", "sha256": "0" * 64}, "tool": {"version": "0"}, "versions": {},
            "quantization": {"format": "QDQ"}, "timings": {"load": 0.1}, "files": {}}


def _svg(html: str, element_id: str) -> str:
    match = re.search(rf'<svg id="{element_id}".*?</svg>', html, flags=re.S)
    assert match, element_id
    return match.group(0)


def _texts(svg: str) -> list[str]:
    return [html_lib.unescape(t) for t in re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)]


def assert_self_contained(html: str) -> None:
    """No script, no stylesheet or image fetched, no address other than the XML namespaces of inline SVG, every
    in-page reference resolvable, no id twice."""
    assert "<script" not in html and "<link" not in html and "src=" not in html and "@import" not in html
    assert re.findall(r"https?://", re.sub(r'xmlns(:\w+)?="[^"]*"', "", html)) == []
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    references = re.findall(r'(?:href="|url\()([^")]*)', html)
    assert references and all(r.startswith("#") and r[1:] in ids for r in references), references


def test_one_series_per_file_engine_and_precision() -> None:
    html = render_html(synthetic_manifest())
    expected = ["model.onnx · CPU fp32", "model_optimized.onnx · CPU fp32", "model_quantized.onnx · CPU int8",
                "model.onnx · OpenVINO CPU fp32", "model_optimized.onnx · OpenVINO CPU fp32",
                "model.onnx · OpenVINO CPU bf16", "model_optimized.onnx · OpenVINO CPU bf16"]
    for figure in ("latency-vs-batch", "latency-vs-accuracy"):
        texts = _texts(_svg(html, figure))
        assert sorted(t for t in texts if " · " in t) == sorted(expected), figure  # each series once, in the legend
    batch = _svg(html, "latency-vs-batch")
    assert re.findall(r'<g id="latency-vs-batch-line2d_\d+">\s*<path d="M [^"]*L', batch)  # drawn as lines
    assert "b1xs512" in _texts(batch) and "OpenVINO CPU int8" not in html.split("Latency vs accuracy")[1]


def test_series_follow_the_manifest() -> None:
    """Guards the test above: one series fewer in the manifest is one legend entry fewer."""
    manifest = synthetic_manifest()
    del manifest["latency"]["OpenVINO CPU bf16"]["files"]["model.onnx"]
    texts = _texts(_svg(render_html(manifest), "latency-vs-batch"))
    assert "model.onnx · OpenVINO CPU bf16" not in texts and "model_optimized.onnx · OpenVINO CPU bf16" in texts


def _parity_table(html: str) -> str:
    return html.split("<h2>Parity")[1].split("</table>")[0]


def test_an_absent_engine_is_one_line() -> None:
    table = _parity_table(render_html(synthetic_manifest()))
    cuda = [row for row in table.split("<tr>") if "CUDA" in row]
    assert len(cuda) == 1 and "colspan" in cuda[0] and "skipped for all 4 files" in cuda[0]
    assert "CUDA absent, not built" in cuda[0] and cuda[0].count("install onnxruntime-gpu") == 1  # each reason once
    refused = [row for row in table.split("<tr>") if "QAttention" in row]  # one file refused: its own row
    assert len(refused) == 1 and "model_quantized.onnx" in refused[0] and "colspan" not in refused[0]
    assert table.count("<tr>") == 1 + 1 + 3 + 2 * 2 + 1  # header, CUDA, CPU, OpenVINO fp32 / bf16, int8


def test_an_engine_skipped_at_one_precision_is_one_line() -> None:
    manifest = synthetic_manifest(bf16=False)
    assert set(absent_engines(manifest["parity"])) == {"CUDAExecutionProvider", "OpenVINO CPU bf16"}
    table = _parity_table(render_html(manifest))
    bf16 = [row for row in table.split("<tr>") if "bf16" in row]
    assert len(bf16) == 1 and "this CPU has no bf16" in bf16[0] and "skipped for all 2 files" in bf16[0]
    assert len([row for row in table.split("<tr>") if "OpenVINO CPU fp32" in row]) == 2


def test_a_present_engine_is_never_collapsed() -> None:
    """Guards the two tests above: with every row passing, every row is shown."""
    manifest = synthetic_manifest()
    for entry in manifest["parity"]:
        entry["status"] = "pass"
    assert absent_engines(manifest["parity"]) == {}
    assert _parity_table(render_html(manifest)).count("<tr>") == 1 + len(manifest["parity"])


def test_the_page_is_self_contained_and_reproducible() -> None:
    manifest = synthetic_manifest()
    html = render_html(manifest)
    assert_self_contained(html)
    assert html == render_html(manifest)  # the SVG ids are salted per figure, not random
    for bad in ('<img src="https://example.org/x.png">', '<svg id="a"></svg><svg id="a"></svg>'):
        with pytest.raises(AssertionError):
            assert_self_contained(html.replace("</body>", bad + "</body>"))


def test_importing_the_report_does_not_import_matplotlib() -> None:
    code = "import sys, exporter.report_html, exporter.manifest; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]

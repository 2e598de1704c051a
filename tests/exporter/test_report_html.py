"""report.html opens in headless Chromium and renders its figures (checked in a screenshot's pixels)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from exporter.report_html import BUBBLE, DEAD, KEPT, LINES, PRUNED
from tests.exporter.test_cli import exported  # noqa: F401  (module-scoped fixture: one export)

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
    assert _count(image, _rgb(LINES[0])) > 20  # latency-vs-batch lines
    assert _count(image, _rgb(BUBBLE), tolerance=40) > 100  # latency-vs-accuracy bubbles


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
    assert _count(image, _rgb(KEPT)) == 0 and _count(image, _rgb(LINES[0])) == 0


def test_report_is_self_contained(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    _, out, _ = exported
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert html.count("<svg") >= 3 and 'id="latency-vs-accuracy"' in html and "latency-vs-batch" in html
    for colour in (KEPT, DEAD, PRUNED):
        assert colour in html

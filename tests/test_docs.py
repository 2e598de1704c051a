"""The reference pages stay true: the flag reference is generated from the parsers, the README is a front page
whose links resolve, and no docstring points at an issue number or a file the repository does not hold."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.cli import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_flag_reference_is_generated_from_the_parsers() -> None:
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == reference_markdown(), (
        "docs/cli.md is out of date: python -m exporter.cli --reference > docs/cli.md")


def test_the_readme_is_a_front_page_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((ROOT / link).exists() for link in links), [link for link in links if not (ROOT / link).exists()]


def test_code_names_no_issue_numbers_and_no_missing_files() -> None:
    found = []
    for package in ("exporter", "graphs", "calibration"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            found += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(r"[Ii]ssue \d+|FACTS\.md", text)]
    assert found == []

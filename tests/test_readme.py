"""The README's set-up commands stay true: CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())
    assert len(commands) == 2, "the README gives exactly two set-up commands"
    install_and_export, install_and_test = commands
    assert "export-model" in install_and_export and "pytest" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()

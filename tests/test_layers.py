"""The layers of the code base, kept by tests (as Polygraphy's tests/mod/test_dependencies.py keeps its own).

Rules, read from every import of every module, those inside functions included:

1. ``graphs.core`` (the base layer) imports only the standard library, numpy, onnxruntime, openvino (optional)
   and tqdm.
2. ``graphs`` never imports ``calibration`` or ``exporter``; ``calibration`` never imports ``exporter``.
3. ``exporter.runtime`` (the deployment side) imports only itself and ``graphs.core`` among the project's
   modules, and none of torch, transformers, onnx, onnxscript, optimum or matplotlib (the report's plots).
4. torch and transformers are imported only by the modules that do PyTorch work (``TORCH_SIDE``).
5. No import cycle among the project's modules; only the command line imports the pipeline.

Then the deployment side is imported for real in a child process where torch, transformers and onnx cannot be
imported. Each check is also run on a copy of the tree with one deliberately broken import, and must fail there.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "graphs", "calibration")
THIRD_PARTY_BASE = {"numpy", "onnxruntime", "openvino", "tqdm"}
DEPLOYMENT_THIRD_PARTY = {"numpy", "onnxruntime", "openvino", "tokenizers", "cryptography"}
HEAVY = {"torch", "transformers", "onnx", "onnxscript", "optimum", "sentence_transformers", "safetensors",
         "matplotlib"}
# The modules that do PyTorch work (with exporter.architectures.*, the families): checkpoint reading, compaction,
# the traced export, the PyTorch reference outputs and the divergence localizer; the command line only sets
# transformers' log level.
TORCH_SIDE = {"exporter.weights", "exporter.loading", "exporter.sentence", "exporter.compaction",
              "exporter.export_forward", "exporter.forward_parts", "exporter.tokenizer_check", "exporter.onnx_export", "exporter.reference",
              "exporter.divergence", "exporter.qat", "exporter.qat_formats", "exporter.qat_import",
              "exporter.qat_targets", "exporter.qat_reference",
              "exporter.cli"}
STDLIB = set(sys.stdlib_module_names)


def imports(root: Path) -> dict[str, set[str]]:
    """{module: every name it imports (absolute, dotted; ``from a import b`` gives a and a.b)}."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                    names |= {f"{node.module}.{alias.name}" for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level:
                    names.add(f"<relative import in {module}>")
            found[module] = names
    return found


def violations(root: Path) -> list[str]:
    """Every broken rule of the module docstring, one line each."""
    found = imports(root)

    def own(name: str) -> str | None:  # the project module `name` refers to, if any
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    problems = []
    graph: dict[str, set[str]] = {}
    for module, names in sorted(found.items()):
        tops = {name.split(".")[0] for name in names}
        targets = {target for name in names if (target := own(name)) and target != module}
        graph[module] = targets
        relative = [n for n in names if n.startswith("<relative")]
        problems += [f"{module}: a relative import (use absolute ones)" for _ in relative[:1]]
        if module.startswith("graphs.core"):
            bad = sorted(t for t in tops - STDLIB - THIRD_PARTY_BASE - {"graphs"})
            bad += sorted(t for t in targets if not t.startswith("graphs.core"))
            problems += [f"{module} (base layer) imports {name}" for name in bad]
        if module.startswith("graphs"):
            problems += [f"{module} imports {t} (graphs/ sits below it)" for t in sorted(targets)
                         if t.startswith(("calibration", "exporter"))]
        if module.startswith("calibration"):
            problems += [f"{module} imports {t} (calibration/ sits below it)" for t in sorted(targets)
                         if t.startswith("exporter")]
        if module.startswith("exporter.runtime"):
            problems += [f"{module} (deployment side) imports {t}" for t in sorted(targets)
                         if not t.startswith(("exporter.runtime", "graphs.core"))]
            problems += [f"{module} (deployment side) imports {t}" for t in sorted(tops - STDLIB)
                         if t not in DEPLOYMENT_THIRD_PARTY | set(PACKAGES)]
        if tops & {"torch", "transformers"} and module not in TORCH_SIDE and not module.startswith(
                "exporter.architectures"):
            problems.append(f"{module} imports {sorted(tops & {'torch', 'transformers'})} but is not a torch-side "
                            "module (TORCH_SIDE)")
        if "exporter.pipeline" in targets and module != "exporter.cli":
            problems.append(f"{module} imports exporter.pipeline (only the command line may)")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


_BLOCKED = '''import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"blocked by the test: {{name}}")
        return None
sys.meta_path.insert(0, _Blocked())
import importlib, pkgutil
import exporter.runtime
names = sorted(m.name for m in pkgutil.walk_packages(exporter.runtime.__path__, "exporter.runtime."))
for name in names:
    importlib.import_module(name)
print(len(names), "modules")
'''


def import_deployment_side(root: Path) -> subprocess.CompletedProcess:
    """Import every module of ``exporter.runtime`` under `root` with the heavy libraries blocked."""
    code = _BLOCKED.format(blocked=sorted(HEAVY))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def broken_tree(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the three packages where `module` gains `line` inside a function (the kind of import that
    dodged the rules before)."""
    root = tmp_path / "tree"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    path = root / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _broken() -> None:\n    {line}\n",
                    encoding="utf-8")
    return root


def test_the_import_rules_hold() -> None:
    assert violations(REPO) == []


def test_the_deployment_side_imports_with_torch_transformers_and_onnx_blocked() -> None:
    done = import_deployment_side(REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[0]) >= 10


@pytest.mark.parametrize("module, line, expected", [
    ("graphs.fusion", "from exporter.pipeline import export_model", "graphs.fusion imports exporter.pipeline"),
    ("graphs.core.errors", "import onnx", "graphs.core.errors (base layer) imports onnx"),
    ("calibration.search", "import exporter.runtime.parity", "calibration.search imports exporter.runtime.parity"),
    ("exporter.runtime.pooling", "from exporter.sentence import torch_pool",
     "exporter.runtime.pooling (deployment side) imports exporter.sentence"),
    ("exporter.runtime.pooling", "import matplotlib", "exporter.runtime.pooling (deployment side) imports matplotlib"),
    ("exporter.latency", "import torch", "exporter.latency imports ['torch']"),
    ("calibration.cpu", "from calibration.fused import plan_fused", "import cycle: calibration.cpu"),
])
def test_the_rule_check_fails_on_a_deliberately_broken_import(tmp_path: Path, module: str, line: str,
                                                              expected: str) -> None:
    found = violations(broken_tree(tmp_path, module, line))
    assert any(expected in problem for problem in found), found


def test_the_blocked_import_check_fails_on_a_deliberately_broken_import(tmp_path: Path) -> None:
    root = broken_tree(tmp_path, "exporter.runtime.decode", "pass")
    path = root / "exporter" / "runtime" / "decode.py"
    path.write_text(path.read_text(encoding="utf-8") + "\nimport torch  # a deliberately broken import\n")
    done = import_deployment_side(root)
    assert done.returncode != 0 and "blocked by the test: torch" in done.stderr, done.stderr[-2000:]


def _sources() -> list[Path]:
    return [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]


def test_one_place_creates_onnxruntime_sessions() -> None:
    """Every session is made by graphs/core/sessions.py (quiet, telemetry off, no silent CPU fallback)."""
    makers = [str(path.relative_to(REPO)) for path in _sources()
              if "InferenceSession(" in path.read_text(encoding="utf-8")]
    assert makers == ["graphs/core/sessions.py"]


def test_no_family_branches_outside_the_family_files() -> None:
    """What differs per family lives in exporter/architectures/<family>.py; nobody else asks which family."""
    branch = re.compile(r"architecture\.name\s*(==|!=|in\b)|\.architecture\s*==\s*[\"']|model_type[\"']?\)?\s*(==|in\b)")
    found = [f"{path.relative_to(REPO)}:{number}" for path in _sources()
             if "architectures" not in path.parts
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if branch.search(line)]
    assert found == []


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {str(path.relative_to(REPO)): n for path in _sources()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > 520}
    assert long == {}

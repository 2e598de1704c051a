"""`export-model verify`: passes on a fresh artifact, fails naming the file after one byte changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exporter.cli import main
from tests.checkpoints import changed_copy
from tests.exporter.test_cli import exported  # noqa: F401  (module-scoped fixture: one export for all tests)


def test_verify_passes_on_a_fresh_artifact(exported: tuple[Path, Path, int], capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    _, out, code = exported
    assert code == 0
    assert main(["verify", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "verified:" in stdout
    onnxruntime_rows = [line for line in stdout.splitlines() if line.split()[1:2] == ["CPUExecutionProvider"]]
    assert len(onnxruntime_rows) == _cpu_rows(out) and all(" pass " in line for line in onnxruntime_rows)


def test_verify_fails_naming_the_file_after_one_byte_changes(
    exported: tuple[Path, Path, int], tmp_path: Path, capsys: pytest.CaptureFixture  # noqa: F811
) -> None:
    _, out, _ = exported
    copy = changed_copy(out, tmp_path / "copy", "model_optimized.onnx")  # one bit of one weight byte
    assert main(["verify", str(copy)]) == 3
    err = capsys.readouterr().err
    assert "model_optimized.onnx: sha256 differs" in err
    assert "model.onnx:" not in err.replace("model_optimized.onnx", "")


def test_verify_detects_a_wrong_model_by_parity_even_with_matching_hashes(
    exported: tuple[Path, Path, int], tmp_path: Path, capsys: pytest.CaptureFixture  # noqa: F811
) -> None:
    """A swapped-in model whose manifest hash was also rewritten still fails: parity reruns on stored data."""
    import json

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from exporter.manifest import sha256_file

    _, out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    model = onnx.load(str(copy / "model.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    array = numpy_helper.to_array(biggest).copy()
    array *= np.float32(1.01)
    biggest.CopyFrom(numpy_helper.from_array(array, biggest.name))
    onnx.save(model, str(copy / "model.onnx"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(copy / "model.onnx"),
                                       "bytes": (copy / "model.onnx").stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 3
    assert "parity    model.onnx on CPUExecutionProvider: max abs error" in capsys.readouterr().err


def test_verify_bad_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("atol", ["NaN", -1.0])
def test_verify_refuses_a_manifest_whose_parity_bar_cannot_fail(
    exported: tuple[Path, Path, int], tmp_path: Path, capsys: pytest.CaptureFixture, atol: object  # noqa: F811
) -> None:
    """A bar of NaN (every `err > nan` is False) or below zero is bad input (exit 2), not an internal error."""
    import json

    _, out, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    text = (copy / "manifest.json").read_text()
    manifest = json.loads(text)
    manifest["options"]["parity"]["fp32_atol"] = atol
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "outside what export writes" in err


def _cpu_rows(folder: Path) -> int:
    """The artifact's onnxruntime CPU parity rows (model_qdq.onnx adds one where openvino was installed)."""
    import json

    return sum(e["provider"] == "CPUExecutionProvider" for e in json.loads((folder / "manifest.json").read_text())["parity"])

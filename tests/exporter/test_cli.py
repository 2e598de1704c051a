"""The `export-model` command end to end on tiny checkpoints: exit codes and what lands on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main
from tests.exporter.test_loading import tiny_bert

FILES = ("model.onnx", "model_optimized.onnx", "model_quantized.onnx", "config.json", "manifest.json",
         "report.md", "tokenizer.json", "parity/inputs.npz", "parity/reference.npz")


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("cli")
    model = tiny_bert(root / "ckpt")
    out = root / "out"
    code = main(["--model", str(model), "--output", str(out), "--calibration-samples", "16"])
    return model, out, code


def test_success_writes_every_file_and_a_complete_manifest(exported: tuple[Path, Path, int]) -> None:
    _, out, code = exported
    assert code == 0
    for name in FILES:
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["deployable"] is True
    cpu = {(e["file"], e["status"]) for e in manifest["parity"] if e["provider"] == "CPUExecutionProvider"}
    qdq = {("model_qdq.onnx", "pass")} if manifest["openvino"]["version"] else set()  # built with openvino only
    assert cpu == {("model.onnx", "pass"), ("model_optimized.onnx", "pass"), ("model_quantized.onnx", "pass")} | qdq
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        cuda = [e for e in manifest["parity"] if e["provider"] == "CUDAExecutionProvider"]
        assert len(cuda) == 4 + len(qdq) and all(e["status"] == "skip" for e in cuda)
        assert all("not available" in e["reason"] for e in cuda if e["file"] != "model_fp16.onnx")
        fp16 = next(e for e in cuda if e["file"] == "model_fp16.onnx")
        assert "absent" in fp16["reason"] and "--fp16 always" in fp16["reason"]
        assert not (out / "model_fp16.onnx").exists() and manifest["fp16"]["built"] is False
    latency = manifest["latency"]["CPUExecutionProvider"]
    assert set(latency["files"]) == {"model.onnx", "model_optimized.onnx", "model_quantized.onnx"} | {f for f, _ in qdq}
    shapes = list(latency["files"]["model.onnx"])
    length = manifest["max_length"]
    # The default (quick) latency: batch 1 and 8 at the working length, batch 1 at the model's max length.
    b1, b8 = f"b1xs{latency['sequence']}", f"b8xs{latency['sequence']}"
    assert latency["mode"] == "quick" and shapes == latency["shapes"] == [b1, b8] + (
        [f"b1xs{length}"] if length > latency["sequence"] else [])
    for name, per in latency["files"].items():
        assert per[b8]["peak_mb"] > (out / name).stat().st_size / 2**20 / 2, name  # weights at least
    assert "by_threads" not in latency and "throughput" not in latency
    for name, entry in manifest["files"].items():
        assert (out / name).stat().st_size == entry["bytes"], name
    assert manifest["options"]["task"] == "feature-extraction"
    assert manifest["signature"]["inputs"]["input_ids"]["shape"] == ["batch_size", "sequence_length"]
    assert _siblings(out) == []  # no work folder left beside the artifact


def test_non_empty_output_is_refused_without_force(exported: tuple[Path, Path, int], capsys: pytest.CaptureFixture) -> None:
    model, out, _ = exported
    before = (out / "manifest.json").read_bytes()
    assert main(["--model", str(model), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty; pass --force" in err and "Traceback" not in err
    assert (out / "manifest.json").read_bytes() == before


def test_replay_from_manifest_with_force(exported: tuple[Path, Path, int], tmp_path: Path) -> None:
    _, out, _ = exported
    replay = tmp_path / "replay"
    assert main(["--config", str(out / "manifest.json"), "--output", str(replay)]) == 0
    first = json.loads((out / "manifest.json").read_text())
    second = json.loads((replay / "manifest.json").read_text())
    assert second["options"] | {"output": None} == first["options"] | {"output": None}
    assert second["files"]["model.onnx"]["sha256"] == first["files"]["model.onnx"]["sha256"]


def test_parity_failure_exits_3_and_keeps_an_undeployable_artifact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny_bert(tmp_path / "ckpt")
    out = tmp_path / "out"
    # No float32 graph reproduces PyTorch to 1e-12: parity must fail, loudly.
    code = main(["--model", str(model), "--output", str(out), "--calibration-samples", "8", "--parity-atol", "1e-12"])
    assert code == 3
    assert "parity failed" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["deployable"] is False
    assert any(e["status"] == "fail" and "max abs error" in e["reason"] for e in manifest["parity"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/ckpt"], "no such folder"),
        (["--task", "summarization"], "invalid choice"),
        (["--drop-heads", "zero:1"], "drop-heads"),
        (["--providers", "cuda"], "CUDAExecutionProvider"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_nothing_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    model = tiny_bert(tmp_path / "ckpt")
    out = tmp_path / "out"
    full = ["--model", str(model), "--output", str(out), *args] if "--model" not in args else ["--output", str(out), *args]
    code = _exit_code(full)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out.exists() and _siblings(out) == []


def _exit_code(argv: list[str]) -> int:
    """main()'s return value, or argparse's exit code for a usage error."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


def test_parity_data_round_trips(exported: tuple[Path, Path, int]) -> None:
    _, out, _ = exported
    inputs = np.load(out / "parity" / "inputs.npz")
    reference = np.load(out / "parity" / "reference.npz")
    shapes = json.loads((out / "manifest.json").read_text())["parity_data"]["shapes"]
    assert shapes[:3] == [[1, 16], [4, 64], [8, 128]] and shapes[3][1] == 512  # + a batch at the max length
    assert {k.split("/")[0] for k in inputs} == {k.split("/")[0] for k in reference} == {"0", "1", "2", "3"}
    assert (inputs["1/attention_mask"] == 0).any()  # padded rows are part of the check


def test_quantization_preset_applies_its_settings_and_flags_refine_it() -> None:
    from calibration.quantize import PRESETS
    from exporter.cli import build_parser, config_from_args

    name = next(n for n, p in PRESETS.items() if p != PRESETS["cpu-avx512-vnni"])
    config = config_from_args(build_parser().parse_args(["--quantization-preset", name, "--calibration-samples", "7"]))
    assert config.quantization == PRESETS[name].__class__.from_preset(name, samples=7)
    assert config.quantization.preset == name


def test_fp16_always_builds_checks_and_verifies_the_float16_variant(tmp_path: Path) -> None:
    from exporter.runtime.verify import verify_artifact

    model = tiny_bert(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--output", str(out), "--calibration-samples", "16", "--fp16", "always"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fp16"]["built"] is True and manifest["fp16"]["float16_initializers"] > 0
    row = next(e for e in manifest["parity"] if e["file"] == "model_fp16.onnx" and e["provider"] == "CPUExecutionProvider")
    assert row["status"] == "pass" and row["precision"] == "fp16" and row["tolerance"] == "mean_cosine >= 0.999"
    assert row["max_abs_error"] > 0  # float16 really changed the numbers
    assert "model_fp16.onnx" in manifest["files"] and "model_fp16.onnx" in manifest["latency"]["CPUExecutionProvider"]["files"]
    assert (out / "model_fp16.onnx").stat().st_size < 0.6 * (out / "model_optimized.onnx").stat().st_size
    assert verify_artifact(out, ("cpu",)).ok


def test_fp16_option_outside_its_choices_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"fp16": "sometimes"}))
    code = main(["--model", str(tiny_bert(tmp_path / "ckpt")), "--output", str(tmp_path / "out"), "--config", str(options)])
    assert code == 2 and "fp16 option 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tune_records_every_candidate_and_writes_the_chosen_one(tmp_path: Path) -> None:
    model = tiny_bert(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--output", str(out), "--calibration-samples", "16", "--tune"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["quantization"]["tuning"]
    assert [row["preset"] for row in rows] == ["cpu-avx512-vnni", "cpu-avx512-vnni-static", "cpu-avx512-vnni-unfused",
                                               "cpu-qoperator-u8s8"]
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and manifest["quantization"]["preset"] == chosen[0]["preset"]
    assert manifest["options"]["quantization"]["tune"] is True


def test_onnxruntime_failure_in_a_stage_exits_4_naming_it_with_nothing_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    import exporter.pipeline as pipeline

    def broken(*args: object, **kwargs: object) -> list:
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : kernel exploded\nsecond line")

    monkeypatch.setattr(pipeline, "check_file", broken)
    out = tmp_path / "out"
    code = main(["--model", str(tiny_bert(tmp_path / "ckpt")), "--output", str(out), "--calibration-samples", "8"])
    err = capsys.readouterr().err
    assert code == 4 and "onnxruntime failed in the parity stage (Fail: [ONNXRuntimeError] : 1 : FAIL : kernel" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and _siblings(out) == []


@pytest.mark.parametrize(("mode", "code"), [("always", 4), ("auto", 0)])
def test_a_failed_float16_conversion_is_fatal_only_when_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, mode: str, code: int
) -> None:
    import exporter.pipeline as pipeline

    def broken(*args: object) -> None:
        raise ValueError("converter refused for the test")

    monkeypatch.setattr(pipeline, "to_float16", broken)
    monkeypatch.setattr(pipeline, "_fp16_wanted", lambda config: True)  # as if CUDA were present under auto
    out = tmp_path / "out"
    assert main(["--model", str(tiny_bert(tmp_path / "ckpt")), "--output", str(out), "--calibration-samples", "8",
                 "--fp16", mode]) == code
    if code:
        assert "float16 conversion of model_optimized.onnx failed" in capsys.readouterr().err and not out.exists()
    else:
        row = next(e for e in json.loads((out / "manifest.json").read_text())["parity"] if e["file"] == "model_fp16.onnx")
        assert row["status"] == "skip" and "converter refused for the test" in row["reason"]


def test_full_latency_adds_batches_the_thread_grid_and_throughput(tmp_path: Path) -> None:
    """--latency full: batch 1, 2, 4, 8 (and 1 x max length), one thread per session at batch 1 and 8, and the
    throughput modes, in the manifest and both reports; the default run above measured none of these."""
    import os

    model = tiny_bert(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--output", str(out), "--calibration-samples", "16", "--latency", "full",
                 "--max-length", "256"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    latency = manifest["latency"]["CPUExecutionProvider"]
    assert latency["mode"] == "full" and latency["shapes"] == ["b1xs128", "b2xs128", "b4xs128", "b8xs128", "b1xs256"]
    assert set(latency["files"]["model_quantized.onnx"]) == set(latency["shapes"])
    qdq = {"model_qdq.onnx"} if "OpenVINO CPU int8" in manifest["latency"] else set()  # built with openvino only
    assert set(latency["throughput"]) == {"model.onnx", "model_optimized.onnx", "model_quantized.onnx"} | qdq
    if (os.cpu_count() or 1) > 1:
        one = latency["by_threads"]["1"]["model.onnx"]
        assert set(one) == {"b1xs128", "b8xs128"} and all(v["median_ms"] > 0 for v in one.values())
        assert "thread settings" in (out / "report.html").read_text() and "@1 thr" in (out / "report.md").read_text()
    assert manifest["options"]["latency"] == "full"

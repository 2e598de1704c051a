"""OpenVINO as a second CPU engine: parity rows per (file, precision) with explicit settings, latency rows, the
bf16 variant where the CPU allows it, `verify` on it, one skip row without openvino, and no telemetry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.runtime.openvino_check import EVERY_FILE, absent_entries, check_openvino, variants
from exporter.runtime.parity import ParityConfig
from graphs.core import openvino_sessions
from graphs.core.openvino_sessions import ENGINE, bf16_flags, cpu_flags
from tests.exporter.test_cli import exported  # noqa: F401  (module-scoped fixture: one export for all tests)
from tests.exporter.test_network import guarded_env

HAS_OPENVINO = openvino_sessions.version() is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (the [openvino] extra)")
pytestmark = pytest.mark.openvino


def _rows(out: Path) -> list[dict]:
    return [e for e in json.loads((out / "manifest.json").read_text())["parity"] if e["provider"] == ENGINE]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni avx512_bf16\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in cpu_flags(info)
    assert bf16_flags(cpu_flags(info)) == ["avx512_bf16"]
    assert bf16_flags({"avx512f", "avx512_vnni"}) == []
    assert variants("fp32", ["amx_bf16"]) == ["fp32", "bf16"] and variants("fp32", []) == ["fp32"]
    assert variants("int8", []) == ["int8"] and variants("fp16", ["amx_bf16"]) == []
    assert variants("int8", ["avx512_bf16"]) == ["int8", "int8-bf16"]


@needs_openvino
def test_every_readable_file_gets_openvino_rows_with_explicit_settings(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    _, out, code = exported
    assert code == 0
    rows = {(e["file"], e["precision"]): e for e in _rows(out)}
    for name in ("model.onnx", "model_optimized.onnx"):
        fp32 = rows[(name, "fp32")]
        assert fp32["status"] == "pass" and fp32["max_abs_error"] <= 1e-4, fp32
        if bf16_flags():
            bf16 = rows[(name, "bf16")]
            assert bf16["status"] == "pass" and bf16["tolerance"] == "mean_cosine >= 0.999"
            assert bf16["max_abs_error"] > fp32["max_abs_error"]  # it really ran in bfloat16
        else:
            assert (name, "bf16") not in rows
    qdq = rows[("model_qdq.onnx", "int8")]  # the INT8 file built for OpenVINO
    assert qdq["status"] == "pass" and qdq["tolerance"] == "mean_cosine >= 0.99", qdq
    if bf16_flags():  # the same INT8 file with its float parts in bf16: held to the INT8 bar, timed on its own
        mixed = rows[("model_qdq.onnx", "int8-bf16")]
        assert mixed["status"] == "pass" and mixed["tolerance"] == "mean_cosine >= 0.99", mixed
        assert mixed["max_abs_error"] != qdq["max_abs_error"]  # it really ran its float parts in bfloat16
    else:
        assert ("model_qdq.onnx", "int8-bf16") not in rows
    quantized = rows[("model_quantized.onnx", "int8")]  # onnxruntime's QAttention: not an OpenVINO file
    assert quantized["status"] == "skip" and "QAttention" in quantized["reason"]
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["openvino"]
    assert record["settings"]["fp32"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert record["settings"]["fp32"]["NUM_STREAMS"] == "1"
    assert record["settings"]["fp32"]["PERFORMANCE_HINT"] == "LATENCY"
    assert record["bf16"]["run"] == bool(bf16_flags()) and record["bf16"].get("cpu_flags", []) == bf16_flags()
    assert set(manifest["latency"][f"{ENGINE} int8"]["files"]) == {"model_qdq.onnx"}
    timed = manifest["latency"][f"{ENGINE} fp32"]
    assert set(timed["files"]) == {"model.onnx", "model_optimized.onnx"}
    assert timed["settings"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert timed["files"]["model.onnx"]["b8xs128"]["median_ms"] > 0
    assert manifest["deployable"] is True


@needs_openvino
def test_fp32_is_asked_for_explicitly_where_the_default_would_be_bf16(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    """The compiled model reports f32 because it was asked; left to OpenVINO's defaults, a CPU with AVX-512 BF16 or
    AMX compiles the same FP32 file to bf16 (the silent change the explicit hint prevents)."""
    import openvino as ov

    _, out, _ = exported
    model = (out / "model.onnx").read_bytes()
    session = openvino_sessions.open_compiled(model, "fp32", threads=1)
    assert session.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert session.settings["INFERENCE_NUM_THREADS"] == "1"
    core = ov.Core()
    default = core.compile_model(core.read_model(model=model), "CPU").get_property("INFERENCE_PRECISION_HINT")
    assert default == (ov.Type.bf16 if bf16_flags() else ov.Type.f32)


@needs_openvino
def test_the_bf16_bar_is_applied(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    if not bf16_flags():
        pytest.skip("this CPU has neither avx512_bf16 nor amx_bf16: no bf16 variant")
    from exporter.runtime.files import Limits
    from exporter.runtime.npz import load_npz_batches

    _, out, _ = exported
    inputs = load_npz_batches((out / "parity/inputs.npz").read_bytes(), "inputs", Limits())
    reference = load_npz_batches((out / "parity/reference.npz").read_bytes(), "reference", Limits())
    strict = ParityConfig(bf16_min_cosine=1.0)  # bfloat16 rounding cannot reach cosine 1 exactly
    rows = {e.precision: e for e in check_openvino("model.onnx", "fp32", "feature-extraction", inputs, reference,
                                                   strict, (out / "model.onnx").read_bytes())}
    assert rows["fp32"].status == "pass"
    assert rows["bf16"].status == "fail" and "mean cosine" in rows["bf16"].reason


@needs_openvino
def test_verify_runs_the_openvino_rows(exported: tuple[Path, Path, int], capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    _, out, _ = exported
    assert main(["verify", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"{ENGINE} fp32        pass" in stdout
    assert ("OpenVINO CPU bf16        pass" in stdout) == bool(bf16_flags())


def test_without_openvino_one_skip_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # an import of openvino now raises ImportError
    rows = absent_entries()
    assert len(rows) == 1 and rows[0].file == EVERY_FILE and rows[0].status == "skip"
    assert "pip install export-model[openvino]" in rows[0].reason
    assert check_openvino("model.onnx", "fp32", "feature-extraction", [], [{}], ParityConfig(), b"") == []


_IMPORT = """
import sys
if sys.argv[1] == "quiet":
    from graphs.core.telemetry import quiet_onnxruntime
    quiet_onnxruntime()
from graphs.core.openvino_sessions import version
import openvino, nncf
from nncf.telemetry import telemetry
telemetry.send_event("export-model-test", "probe", "probe")
import time
time.sleep(2)  # the senders run in background threads and processes
"""


@needs_openvino
@pytest.mark.parametrize("mode", ["raw", "quiet"])
def test_importing_openvino_and_nncf_reaches_out_unless_quieted(mode: str, tmp_path: Path) -> None:
    """`import openvino` (2026.4) and NNCF send usage events through openvino-telemetry; with the tool's switch
    (graphs/core/telemetry.py) nothing is attempted. "raw" shows the guard sees the attempt, so "quiet" can fail."""
    pytest.importorskip("nncf")
    log = tmp_path / "net.log"
    env = guarded_env(tmp_path, log)
    env["HOME"] = str(tmp_path)  # no consent file: the package's default is to send
    env.pop("NNCF_CI", None)
    done = subprocess.run([sys.executable, "-c", _IMPORT, mode], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    attempts = log.read_text() if log.exists() else ""
    if mode == "raw":
        assert "google-analytics" in attempts
    else:
        assert attempts == "", attempts


# ----- the deployment side: which (file, engine, precision) `run` serves -----


def _manifest(ov_bf16_ms: float, ov_status: str = "pass") -> dict:
    cpu = "CPUExecutionProvider"

    def timing(ms: float) -> dict:
        return {"b1xs128": {"median_ms": ms}, "b8xs128": {"median_ms": 8 * ms}}

    return {
        "files": {name: {} for name in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx")},
        "parity": [{"file": "model.onnx", "provider": cpu, "precision": "fp32", "status": "pass"},
                   {"file": "model_optimized.onnx", "provider": cpu, "precision": "fp32", "status": "pass"},
                   {"file": "model_quantized.onnx", "provider": cpu, "precision": "int8", "status": "pass"},
                   {"file": "model.onnx", "provider": ENGINE, "precision": "fp32", "status": "pass"},
                   {"file": "model.onnx", "provider": ENGINE, "precision": "bf16", "status": ov_status},
                   {"file": "model_quantized.onnx", "provider": ENGINE, "precision": "int8", "status": "skip"}],
        "latency": {cpu: {"files": {"model.onnx": timing(10), "model_optimized.onnx": timing(9),
                                    "model_quantized.onnx": timing(5)}},
                    f"{ENGINE} fp32": {"files": {"model.onnx": timing(7)}},
                    f"{ENGINE} bf16": {"files": {"model.onnx": timing(ov_bf16_ms)}}},
    }


def test_run_picks_the_fastest_deployable_file_engine_and_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    from exporter.runtime import engines
    from exporter.runtime.engines import Run, choose_run

    cpu = "CPUExecutionProvider"
    monkeypatch.setattr(engines, "version", lambda: "2026.4")
    monkeypatch.setattr(engines, "bf16_flags", lambda: ["amx_bf16"])
    assert choose_run(_manifest(3), cpu) == Run("model.onnx", ENGINE, "bf16")
    assert choose_run(_manifest(6), cpu) == Run("model_quantized.onnx", cpu, "int8")
    assert choose_run(_manifest(3), cpu, engine="onnxruntime") == Run("model_quantized.onnx", cpu, "int8")
    assert choose_run(_manifest(3), cpu, engine="openvino") == Run("model.onnx", ENGINE, "bf16")
    # a named FP32 file keeps its precision: OpenVINO fp32 (7 ms) beats onnxruntime (10 ms), bf16 is not offered
    assert choose_run(_manifest(3), cpu, file="model.onnx") == Run("model.onnx", ENGINE, "fp32")
    assert choose_run(_manifest(3, ov_status="skip"), cpu) == Run("model_quantized.onnx", cpu, "int8")
    # a fail row anywhere makes the file undeployable on every engine
    assert choose_run(_manifest(3, ov_status="fail"), cpu) == Run("model_quantized.onnx", cpu, "int8")
    monkeypatch.setattr(engines, "bf16_flags", lambda: [])  # a deployment CPU without bf16
    assert choose_run(_manifest(3), cpu) == Run("model_quantized.onnx", cpu, "int8")
    assert choose_run(_manifest(3), cpu, engine="openvino") == Run("model.onnx", ENGINE, "fp32")
    monkeypatch.setattr(engines, "version", lambda: None)  # openvino absent: onnxruntime only
    assert choose_run(_manifest(3), cpu) == Run("model_quantized.onnx", cpu, "int8")
    assert choose_run(_manifest(3), "CUDAExecutionProvider").provider == "CUDAExecutionProvider"


@needs_openvino
def test_run_serves_an_openvino_file_from_the_checked_bytes(exported: tuple[Path, Path, int],  # noqa: F811
                                                            tmp_path: Path) -> None:
    import numpy as np

    from exporter.runtime.model import Runtime

    _, out, _ = exported
    on_openvino = Runtime.load(out, engine="openvino")
    assert on_openvino.run_choice is not None and on_openvino.run_choice.openvino
    on_onnxruntime = Runtime.load(out, file=on_openvino.file, engine="onnxruntime")
    texts = ["a short text", "a longer text with more words in it, padded against the first"]
    a, b = on_openvino.embed(texts), on_onnxruntime.embed(texts)
    assert a.shape == b.shape == (2, 32)
    # fp32 within parity's FP32 bar; bf16 (where the CPU has it and it timed fastest) within bfloat16's rounding
    assert np.abs(a - b).max() < (1e-4 if on_openvino.run_choice.precision == "fp32" else 1e-2)


@needs_openvino
def test_run_cli_on_openvino(exported: tuple[Path, Path, int], tmp_path: Path) -> None:  # noqa: F811
    import numpy as np

    _, out, _ = exported
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a local run"}\n{"text": "and a second, longer row of text"}\n')
    answers = {}
    for engine in ("openvino", "onnxruntime"):
        done = subprocess.run([sys.executable, "-m", "exporter.cli", "run", str(out), "--input", str(rows),
                               "--engine", engine, "--file", "model_optimized.onnx"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        answers[engine] = np.array([json.loads(line)["embedding"] for line in done.stdout.splitlines()])
    assert answers["openvino"].shape == answers["onnxruntime"].shape == (2, 32)
    assert np.abs(answers["openvino"] - answers["onnxruntime"]).max() < 1e-4  # a named FP32 file runs in fp32
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "run", str(out), "--input", str(rows),
                           "--engine", "openvino", "--file", "model_quantized.onnx"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3 and "OpenVINO cannot load it" in done.stderr and "Traceback" not in done.stderr


@needs_openvino
def test_the_qdq_file_runs_on_openvinos_int8_kernels(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    """model_qdq.onnx comes from the unfused model.onnx, so Q, K and V are INT8 too: every weight MatMul becomes
    one of OpenVINO's u8/i8 FullyConnected kernels, none stays float; nothing of onnxruntime's own INT8 ops is in
    the file."""
    from collections import Counter

    import onnx

    _, out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["openvino"]["qdq_file"]
    assert record["built"] is True and record["source"] == "model.onnx"
    ops = Counter(node.op_type for node in onnx.load(str(out / "model_qdq.onnx")).graph.node)
    # one DequantizeLinear per weight and per input read; one QuantizeLinear per distinct input: Q, K and V
    # share theirs (2 layers x (QKV input, context, FFN input, GELU output))
    assert ops["DequantizeLinear"] == 2 * record["quantized_nodes"] and ops["QuantizeLinear"] == 8, ops
    assert not {"QAttention", "DynamicQuantizeLinear", "MatMulIntegerToFloat"} & set(ops)
    session = openvino_sessions.open_compiled((out / "model_qdq.onnx").read_bytes(), "fp32")
    kernels = Counter()
    for op in session.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kernels[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
    int8 = kernels[("FullyConnected", "u8")] + kernels[("FullyConnected", "i8")]
    assert int8 == record["quantized_nodes"] == 12, kernels  # 2 layers x (Q, K, V, output, FFN in, FFN out)
    assert kernels[("FullyConnected", "f32")] == 0, kernels


def test_openvinos_multi_line_errors_become_one_line() -> None:
    from exporter.runtime.openvino_check import openvino_failure

    text = ("Exception from src/inference/src/cpp/core.cpp:105:\nCheck 'false' failed at src/frontends/x.cpp:151:\n"
            "FrontEnd API failed with OpConversionFailure:\nModel wasn't fully converted.\n\nSummary:\n"
            "-- No conversion rule found for operations: com.microsoft.QAttention\n"
            "-- Conversion is failed for: QuantizeLinear-17\nTo facilitate the conversion of unsupported operations, "
            "refer to Frontend Extension documentation: https://docs.openvino.ai/\n")
    assert openvino_failure(RuntimeError(text)) == ("No conversion rule found for operations: com.microsoft.QAttention; "
                                                    "Conversion is failed for: QuantizeLinear-17")
    plain = "Exception from src/plugin.cpp:1:\nCheck 'x' failed at y:\nInput shape mismatch\n"
    assert openvino_failure(RuntimeError(plain)) == "Input shape mismatch"


@needs_openvino
def test_openvino_int8_never_leaves_the_qdq_file_out(tmp_path: Path) -> None:
    from tests.exporter.test_loading import tiny_bert

    model = tiny_bert(tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["--model", str(model), "--output", str(out), "--calibration-samples", "16", "--latency", "off",
                 "--openvino-int8", "never"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "model_qdq.onnx").exists() and manifest["openvino"]["qdq_file"]["built"] is False
    assert "never" in manifest["openvino"]["qdq_file"]["reason"]
    assert {e["file"] for e in manifest["parity"]} == {"model.onnx", "model_optimized.onnx", "model_quantized.onnx",
                                                       "model_fp16.onnx"}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"openvino_int8": "sometimes"}))
    assert main(["--model", str(model), "--output", str(tmp_path / "out2"), "--config", str(config)]) == 2
    assert not (tmp_path / "out2").exists()


def test_a_qdq_file_that_fails_parity_is_left_out_with_a_skip_row(tmp_path: Path) -> None:
    from exporter.openvino_stage import QDQ_FILE, keep_qdq
    from exporter.runtime.parity import ParityEntry

    (tmp_path / QDQ_FILE).write_bytes(b"onnx")
    cpu = "CPUExecutionProvider"
    passing = [ParityEntry("model.onnx", cpu, "fp32", "pass"), ParityEntry(QDQ_FILE, cpu, "int8", "pass"),
               ParityEntry(QDQ_FILE, ENGINE, "int8", "pass")]
    checked = [("model.onnx", "fp32"), (QDQ_FILE, "int8")]
    record = {"built": True}
    assert keep_qdq(tmp_path, passing, checked, record) == (passing, checked) and (tmp_path / QDQ_FILE).exists()
    failing = passing[:2] + [ParityEntry(QDQ_FILE, ENGINE, "int8", "fail", reason="mean cosine 0.9812 < 0.99")]
    entries, kept = keep_qdq(tmp_path, failing, checked, record)
    assert not (tmp_path / QDQ_FILE).exists() and kept == [("model.onnx", "fp32")]
    assert [(e.file, e.status) for e in entries] == [("model.onnx", "pass"), (QDQ_FILE, "skip")]
    assert record["built"] is False and "mean cosine 0.9812 < 0.99" in entries[-1].reason


def test_the_qdq_search_gets_what_the_first_search_left_of_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    """The export's time bound holds with model_qdq.onnx built: its search shares --search-budget, and a file
    that cannot be built within it is left out with the reason, nothing half-written."""
    from calibration.settings import QuantizationConfig
    from exporter import openvino_stage
    from graphs.core.errors import QuantizationError

    budgets: list[float] = []

    recipes: list[QuantizationConfig] = []

    def quantize(source: Path, output: Path, reader: object, recipe: QuantizationConfig, **_: object) -> None:
        budgets.append(recipe.search_budget_s)
        recipes.append(recipe)
        output.write_bytes(b"half")
        raise QuantizationError("the accuracy search ran out of its budget and put all 60 nodes back in FP32")

    monkeypatch.setattr(openvino_stage, "version", lambda: "2026.4.1")
    monkeypatch.setattr(openvino_stage, "quantize_model", quantize)
    out, config = tmp_path / "model_qdq.onnx", QuantizationConfig(search_budget_s=300.0)
    spent = openvino_stage.build_qdq(tmp_path / "model.onnx", out, None, config, "sha", validation=[{}], spent_s=300.0)
    assert spent["built"] is False and "--search-budget" in spent["reason"] and budgets == []
    left = openvino_stage.build_qdq(tmp_path / "model.onnx", out, None, config, "sha", validation=[{}], spent_s=120.0)
    assert budgets == [180.0] and left["built"] is False and "ran out" in left["reason"] and not out.exists()
    assert recipes[-1].search_engine == "openvino" and recipes[-1].search_refine_share == 0.5


class _Logits:
    """A session that answers every batch with the next of `outputs` (one [rows, classes] array each)."""

    def __init__(self, outputs: list) -> None:
        self.outputs = list(outputs)

    def get_inputs(self) -> list:
        from graphs.core.openvino_sessions import Port

        return [Port("input_ids", "tensor(int64)"), Port("attention_mask", "tensor(int64)")]

    def run(self, names: object, feeds: dict) -> list:
        assert set(feeds) == {"input_ids", "attention_mask"}  # feeds the graph does not declare are dropped
        return [self.outputs.pop(0)]


def test_a_reduced_precision_run_that_changes_decisions_is_measured_not_served(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The task bar behind the parity bar: over the search's held-out rows, a run whose argmax moves on more
    rows than --max-accuracy-drop allows is a skip row (not served), its scores and the reason recorded; one
    changed row in 100 is within a 1% drop; fp32 rows are not judged (the max-abs bar already binds them)."""
    import numpy as np

    from exporter import openvino_stage
    from exporter.runtime import openvino_check

    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(50, 3)).astype(np.float32) for _ in range(2)]
    feeds = [{"input_ids": np.ones((50, 4), np.int64), "attention_mask": np.ones((50, 4), np.int64),
              "token_type_ids": np.zeros((50, 4), np.int64)} for _ in range(2)]

    def moved(rows: int) -> list:
        out = [batch.copy() for batch in logits]
        for row in range(rows):  # the runner-up class wins
            out[0][row, np.argsort(out[0][row])[-2]] = out[0][row].max() + 1.0
        return out

    monkeypatch.setattr(openvino_stage, "open_session", lambda path: _Logits(logits * 4))
    judge = openvino_stage.task_judge(tmp_path / "model_optimized.onnx", feeds, "classification", 0.01)
    assert judge(_Logits(moved(0))) == ({"held_out_argmax_agreement": 1.0}, None)
    assert judge(_Logits(moved(1)))[1] is None  # 99 of 100: the 1% the bar allows
    scores, short = judge(_Logits(moved(3)))
    assert scores == {"held_out_argmax_agreement": 0.97}
    assert short == "classification on the accuracy search's 100 held-out examples: argmax_agreement 0.9700 < 0.9900"

    # In check_openvino: a passing bf16 row with a shortfall becomes a skip row, its parity numbers kept.
    monkeypatch.setattr(openvino_check, "version", lambda: "2026.4.1")
    monkeypatch.setattr(openvino_check, "bf16_flags", lambda: ["amx_bf16"])
    monkeypatch.setattr(openvino_check, "open_compiled", lambda model, precision, threads: _Logits([logits[0]]))
    judged: list[str] = []

    def short_judge(session: object) -> tuple[dict, str]:
        judged.append("called")
        return {"held_out_argmax_agreement": 0.97}, "argmax_agreement 0.9700 < 0.9900"

    expected = [{"logits": logits[0]}]
    rows = {e.precision: e for e in check_openvino("model.onnx", "fp32", "text-classification", feeds[:1], expected,
                                                   ParityConfig(), b"", judge=short_judge)}
    assert rows["fp32"].status == "pass" and judged == ["called"]  # only the bf16 row was judged
    assert rows["bf16"].status == "skip" and rows["bf16"].reason == "measured, not served: argmax_agreement 0.9700 < 0.9900"
    assert rows["bf16"].metric["held_out_argmax_agreement"] == 0.97 and rows["bf16"].mean_cosine == 1.0


@needs_openvino
def test_the_exports_reduced_precision_rows_carry_their_task_scores(exported: tuple[Path, Path, int]) -> None:  # noqa: F811
    _, out, _ = exported
    judged = [e for e in _rows(out) if e["precision"] != "fp32" and e["status"] != "skip" or
              (e["reason"] or "").startswith("measured, not served")]
    assert judged, _rows(out)
    for row in judged:  # the embedding metric's two scores on the search's held-out texts
        assert {"held_out_mean_cosine", "held_out_neighbour_agreement"} <= set(row["metric"]), row
    assert not any("held_out_mean_cosine" in e["metric"] for e in _rows(out) if e["precision"] == "fp32")


@needs_openvino
def test_the_qdq_files_search_runs_its_candidates_on_openvino(exported: tuple[Path, Path, int],  # noqa: F811
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """model_qdq.onnx is judged where it will run: its search's candidate graphs on OpenVINO, the FP32 reference
    on onnxruntime; model_quantized.onnx's on onnxruntime. Both engines give the metric the same summaries on an
    FP32 graph (the f32 hint), so the two searches share one scale."""
    import numpy as np
    import onnx

    from calibration.metrics import get_metric
    from calibration.search_core import evaluate
    from exporter.runtime.files import Limits
    from exporter.runtime.npz import load_npz_batches

    _, out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["openvino"]["qdq_file"]["search"]["engine"] == "openvino"
    assert manifest["quantization"]["search"]["engine"] == "onnxruntime"
    inputs = load_npz_batches((out / "parity/inputs.npz").read_bytes(), "inputs", Limits())
    compiled: list[str] = []
    real = openvino_sessions.open_compiled
    monkeypatch.setattr(openvino_sessions, "open_compiled",
                        lambda model, precision="fp32", threads=0: compiled.append(precision) or real(model, precision))
    model, metric = onnx.load(str(out / "model.onnx")), get_metric("feature-extraction")
    on_ort = evaluate(model, inputs, metric)
    assert compiled == []
    on_ov = evaluate(model, inputs, metric, "openvino")
    assert compiled == ["fp32"]
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(on_ort, on_ov, strict=True))

"""Quantization-aware-trained checkpoints: each format recognised at load, its learned scales imported, the float
model the training meant (SmoothQuant multiplied back, int8 dequantized), and unmappable schemes refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from onnx import numpy_helper

from exporter.cli import main
from exporter.loading import load_checkpoint
from graphs.core.errors import CheckpointError
from tests.hardening.conftest import assert_refused, run_cli
from tests.qat_checkpoints import (
    compressed_tensors_checkpoint,
    modelopt_checkpoint,
    q8bert_checkpoint,
    sample_ids,
    torch_ao_checkpoint,
)


def _max_weight_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    found, expected = model.state_dict(), reference.state_dict()
    return max(float((found[k] - expected[k]).abs().max()) for k in expected if k in found)


def test_modelopt_scales_are_imported_per_linear(tmp_path: Path) -> None:
    truth = modelopt_checkpoint(tmp_path / "m")
    checkpoint = load_checkpoint(tmp_path / "m")
    qat = checkpoint.qat
    assert qat is not None and qat.format == "modelopt"
    assert sorted(qat.linears) == sorted(truth.input_amax)
    for name, scales in qat.linears.items():
        assert scales.input_scale == pytest.approx(truth.input_amax[name] / 127.0, rel=1e-6)
        torch.testing.assert_close(scales.weight_scale, truth.weight_amax[name] / 127.0, rtol=1e-6, atol=0)
        assert scales.pre_quant_scale is None
    assert len(qat.consumed) == 2 * len(truth.input_amax)  # every quantizer tensor accounted for
    assert (tmp_path / "m" / "modelopt_state.pth") in checkpoint.files_read
    assert _max_weight_error(checkpoint.model, truth.float_model) == 0.0


def test_modelopt_smoothquant_weights_are_multiplied_back(tmp_path: Path) -> None:
    truth = modelopt_checkpoint(tmp_path / "m", smooth=True)
    checkpoint = load_checkpoint(tmp_path / "m")
    assert checkpoint.qat is not None and len(checkpoint.qat.restored) == len(truth.pre_quant_scale)
    # the stored weights are far from the float ones: the test would see them loaded as they are
    stored_error = max(float((truth.stored_weight[n] - truth.float_model.get_submodule(n).weight).abs().max())
                       for n in truth.pre_quant_scale)
    assert stored_error > 0.05
    assert _max_weight_error(checkpoint.model, truth.float_model) < 1e-6
    with torch.no_grad():
        found = checkpoint.model(**sample_ids(1)).logits
        expected = truth.float_model(**sample_ids(1)).logits
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=0)


def test_compressed_tensors_int8_weights_are_dequantized(tmp_path: Path) -> None:
    truth = compressed_tensors_checkpoint(tmp_path / "c")
    checkpoint = load_checkpoint(tmp_path / "c")
    qat = checkpoint.qat
    assert qat is not None and qat.format == "compressed-tensors"
    assert len(qat.linears) == len(truth.input_amax) == len(qat.restored)
    for name, scales in qat.linears.items():
        assert scales.input_scale == pytest.approx(truth.input_amax[name] / 127.0, rel=1e-6)
    assert _max_weight_error(checkpoint.model, truth.float_model) == 0.0


@pytest.fixture(scope="module")
def smoothquant_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("sq")
    truth = modelopt_checkpoint(root / "ckpt", smooth=True)
    out = root / "out"
    assert main(["--model", str(root / "ckpt"), "--output", str(out), "--latency", "off"]) == 0
    return out, truth


def test_smoothquant_model_onnx_is_the_unsmoothed_model(smoothquant_export: tuple[Path, object]) -> None:
    """model.onnx within 1e-4 of the float model the training meant (the weights as stored would be off by
    about 1e-1 of the logits)."""
    out, truth = smoothquant_export
    feeds = sample_ids(3)
    with torch.no_grad():
        expected = truth.float_model(**feeds).logits.numpy()  # type: ignore[attr-defined]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    found = session.run(["logits"], {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    assert np.abs(found - expected).max() < 1e-4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qat"]["format"] == "modelopt"
    assert len(manifest["qat"]["restored_weights"]) == len(truth.pre_quant_scale)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("case", "phrase"), [
    ("int4", "4-bit"), ("fp8", "FP8"), ("blocks", "block"), ("ct-dynamic", "dynamic"), ("fx", "FX"),
    ("unknown", "quantizer tensors"), ("inc", "Neural Compressor"), ("nonorm", "no_norm"),
])
def test_unsupported_schemes_exit_2_with_one_line_and_nothing_written(
        case: str, phrase: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "ckpt"
    if case == "int4":
        modelopt_checkpoint(folder, num_bits=4)
    elif case == "fp8":
        modelopt_checkpoint(folder, num_bits=(4, 3))
    elif case == "blocks":
        modelopt_checkpoint(folder, block_sizes={-1: 128})
    elif case == "ct-dynamic":
        compressed_tensors_checkpoint(folder, dynamic=True)
    elif case == "nonorm":
        modelopt_checkpoint(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"layer_norm_type": "no_norm"}))
    else:
        compressed_tensors_checkpoint(folder)  # then rewritten as another form below
        config = json.loads((folder / "config.json").read_text())
        del config["quantization_config"]
        (folder / "config.json").write_text(json.dumps(config))
        state = safetensors.torch.load_file(folder / "model.safetensors")
        state = {k: v for k, v in state.items() if not k.endswith(("_scale",))}
        state = {k: (v.float() if v.dtype == torch.int8 else v) for k, v in state.items()}
        if case == "fx":
            state["activation_post_process_0.scale"] = torch.tensor([0.1])
        elif case == "unknown":
            state["bert.encoder.layer.0.attention.self.query.my_quantizer.clip"] = torch.tensor([0.1])
        else:
            (folder / "best_configure.json").write_text("{}")
        safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    run = run_cli(["--model", str(folder), "--latency", "off"], tmp_path / "out", capsys)
    assert_refused(run, phrase)


@pytest.fixture(scope="module")
def modelopt_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("mo")
    truth = modelopt_checkpoint(root / "ckpt")
    out = root / "out"
    assert main(["--model", str(root / "ckpt"), "--output", str(out), "--latency", "off"]) == 0
    return out, truth


def _expected_int8(truth: object, module: str) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's int8 weight ([in, out], the graph's layout) and step per output channel, computed here
    as ModelOpt's fake quantizer rounds: round(W * (127 / amax)) clamped to [-128, 127]."""
    weight, amax = truth.stored_weight[module], truth.weight_amax[module]  # type: ignore[attr-defined]
    if weight.dtype == torch.int8:  # compressed-tensors, Q8BERT: the int8 weight as stored
        return weight.T.numpy(), (amax / 127.0).numpy()
    q = torch.clamp(torch.round(weight * (torch.tensor(127.0) / amax[:, None])), -128, 127)
    return q.T.numpy().astype(np.int8), (amax / 127.0).numpy()


@pytest.fixture(scope="module")
def ct_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("ct")
    truth = compressed_tensors_checkpoint(root / "ckpt")
    assert main(["--model", str(root / "ckpt"), "--output", str(root / "out"), "--latency", "off"]) == 0
    return root / "out", truth


@pytest.fixture(scope="module")
def q8bert_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("q8")
    truth = q8bert_checkpoint(root / "ckpt", eight_bit=True)
    assert main(["--model", str(root / "ckpt"), "--output", str(root / "out"), "--latency", "off"]) == 0
    return root / "out", truth


EXPORTS = ["modelopt_export", "smoothquant_export", "ct_export", "q8bert_export"]


@pytest.mark.parametrize("which", EXPORTS)
def test_int8_file_holds_the_checkpoints_scales_and_weights(which: str, request: pytest.FixtureRequest) -> None:
    out, truth = request.getfixturevalue(which)
    manifest = json.loads((out / "manifest.json").read_text())
    quantization, imported = manifest["quantization"], manifest["qat"]["int8"]
    assert quantization["samples"] == 0 and quantization["method"] == "learned"  # no calibration ran
    assert quantization["bias_corrected"] == [] and quantization["search"] is None
    assert imported["calibration"].startswith("none")
    assert manifest["quantization"]["calibration_rows"] == []
    assert quantization["quantized_op_counts"] == {"Attention": 3, "MatMul": 9}
    assert {s for n, s in imported["scale_source"].items() if n in imported["modules"] and " | " not in n} >= {
        "checkpoint"}
    baked = {n for n, s in imported["scale_source"].items() if s.startswith("float (fake-quantized")}
    assert len(baked) == (2 if which in ("modelopt_export", "smoothquant_export", "q8bert_export") else 0)
    graph = onnx.load(str(out / "model_quantized.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    checked = 0
    for node, modules in imported["modules"].items():
        if node in baked:  # the pooler / classifier weight, fake-quantized in float
            module = modules
            weight = inits[node] if inits[node].shape[0] == truth.stored_weight[module].shape[0] else inits[node].T
            q, step = _expected_int8(truth, module)
            expected = q.T.astype(np.float32) * step[:, None]
            if module in truth.pre_quant_scale:  # type: ignore[attr-defined]  # no input Mul: unsmoothed
                expected = expected * truth.pre_quant_scale[module].numpy()[None, :]  # type: ignore[attr-defined]
            np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-7)
            continue
        parts = [_expected_int8(truth, m) for m in modules.split(" | ")]
        weight = np.concatenate([p[0] for p in parts], 1)
        step = np.concatenate([p[1] for p in parts])
        assert np.array_equal(inits[f"{node}_weight_s8"], weight), node
        np.testing.assert_allclose(inits[f"{node}_weight_scale"], step, rtol=1e-6, atol=0)
        readers = {c.name for c in graph.graph.node} & {node, f"{node}_dequantize_x"}  # QAttention / MatMul's DQ
        quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"
                    and any(c.name in readers for c in graph.graph.node if n.output[0] in c.input)]
        input_step = [inits[n.input[1]] for n in quantize]
        zero = inits[quantize[0].input[2]]
        assert zero.dtype == np.uint8 and int(zero) == 128  # symmetric int8 re-encoded as uint8
        first = modules.split(" | ")[0]
        assert float(input_step[0]) == pytest.approx(truth.input_amax[first] / 127.0, rel=1e-6), node
        checked += 1
    assert checked == 12
    assert imported["session_options_without_vnni"] == {"session.x64quantprecision": "1"}


def _imported_runs(out: Path, truth: object) -> tuple[dict, Any, set[str], set[str], dict, np.ndarray, np.ndarray]:
    """(manifest, loaded checkpoint, modules whose INT8 input scale is the checkpoint's, modules run in float with
    fake-quantized weights, the 4 x 24 feeds, logits of the INT8 file as written, logits with fused kernels)."""
    from graphs.core.sessions import open_session

    manifest = json.loads((out / "manifest.json").read_text())
    checkpoint = load_checkpoint(truth.path)  # type: ignore[attr-defined]  (before sample_ids: same ids as ever)
    imported = manifest["qat"]["int8"]

    def modules(kind: str) -> set[str]:
        return {m for node, ms in imported["modules"].items() if imported["scale_source"][node].startswith(kind)
                for m in ms.split(" | ")}

    feeds = sample_ids(5)
    numpy_feeds = {k: v.numpy() for k, v in feeds.items()}
    found = open_session(out / "model_quantized.onnx", optimize=False).run(["logits"], numpy_feeds)[0]
    fused = open_session(out / "model_quantized.onnx").run(["logits"], numpy_feeds)[0]
    return manifest, checkpoint, modules("checkpoint"), modules("float (fake-quantized"), feeds, found, fused


@pytest.mark.parametrize("which", EXPORTS)
def test_int8_file_matches_the_fake_quantized_model(which: str, request: pytest.FixtureRequest) -> None:
    """Against the fake-quantized PyTorch model with the quantizers the graph implements: float noise when the
    graph runs as written (QuantizeLinear -> DequantizeLinear -> MatMul in float, as PyTorch computes it); with
    onnxruntime's fused integer kernels (MatMulIntegerToFloat) a last-bit difference can move a value that sits
    on a rounding tie to the next level, so there only most rows are at float noise (docs/qat.md). With every
    quantizer on (pooler and classifier too, which the graph keeps in float) it differs by what they do."""
    from exporter.qat_reference import fake_quantized_model

    manifest, checkpoint, implemented, weights_only, feeds, found, fused = _imported_runs(
        *request.getfixturevalue(which))
    with torch.no_grad():
        narrow = fake_quantized_model(checkpoint.model, checkpoint.qat, implemented,
                                      weights_only)(**feeds).logits.numpy()
        trained = fake_quantized_model(checkpoint.model, checkpoint.qat)(**feeds).logits.numpy()
        plain = checkpoint.model(**feeds).logits.numpy()
    assert np.abs(found - narrow).max() < 1e-5
    assert np.median(np.abs(fused - narrow).max(1)) < 1e-5
    assert np.abs(found - plain).max() > 1e-3  # the file is not the float model
    parity = manifest["qat"]["parity"]
    if which == "ct_export":  # its ignore list keeps the pooler and classifier float: nothing left out
        assert parity["quantizers_not_in_graph"] == []
        return
    assert np.abs(found - trained).max() > 1e-3  # the pooler/classifier input quantizers are not in the graph
    assert set(parity["quantizers_not_in_graph"]) >= {"bert.pooler.dense", "classifier"}
    assert weights_only == {"bert.pooler.dense", "classifier"} == set(parity["weight_quantizers_only"])
    cpu = {label: next(e for e in parity[label] if e["provider"] == "CPUExecutionProvider")
           for label in ("as_trained", "implemented")}
    assert cpu["implemented"]["mean_abs_error"] < cpu["as_trained"]["mean_abs_error"]


def test_full_range_int8_asks_for_exact_kernels_only_where_the_cpu_lacks_vnni(
        modelopt_export: tuple[Path, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """The imported file keeps its learned weights in [-128, 127]: on an x86 CPU without VNNI the runtime and
    verify open it with session.x64quantprecision=1 (from the manifest); with VNNI, and for other files, nothing."""
    import graphs.core.cpu as cpu
    from exporter.runtime import Runtime
    from exporter.runtime.parity import session_entries
    from exporter.runtime.verify import verify_artifact

    out, _ = modelopt_export
    manifest = json.loads((out / "manifest.json").read_text())
    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    monkeypatch.setattr(cpu, "cpu_has_vnni", lambda: True)
    assert session_entries(manifest, "model_quantized.onnx") == {}
    monkeypatch.setattr(cpu, "cpu_has_vnni", lambda: False)
    assert session_entries(manifest, "model_quantized.onnx") == {"session.x64quantprecision": "1"}
    assert session_entries(manifest, "model_optimized.onnx") == {}
    assert session_entries({"qat": None}, "model_quantized.onnx") == {}  # a calibrated file: unchanged
    runtime = Runtime.load(out, file="model_quantized.onnx")
    assert runtime.session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    report = verify_artifact(out, providers=("cpu",))
    assert report.ok, report.table()


@pytest.mark.parametrize("eight_bit", [False, True])
def test_q8bert_is_recognised_and_its_8bit_weights_dequantized(eight_bit: bool, tmp_path: Path) -> None:
    truth = q8bert_checkpoint(tmp_path / "q", eight_bit=eight_bit)
    checkpoint = load_checkpoint(tmp_path / "q")
    qat = checkpoint.qat
    assert qat is not None and qat.format == "q8bert" and checkpoint.task == "text-classification"
    assert len(qat.linears) == len(truth.input_amax) and len(qat.restored) == (len(truth.input_amax) * eight_bit)
    assert {k for k in qat.other if "embeddings" in k} == {f"bert.embeddings.{t}._step" for t in (
        "word_embeddings", "position_embeddings", "token_type_embeddings")}
    for name, scales in qat.linears.items():
        assert scales.input_scale == pytest.approx(truth.input_amax[name] / 127.0, rel=1e-6)
        assert torch.equal(scales.weight_int8, truth.stored_weight[name])
    assert _max_weight_error(checkpoint.model, truth.float_model) < 1e-7


def test_torch_ao_eager_qat_is_recognised_with_torchs_own_keys(tmp_path: Path) -> None:
    """Written by torch.ao itself (prepare_qat, three training steps): the weight scales are imported, the float
    weights load as trained, the output ranges are listed (not ignored), and with no learned input range the
    INT8 file is calibrated, which the manifest says."""
    truth = torch_ao_checkpoint(tmp_path / "ao")
    checkpoint = load_checkpoint(tmp_path / "ao")
    qat = checkpoint.qat
    assert qat is not None and qat.format == "torch-ao-eager" and len(qat.linears) == 18
    assert len(qat.other) == 18 and all(k.endswith("activation_post_process") for k in qat.other)
    for name, scales in qat.linears.items():
        torch.testing.assert_close(scales.weight_scale, truth.weight_amax[name] / 127.0, rtol=1e-6, atol=0)
        assert scales.input_scale is None
    found = checkpoint.model.state_dict()
    for name, weight in truth.stored_weight.items():
        assert torch.equal(found[f"{name}.weight"], weight)
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "ao"), "--output", str(out), "--calibration-samples", "8",
                 "--latency", "off"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qat"]["format"] == "torch-ao-eager"
    assert manifest["qat"]["int8"]["calibration"].startswith("calibrated from text")
    assert manifest["quantization"]["samples"] == 8


def test_dropped_heads_slice_the_learned_weights_and_scales(tmp_path: Path) -> None:
    """--drop-heads 0:1 removes head 1 of layer 0 (rows 32-63 of Q, K and V, columns 32-63 of the output
    projection): the INT8 file holds exactly the checkpoint's int8 rows / columns and steps of the heads kept,
    and matches the fake-quantized model with that head masked."""
    from exporter.qat_reference import fake_quantized_model
    from graphs.core.sessions import open_session

    truth = modelopt_checkpoint(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "m"), "--output", str(out), "--latency", "off", "--drop-heads",
                 "0:1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compaction"]["heads_per_layer"] == [3, 4, 4]
    imported = manifest["qat"]["int8"]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out / "model_quantized.onnx")).graph.initializer}
    kept = np.r_[0:32, 64:128]
    prefix = "bert.encoder.layer.0."
    node = next(n for n, m in imported["modules"].items() if m.startswith(f"{prefix}attention.self.query"))
    parts = [_expected_int8(truth, f"{prefix}attention.self.{p}") for p in ("query", "key", "value")]
    assert np.array_equal(inits[f"{node}_weight_s8"], np.concatenate([w[:, kept] for w, _ in parts], 1))
    np.testing.assert_allclose(inits[f"{node}_weight_scale"], np.concatenate([s[kept] for _, s in parts]), rtol=1e-6)
    node = next(n for n, m in imported["modules"].items() if m == f"{prefix}attention.output.dense")
    weight, step = _expected_int8(truth, f"{prefix}attention.output.dense")
    assert np.array_equal(inits[f"{node}_weight_s8"], weight[kept])
    np.testing.assert_allclose(inits[f"{node}_weight_scale"], step, rtol=1e-6)
    checkpoint = load_checkpoint(tmp_path / "m")
    with torch.no_grad():  # the head masked as the pipeline masks it: zero output-projection columns
        checkpoint.model.bert.encoder.layer[0].attention.output.dense.weight[:, 32:64] = 0.0
    sources = imported["scale_source"]
    implemented = {m for n, ms in imported["modules"].items() if sources[n] == "checkpoint" for m in ms.split(" | ")}
    weights_only = {m for n, m in imported["modules"].items() if sources[n].startswith("float (fake")}
    feeds = sample_ids(5)
    with torch.no_grad():
        expected = fake_quantized_model(checkpoint.model, checkpoint.qat, implemented, weights_only)(**feeds).logits
    found = open_session(out / "model_quantized.onnx", optimize=False).run(
        ["logits"], {k: v.numpy() for k, v in feeds.items()})[0]
    assert np.abs(found - expected.numpy()).max() < 1e-5


def test_calibration_options_for_a_learned_import_are_refused_with_one_line(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Options that only shape a calibrated INT8 file would be ignored for one built from learned scales: exit 2,
    one line naming them, nothing written."""
    modelopt_checkpoint(tmp_path / "m")
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "m"), "--output", str(out), "--latency", "off", "--tune",
                 "--calibration-samples", "8"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("export-model: error:")]
    assert len(errors) == 1 and "--calibration-samples, --tune" in errors[0] and "modelopt" in errors[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def ao_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """torch.ao eager QAT as users write it (whole-model x86 qconfig, embeddings None), exported."""
    root = tmp_path_factory.mktemp("ao")
    truth = torch_ao_checkpoint(root / "ckpt", whole_model=True)
    assert main(["--model", str(root / "ckpt"), "--output", str(root / "out"), "--latency", "off"]) == 0
    return root / "out", truth


def test_torch_ao_layernorm_ranges_are_the_learned_inputs_of_qkv_and_the_ffn(
        ao_export: tuple[Path, object]) -> None:
    """Under a whole-model qconfig, prepare_qat fake-quantizes every LayerNorm's output: Q/K/V of layer i read
    layer i-1's output.LayerNorm (layer 0: embeddings.LayerNorm), intermediate.dense the attention LayerNorm. The
    INT8 file quantizes those inputs with torch's learned scale and zero point (uint8) behind a Clip to
    [s (qmin - z), s (qmax - z)]; its int8 weights are torch's own weight fake quantizer's integers; nothing is
    calibrated; the linears whose input training did not round stay float with fake-quantized weights."""
    out, truth = ao_export
    manifest = json.loads((out / "manifest.json").read_text())
    quantization, imported = manifest["quantization"], manifest["qat"]["int8"]
    assert quantization["samples"] == 0 and quantization["method"] == "learned"
    assert imported["calibration"].startswith("none") and quantization["calibration_rows"] == []
    assert quantization["quantized_op_counts"] == {"Attention": 3, "MatMul": 3}
    sources = imported["scale_source"]
    assert sorted(imported["modules"][n] for n, s in sources.items() if s.startswith("float (fake-quantized "
                  "weight; no learned")) == sorted(f"bert.encoder.layer.{i}.{p}" for i in range(3)
                                                   for p in ("attention.output.dense", "output.dense"))
    graph = onnx.load(str(out / "model_quantized.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    producer = {o: n for n in graph.graph.node for o in n.output}
    ranges = truth.output_ranges  # type: ignore[attr-defined]
    checked = 0
    for node, modules in imported["modules"].items():
        if sources[node] != "checkpoint":
            continue
        layer, part = modules.split(" | ")[0].split(".encoder.layer.")[1].split(".", 1)
        feeding = ("bert.embeddings.LayerNorm" if layer == "0" else f"bert.encoder.layer.{int(layer) - 1}.output"
                   ".LayerNorm") if part.startswith("attention.self") else f"bert.encoder.layer.{layer}.attention.output.LayerNorm"
        scale, zero, qmin, qmax = ranges[feeding]
        assert (qmin, qmax) == (0, 127)  # torch's default x86 activation fake quantizer (reduce_range)
        for module in modules.split(" | "):
            assert manifest["qat"]["linears"][module]["input_from"] == feeding
        weights = []
        for module in modules.split(" | "):
            w, s = truth.stored_weight[module], truth.weight_amax[module] / 127.0  # type: ignore[attr-defined]
            faked = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(len(s), dtype=torch.int32), 0, -128, 127)
            q = torch.round(faked / s[:, None])
            assert torch.equal(q, torch.clamp(torch.round(w / s[:, None]), -128, 127))  # round(W / s)
            weights.append(q.T.numpy().astype(np.int8))
        assert np.array_equal(inits[f"{node}_weight_s8"], np.concatenate(weights, 1)), node
        readers = {c.name for c in graph.graph.node} & {node, f"{node}_dequantize_x"}
        quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"
                    and any(c.name in readers for c in graph.graph.node if n.output[0] in c.input)]
        assert len(quantize) == 1, node
        assert float(inits[quantize[0].input[1]]) == np.float32(scale)
        point = inits[quantize[0].input[2]]
        assert point.dtype == np.uint8 and int(point) == zero
        clip = producer[quantize[0].input[0]]
        assert clip.op_type == "Clip"
        assert float(inits[clip.input[1]]) == np.float32((qmin - zero) * np.float32(scale))
        assert float(inits[clip.input[2]]) == np.float32((qmax - zero) * np.float32(scale))
        checked += 1
    assert checked == 6


def test_torch_ao_int8_file_matches_the_fake_quantized_model(ao_export: tuple[Path, object]) -> None:
    """Against the fake-quantized model with the quantizers the graph implements (the LayerNorm output fake quant
    on the Q/K/V and FFN inputs, every linear's weight fake quant): float noise on the short batch as written,
    and the median row with fused kernels. The quantizers the graph does not implement (linear outputs, the
    LayerNorm outputs' residual readers) are listed, and switching them on moves the logits."""
    from exporter.qat_reference import fake_quantized_model

    manifest, checkpoint, implemented, weights_only, feeds, found, fused = _imported_runs(*ao_export)
    assert len(implemented) == 12 and len(weights_only) == 8
    with torch.no_grad():
        narrow = fake_quantized_model(checkpoint.model, checkpoint.qat, implemented,
                                      weights_only)(**feeds).logits.numpy()
        weights_alone = fake_quantized_model(checkpoint.model, checkpoint.qat, (),
                                             implemented | weights_only)(**feeds).logits.numpy()
        trained = fake_quantized_model(checkpoint.model, checkpoint.qat)(**feeds).logits.numpy()
    print(f"torch.ao parity, 4 x 24: as written {np.abs(found - narrow).max():.2e}, fused "
          f"{np.abs(fused - narrow).max():.2e} (median row {np.median(np.abs(fused - narrow).max(1)):.2e}), vs "
          f"weights-only {np.abs(found - weights_alone).max():.2e}, vs as trained {np.abs(found - trained).max():.2e}")
    assert np.abs(found - narrow).max() < 1e-5
    assert np.median(np.abs(fused - narrow).max(1)) < 1e-5
    assert np.abs(found - weights_alone).max() > 1e-4  # the inputs are rounded: not the weight quantizers alone
    parity = manifest["qat"]["parity"]
    assert "bert.encoder.layer.0.attention.self.query.activation_post_process" in parity["quantizers_not_in_graph"]
    assert "bert.embeddings.LayerNorm.activation_post_process" in parity["quantizers_not_in_graph"]
    assert "residual" in manifest["qat"]["not_in_graph"]["bert.embeddings.LayerNorm.activation_post_process"]

"""Latency cells: IOBinding runs compute what plain runs do, thread settings apply, peak memory is measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporter.latency import bind, measure_latency, peak_memory_mb


@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x [batch, 256] @ W (256 x 4096, 4 MiB of float32) -> Relu -> y."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(256, 4096)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4096])], [weight])
    path = tmp_path_factory.mktemp("latency") / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def _feeds(batch: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(batch).normal(size=(batch, 256)).astype(np.float32)}


def test_io_binding_run_gives_the_plain_run_outputs(matmul_model: Path) -> None:
    session = ort.InferenceSession(str(matmul_model), providers=["CPUExecutionProvider"])
    feeds = _feeds(4)
    binding = bind(session, "CPUExecutionProvider", feeds)
    session.run_with_iobinding(binding)
    np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], session.run(None, feeds)[0])


@pytest.mark.parametrize("io_binding", [False, True])
@pytest.mark.parametrize("threads", [0, 1])
def test_cells_hold_percentiles_and_throughput(matmul_model: Path, io_binding: bool, threads: int) -> None:
    result = measure_latency(matmul_model, "CPUExecutionProvider", {"b1": _feeds(1), "b64": _feeds(64)},
                             runs=5, threads=threads, io_binding=io_binding)
    assert set(result) == {"b1", "b64"}
    for cell in result.values():
        assert 0 < cell["median_ms"] <= cell["p90_ms"] <= cell["p99_ms"]
    assert result["b64"]["samples_per_s"] == pytest.approx(64e3 / result["b64"]["median_ms"])


def test_peak_memory_counts_the_weights_and_grows_with_the_batch(matmul_model: Path) -> None:
    small = peak_memory_mb(matmul_model, "CPUExecutionProvider", _feeds(1))
    large = peak_memory_mb(matmul_model, "CPUExecutionProvider", _feeds(4096))  # output 4096 x 4096 = 64 MiB
    if small is None:
        pytest.skip("no /proc/self/status on this platform")
    assert small >= 4  # the 4 MiB weight is resident
    assert large is not None and large >= small + 48

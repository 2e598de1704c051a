"""The FP16 variant (``model_fp16.onnx``): the fused graph in float16, with float32 inputs and outputs.

onnxruntime's ``OnnxModel.convert_float_to_float16(keep_io_types=True)`` converts every float initializer and
tensor to float16 and puts a Cast at the graph's float inputs and outputs, so a caller feeds and reads the same
types as with the FP32 files. Its default block list keeps the ops that have no float16 kernel in float32
(with Casts around them). The converter does not check what it made, so this module runs onnx's checker and
counts what was converted; parity (``exporter.runtime.parity``, ``fp16`` profile) judges the numbers.

This is a CUDA artifact: on CPU onnxruntime runs most float16 ops through Casts, slower than FP32; the
pipeline builds it where CUDA is present (or when asked, for a GPU deployment built on a CPU machine).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

logger = logging.getLogger(__name__)


@dataclass
class Float16Report:
    """What the conversion made: float16 initializers, float32 ones kept, and the Casts at the boundary."""

    float16_initializers: int
    float32_initializers: int
    casts: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def to_float16(source: Path, output: Path) -> Float16Report:
    """Write the float16 twin of ``source`` (an ONNX file, fused or not) to ``output``; float32 I/O kept."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(source)))
    model.convert_float_to_float16(keep_io_types=True)
    converted = model.model
    onnx.checker.check_model(converted)
    for value in (*converted.graph.input, *converted.graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            raise ValueError(f"float16 conversion of {source.name} changed the type of graph I/O {value.name!r}")
    types = [init.data_type for init in converted.graph.initializer]
    report = Float16Report(
        float16_initializers=types.count(onnx.TensorProto.FLOAT16),
        float32_initializers=types.count(onnx.TensorProto.FLOAT),
        casts=sum(node.op_type == "Cast" for node in converted.graph.node),
    )
    if not report.float16_initializers:
        raise ValueError(f"float16 conversion of {source.name} converted no initializer")
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(output))
    logger.info("wrote %s: %s", output, report)
    return report

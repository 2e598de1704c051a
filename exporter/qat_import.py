"""What a quantization-aware-trained checkpoint's import holds: the learned scales per linear, the quantizer
tensors taken out of the weights, and the weights as the float model should load them. The key patterns of each
format (see :mod:`exporter.qat`) live here, shared by the detection and the per-format readers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.weights import TensorInfo, WeightFiles
from graphs.core.errors import CheckpointError

MODELOPT_STATE = "modelopt_state.pth"
INC_FILES = ("best_configure.json", "inc_config.json", "qconfig.json")
MAX_STATE_BYTES = 64 * 2**20  # a modelopt_state.pth holds configs and per-quantizer attributes: kilobytes

MODELOPT_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>input|weight|output)_quantizer\.(?P<field>_amax|_pre_quant_scale)$")
QDQBERT_KEY = re.compile(r"^(?P<module>.+)\._(?P<role>input|weight|aftergemm)_quantizer\.(?P<field>_amax)$")
TORCH_AO_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<role>weight_fake_quant|activation_post_process)\.(?P<field>.+)$")
TORCH_AO_FX_KEY = re.compile(r"(?:^|\.)activation_post_process_\d+\.")
Q8BERT_KEY = re.compile(r"^(?P<module>.+)\.(?P<field>input_thresh|output_thresh|_step|quantized_weight|_weight_scale)$")
CT_KEY = re.compile(r"^(?P<module>.+)\.(?P<field>weight_scale|input_scale|weight_zero_point|input_zero_point"
                 r"|output_scale|weight_g_idx|weight_packed|weight_shape)$")
SUSPECT_KEY = re.compile(r"quantizer|fake_quant|activation_post_process|_thresh$|_packed_params|\.scale$|"
                      r"\.zero_point$|weight_scale$|input_scale$")


@dataclass
class LinearScales:
    """What the checkpoint learned for one linear layer (module name as stored, without the weight suffix)."""

    module: str
    weight_scale: torch.Tensor | None = None  # one per output channel (float32), int8 step of the weight
    weight_qmin: int = -128
    weight_qmax: int = 127
    input_scale: float | None = None  # step of the symmetric int8 input (amax / 127), None: not learned
    input_qmin: int = -128
    input_qmax: int = 127
    input_zero_point: int = 0
    pre_quant_scale: torch.Tensor | None = None  # ModelOpt SmoothQuant/AWQ: x * s before the input quantizer
    weight_int8: torch.Tensor | None = None  # [out, in] int8: the stored weight as its fake quantizer rounds it
    input_from: str | None = None  # torch.ao: the module whose output quantizer rounded this input

    def to_dict(self) -> dict[str, Any]:
        return {"weight_channels": None if self.weight_scale is None else int(self.weight_scale.numel()),
                "weight_range": [self.weight_qmin, self.weight_qmax],
                "input_scale": self.input_scale, "input_range": [self.input_qmin, self.input_qmax],
                "input_zero_point": self.input_zero_point, "pre_quant_scale": self.pre_quant_scale is not None,
                **({"input_from": self.input_from} if self.input_from else {})}


@dataclass(frozen=True)
class OutputRange:
    """A module output's learned affine fake quantizer (torch.ao ``activation_post_process``):
    ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int


@dataclass
class QatImport:
    """A quantization-aware-trained checkpoint's learned quantization, as read at load."""

    format: str  # modelopt | pytorch-quantization | compressed-tensors | torch-ao-eager | q8bert
    linears: dict[str, LinearScales] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)  # weight-file tensors that hold quantizer state
    other: dict[str, str] = field(default_factory=dict)  # quantizer -> why no linear of the graph implements it
    restored: dict[str, str] = field(default_factory=dict)  # weight tensor -> how its float value was restored
    files: list[Path] = field(default_factory=list)  # side files read (modelopt_state.pth)
    outputs: dict[str, OutputRange] = field(default_factory=dict)  # torch.ao: module -> its output quantizer

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "linears": {k: v.to_dict() for k, v in sorted(self.linears.items())},
                "quantizer_tensors": len(self.consumed), "not_in_graph": dict(sorted(self.other.items())),
                "restored_weights": dict(sorted(self.restored.items())),
                "side_files": [p.name for p in self.files]}


class QatWeights:
    """A :class:`WeightFiles` whose quantizer tensors are taken out (held by the :class:`QatImport`) and whose
    weights load as the float values the training meant (SmoothQuant multiplied back, int8 dequantized)."""

    def __init__(self, weights: WeightFiles, qat: QatImport, loaders: dict[str, Any],
                 added: dict[str, TensorInfo] | None = None) -> None:
        """``loaders``: weight name -> a function giving its float value; ``added``: weights only a loader makes
        (stored under another name, such as Q8BERT's ``quantized_weight``)."""
        self._weights, self._loaders = weights, loaders
        self.folder = weights.folder
        self.files = [*weights.files, *qat.files]
        self.tensors = {name: (TensorInfo(info.shape, "F32", info.file) if name in loaders else info)
                        for name, info in weights.tensors.items() if name not in qat.consumed}
        self.tensors.update(added or {})

    @property
    def total_numel(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def load(self, name: str) -> torch.Tensor:
        if name in self._loaders:
            return self._loaders[name]()
        return self._weights.load(name)

    def release(self) -> None:
        self._weights.release()


def refuse(path: Path, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path} is a quantization-aware-trained checkpoint in {what}, which export-model cannot "
                           f"import: {fix}")

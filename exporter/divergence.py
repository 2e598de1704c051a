"""Where a failing file first departs from the PyTorch reference, layer by layer (as Polygraphy does).

The layer boundaries come from the exported `model.onnx`: the TorchScript exporter scopes node names by module
(`/model/encoder/layer.3/output/LayerNorm/...`), so the last node of each `layer.<i>` scope produces that
layer's output. Those tensor names survive fusion and QDQ quantization, so any of the artifact's files can be
probed at the same boundaries. PyTorch's per-layer outputs come from forward hooks on the same modules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from exporter.architectures import Architecture
from graphs.core.sessions import open_session

_LAYER = re.compile(r"/layer\.(\d+)/")


@dataclass
class Divergence:
    boundary: str  # "embeddings" or "layer 3"
    tensor: str
    max_abs_error: float
    cosine: float

    def describe(self) -> str:
        return (f"first diverging: {self.boundary} (tensor {self.tensor}: max abs error {self.max_abs_error:.3g}, "
                f"cosine {self.cosine:.5f})")


def boundaries(model_onnx: Path) -> list[tuple[str, str]]:
    """[(label, tensor name)] in order: the embeddings output, then each encoder layer's output."""
    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    last: dict[str, str] = {}
    for node in graph.node:  # exported graphs are stored in topological order
        match = _LAYER.search(node.name)
        if match:
            last[f"layer {int(match.group(1))}"] = node.output[0]
        elif "/embeddings/" in node.name:
            last["embeddings"] = node.output[0]
    ordered = ["embeddings"] if "embeddings" in last else []
    ordered += sorted((k for k in last if k != "embeddings"), key=lambda k: int(k.split()[1]))
    return [(label, last[label]) for label in ordered]


def torch_boundaries(model: nn.Module, architecture: Architecture, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference model's embeddings and per-layer outputs for one batch."""
    captured: dict[str, np.ndarray] = {}

    def hook(label: str):  # noqa: ANN202 - a forward-hook factory
        def record(module: nn.Module, args: object, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple) else output
            captured[label] = tensor.detach().float().numpy()
        return record

    handles = [model.base_model.embeddings.register_forward_hook(hook("embeddings"))]
    handles += [view.layer.register_forward_hook(hook(f"layer {view.index}")) for view in architecture.layers(model)]
    try:
        with torch.no_grad():
            model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    finally:
        for handle in handles:
            handle.remove()
    return captured


def locate(
    candidate: Path, layer_tensors: Sequence[tuple[str, str]], reference: dict[str, np.ndarray],
    feeds: dict[str, np.ndarray], atol: float, min_cosine: float,
) -> Divergence | None:
    """The first boundary where `candidate` leaves the reference by more than `atol` (max abs error over
    unmasked positions) or below `min_cosine` (mean per-row cosine); None when every probed boundary holds."""

    model = onnx.load(str(candidate))
    produced = {out for node in model.graph.node for out in node.output}
    probes = [(label, name) for label, name in layer_tensors if name in produced and label in reference]
    existing = {o.name for o in model.graph.output}
    for _, name in probes:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = open_session(model.SerializeToString())
    names = {i.name for i in session.get_inputs()}
    values = session.run([n for _, n in probes], {k: v for k, v in feeds.items() if k in names})
    mask = feeds["attention_mask"].astype(bool)
    for (label, name), got in zip(probes, values, strict=True):
        expected = reference[label]
        a, b = expected[mask].astype(np.float64), got[mask].astype(np.float64)
        error = float(np.abs(a - b).max())
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        cosine = float(np.mean((a * b).sum(-1) / np.where(norms > 0, norms, 1.0)))
        if error > atol or cosine < min_cosine:
            return Divergence(label, name, error, cosine)
    return None

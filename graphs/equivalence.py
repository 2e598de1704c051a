"""Run a graph before and after a rewrite on the same small inputs and measure how far the outputs moved.

A cheap guard for graph passes, not the parity stage: both sides are ONNX graphs run by onnxruntime on
CPU, so this catches a pass that changed the math (wrong head count, a mask format that assumes right
padding) without needing PyTorch. The inputs cover a full row, a right-padded row, a left-padded row and
a row with a hole in the mask; outputs are compared only where the mask is 1, since padded positions
are allowed to differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphs.core.sessions import open_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EquivalenceReport:
    """Largest absolute output difference (over positions whose mask is 1) and the largest reference value."""

    max_abs_diff: float
    max_abs_reference: float
    padding: tuple[str, ...]

    def within(self, atol: float, rtol: float) -> bool:
        """True when ``max_abs_diff <= atol + rtol * max_abs_reference``."""
        return self.max_abs_diff <= atol + rtol * self.max_abs_reference


def sample_mask(batch: int, seq: int, padding: tuple[str, ...]) -> np.ndarray:
    """A 0/1 int64 mask of ``(batch, seq)``: row 0 full, later rows cycle through ``padding``.

    ``padding`` holds any of ``"right"``, ``"left"`` and ``"hole"``; each row drops a quarter of the
    sequence (at least one token) at the end, at the start, or in the middle.
    """
    mask = np.ones((batch, seq), dtype=np.int64)
    drop = max(1, seq // 4)
    for row in range(1, batch):
        kind = padding[(row - 1) % len(padding)] if padding else "none"
        if kind == "right":
            mask[row, seq - drop :] = 0
        elif kind == "left":
            mask[row, :drop] = 0
        elif kind == "hole":
            start = (seq - drop) // 2
            mask[row, start : start + drop] = 0
    return mask


def compare_graphs(
    reference: Path,
    candidate: Path,
    padding: tuple[str, ...] = ("right", "left", "hole"),
    batch: int = 4,
    seq: int = 16,
    seed: int = 0,
) -> EquivalenceReport:
    """Run both graphs on one seeded batch and compare every output where the mask is 1.

    Inputs are recognised by name: ``*mask*`` gets :func:`sample_mask`, ``*token_type*`` zeros,
    ``*position*`` ``0..seq-1``; any other integer input is taken as token ids, drawn below the row count
    of the embedding table it indexes (default 2 when that table is not found). Defaults: batch 4,
    seq 16, seed 0, padding right, left and hole.
    """
    ref_model = onnx.load(str(reference), load_external_data=False)
    feeds = _sample_feeds(ref_model, batch, seq, padding, np.random.default_rng(seed))
    mask = next((v for k, v in feeds.items() if "mask" in k.lower()), np.ones((batch, seq), dtype=np.int64))
    ref_out = _run(reference, feeds)
    cand_out = _run(candidate, feeds)
    max_diff = max_ref = 0.0
    for name, ref in ref_out.items():
        if name not in cand_out:
            raise ValueError(f"output {name!r} of {reference} is missing from {candidate}")
        cand = cand_out[name]
        keep = (
            mask.astype(bool)
            if ref.ndim >= 2 and ref.shape[:2] == mask.shape
            else np.ones(ref.shape[:1], bool)
        )
        max_diff = max(max_diff, float(np.max(np.abs(ref[keep] - cand[keep]), initial=0.0)))
        max_ref = max(max_ref, float(np.max(np.abs(ref[keep]), initial=0.0)))
    logger.debug(
        "compared %s and %s: max abs diff %.3g (reference max %.3g)", reference, candidate, max_diff, max_ref
    )
    return EquivalenceReport(max_abs_diff=max_diff, max_abs_reference=max_ref, padding=padding)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Compare the graphs as written: onnxruntime's own fusions would blur which side did what.
    session = open_session(path, optimize=False)
    wanted = {i.name for i in session.get_inputs()}
    outputs = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), outputs, strict=True)}


def _sample_feeds(
    model: onnx.ModelProto, batch: int, seq: int, padding: tuple[str, ...], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    vocab = _embedding_rows(model)
    feeds: dict[str, np.ndarray] = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        name = graph_input.name.lower()
        dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
        if "mask" in name:
            value = sample_mask(batch, seq, padding)
        elif "token_type" in name:
            value = np.zeros((batch, seq))
        elif "position" in name:
            value = np.broadcast_to(np.arange(seq), (batch, seq))
        else:
            value = rng.integers(0, vocab.get(graph_input.name, 2), size=(batch, seq))
        feeds[graph_input.name] = np.ascontiguousarray(value, dtype=dtype)
    return feeds


def _embedding_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Rows of the constant table each graph input indexes directly through a Gather."""
    tables = {t.name: t.dims for t in model.graph.initializer}
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in tables and len(tables[node.input[0]]) == 2:
            rows[node.input[1]] = int(tables[node.input[0]][0])
    return rows

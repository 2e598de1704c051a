"""A read-side view of an onnxruntime ``OnnxModel`` for our own passes: who reads and who writes each tensor,
the single reader of a tensor, and an initializer's value. Built once per pass; the maps describe the graph as
it was when the view was made."""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, numpy_helper


class GraphView:
    def __init__(self, model: object) -> None:
        self.model = model
        self.graph = model.model.graph  # type: ignore[attr-defined]
        self.consumers: dict[str, list[NodeProto]] = model.input_name_to_nodes()  # type: ignore[attr-defined]
        self.producers: dict[str, NodeProto] = model.output_name_to_node()  # type: ignore[attr-defined]
        self.outputs = {output.name for output in self.graph.output}

    def sole(self, tensor: str) -> NodeProto | None:
        """The only node reading ``tensor``; None when several read it or it is a graph output."""
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name``; None when ``name`` is not an initializer."""
        init = self.model.get_initializer(name)  # type: ignore[attr-defined]
        return None if init is None else numpy_helper.to_array(init)

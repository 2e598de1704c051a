"""The deployment side: everything `export-model verify`, `run` and `sign` do, with no torch, transformers or onnx.

It imports only itself and the base layer (graphs/core), plus numpy, onnxruntime, tokenizers and cryptography;
tests/test_layers.py keeps it that way. Reading an artifact someone else could have written goes through
:mod:`exporter.runtime.artifact` only. The Python API is :class:`exporter.runtime.Runtime`.
"""

from exporter.runtime.model import Runtime

__all__ = ["Runtime"]

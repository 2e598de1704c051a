"""The base layer every package of the project stands on: the error family and exit codes, the one onnxruntime
session factory (telemetry off, provider checks), progress bars. It imports only the standard library, numpy,
onnxruntime and tqdm: never onnx, torch, transformers, or the project's higher packages."""

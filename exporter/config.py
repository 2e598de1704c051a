"""The run's options, declared once: frozen dataclasses, and the one table that maps CLI flags onto them.

The manifest stores `ExportConfig.to_dict()`; `--config FILE` (a manifest or such a dict) replays it, with
flags given on the command line taking precedence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibration.data import file_kind
from calibration.quantize import QuantizationConfig
from exporter.runtime.parity import ParityConfig
from graphs.core.errors import UsageError
from graphs.fusion import FusionConfig


@dataclass(frozen=True)
class ExportConfig:
    """Everything a run depends on.

    model: checkpoint folder or hub id; None exports the bundled all-MiniLM-L6-v2.
    output: artifact folder; None means `artifacts/<model folder name>`.
    task: one of the four tasks; None infers it from `config.architectures`.
    force: replace an earlier export-model artifact at `output` (a folder whose manifest.json names export-model
        and that holds only the files it lists); any other non-empty folder is refused, with or without it.
    drop_heads: heads to remove on request, "LAYER:HEAD,HEAD;LAYER:HEAD" (original indices).
    calibration_data: text file (one per line), JSONL, or `datasets` folder; None uses the built-in corpus.
    calibration_field: JSONL / dataset field holding the text (default "text").
    fp16: build model_fp16.onnx (float16, float32 I/O): "auto" (default) where CUDA is present, "always" (e.g. a
        GPU deployment built on a CPU machine; checked on CPU, slowly), "never".
    openvino_int8: build model_qdq.onnx (INT8 in the QDQ form OpenVINO runs on its INT8 kernels): "auto"
        (default) where openvino is installed, "never" (saves its calibration time, about a minute for MiniLM).
    max_length: the longest sequence the artifact is checked at (parity gets a 2 x max_length batch): None means
        the model's own maximum (positions, tokenizer) capped at 512, and 384 for question answering (the usual
        serving window). A sentence-transformers `max_seq_length` does not cap it (the runtime still truncates to it).
    eval_data: labelled data (JSONL, CSV, SQuAD JSON, or a `datasets` folder) for gold metrics of the PyTorch
        checkpoint and every file (`exporter.eval_data`); None: no gold evaluation.
    eval_fields: "key=name,..." renaming the task's fields in `eval_data`.
    eval_batch_size: texts per model call in the evaluation (its latency column is per call).
    latency: what the latency stage measures, per file and provider: "quick" (default) batch 1 and 8 at
        sequence 128 and batch 1 at `max_length`, with peak memory at batch 8; "full" adds batch 2 and 4, one
        thread per session at batch 1 and 8, and the CPU throughput modes (about 4x the time). The manifest's
        `latency.mode` and `latency.shapes` say what was measured; "off" skips the stage (the manifest's
        `latency` is empty and `run` picks the fused FP32 graph by default).
    """

    model: str | None = None
    output: str | None = None
    task: str | None = None
    force: bool = False
    drop_heads: str = ""
    calibration_data: str | None = None
    calibration_field: str = "text"
    fp16: str = "auto"
    openvino_int8: str = "auto"
    max_length: int | None = None
    eval_data: str | None = None
    eval_fields: str = ""
    eval_batch_size: int = 8
    latency: str = "quick"
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExportConfig:
        return _build(cls, values, "")

    def replace(self, dotted: str, value: Any) -> ExportConfig:
        """A copy with the (possibly nested, `a.b`) field set to `value`."""
        head, _, rest = dotted.partition(".")
        if rest:
            return dataclasses.replace(self, **{head: dataclasses.replace(getattr(self, head), **{rest: value})})
        return dataclasses.replace(self, **{head: value})


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise UsageError(f"config option {prefix.rstrip('.') or 'root'} must be a mapping, found {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"unknown config options {[prefix + u for u in unknown]}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{prefix}{name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


CONFIG_FILE_LIMIT = 4 << 20
"""Largest `--config` file read (4 MiB; an export's manifest.json is tens of kB)."""


def load_config_file(path: Path) -> dict[str, Any]:
    """Options from a manifest.json (its "options") or a plain options JSON file.

    Only a regular file of at most CONFIG_FILE_LIMIT bytes is opened: a FIFO, a device (/dev/zero) or a socket
    is refused from its `stat` before it is opened (opening a FIFO with no writer blocks).
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except OSError as error:
        raise UsageError(f"--config {path} cannot be read ({error.strerror}); pass a manifest.json or options file") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"--config {path} is a {file_kind(info.st_mode)}, not a regular file; pass a manifest.json "
                         "or options file")
    if info.st_size > CONFIG_FILE_LIMIT:
        raise UsageError(f"--config {path} is {info.st_size:,} bytes, over the {CONFIG_FILE_LIMIT >> 20} MiB limit "
                         "for an options file; pass a manifest.json or options file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(CONFIG_FILE_LIMIT + 1)  # bounded even if the file grows after the stat
    except OSError as error:
        raise UsageError(f"--config {path} cannot be read ({error.strerror}); pass a manifest.json or options file") from None
    if len(raw) > CONFIG_FILE_LIMIT:
        raise UsageError(f"--config {path} is over the {CONFIG_FILE_LIMIT >> 20} MiB limit for an options file; "
                         "pass a manifest.json or options file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path} is not valid JSON ({error}); pass a manifest.json or options file") from None
    except RecursionError:
        raise UsageError(f"--config {path} nests its JSON too deeply to be options; pass a manifest.json or "
                         "options file") from None
    if isinstance(data, dict) and "options" in data and "schema_version" in data:
        data = data["options"]
    return data


@dataclass(frozen=True)
class Option:
    """One CLI flag and the config field it sets (dotted for nested configs)."""

    flag: str
    field: str
    help: str
    choices: tuple[str, ...] | None = None
    kind: type | None = None  # the value's type where the field's default (None) does not tell it


# The one place flags meet config fields. Types and defaults come from the dataclasses themselves.
OPTIONS: tuple[Option, ...] = (
    Option("--model", "model", "checkpoint folder or hub id (default: the bundled all-MiniLM-L6-v2)"),
    Option("--output", "output", "artifact folder (default: artifacts/<model name>)"),
    Option("--task", "task", "task (default: inferred from config.architectures)"),
    Option("--force", "force", "replace an earlier export-model artifact at --output (never any other folder)"),
    Option("--drop-heads", "drop_heads", "remove heads on request, e.g. '0:3,5;2:1' (layer:heads, original indices)"),
    Option("--calibration-data", "calibration_data", "calibration texts: .txt (one per line), .jsonl, or a datasets folder"),
    Option("--calibration-field", "calibration_field", "JSONL/dataset field holding the text"),
    Option("--calibration-samples", "quantization.samples", "number of calibration texts"),
    Option("--calibration-method", "quantization.method", "range calibration method"),
    Option("--quantization-preset", "quantization.preset", "named INT8 preset"),
    Option("--tune", "quantization.tune",
           "quantize with every CPU preset, time them here, keep the fastest that meets the accuracy bars"),
    Option("--seed", "quantization.seed", "seed for calibration sampling"),
    Option("--int8-weights", "quantization.int8_weights",
           "int8 weight range: full [-127,127] (exact only on CPUs with VNNI, or ARM), reduced [-63,63] (exact on "
           "every x86 CPU: AVX2 kernels saturate full-range weights), auto (full where this machine has VNNI)",
           ("auto", "full", "reduced")),
    Option("--max-accuracy-drop", "quantization.max_accuracy_drop",
           "allowed task-metric drop of INT8 vs FP32 (fraction); the most harmful nodes fall back to FP32 until it holds"),
    Option("--search-budget", "quantization.search_budget_s",
           "seconds the INT8 accuracy search may take (default 300); past them the untested nodes go back to FP32 "
           "and the manifest says so"),
    Option("--search-strategy", "quantization.search_strategy",
           "how the INT8 accuracy search ranks and falls back: paired (one paired FP32/INT8 run ranks the nodes, the "
           "shortest passing prefix, refined, goes back) or leave-one-out (one trial per node, then one node at a time)",
           ("paired", "leave-one-out")),
    Option("--parity-atol", "parity.fp32_atol", "largest absolute error allowed for FP32 files"),
    Option("--fp16", "fp16", "build model_fp16.onnx: auto (where CUDA is present), always, never",
           ("auto", "always", "never")),
    Option("--openvino-int8", "openvino_int8", "build model_qdq.onnx, INT8 for OpenVINO: auto (where openvino is "
           "installed) or never; its accuracy search runs its candidates on OpenVINO and shares --search-budget",
           ("auto", "never")),
    Option("--max-length", "max_length", "longest sequence parity checks, in a 2 x N batch (default: the model's "
           "maximum capped at 512; 384 for question answering)", kind=int),
    Option("--eval-data", "eval_data", "labelled data for gold metrics: .jsonl, .csv, SQuAD .json, or a datasets "
           "folder (fields per task: see --eval-fields)"),
    Option("--eval-fields", "eval_fields", "rename eval-data fields, e.g. 'text=sentence,label=intent' (keys: "
           "text, text_pair, label | question, context, answers | tokens, tags | sentence1, sentence2, score)"),
    Option("--latency", "latency", "what the latency stage measures: quick (batch 1 and 8 at 128 tokens, batch 1 at "
           "--max-length), full (also batch 2 and 4, one thread per session, throughput modes) or off",
           ("quick", "full", "off")),
    Option("--eval-batch-size", "eval_batch_size", "texts per model call when evaluating (latency is per call)"),
    Option("--providers", "parity.providers", "execution providers for parity, comma-separated (cpu, cuda, ...)"),
)


def field_default(dotted: str) -> Any:
    value: Any = ExportConfig()
    for part in dotted.split("."):
        value = getattr(value, part)
    return value

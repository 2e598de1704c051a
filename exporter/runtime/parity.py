"""Numerical parity: an ONNX file's outputs against stored PyTorch reference outputs, on real text, with padding.

Inputs are real passages at several (batch, sequence) shapes, cut to different lengths so every batch holds
padded rows. Token-level outputs are compared where the attention mask is 1 (what a padded position holds is
unspecified and differs between kernels). FP32 files must match within an absolute tolerance; INT8 files are
judged by the cosine of each sample's output to the reference, and a task metric is recorded beside it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.runtime.files import FP32_ATOL_MAX, MIN_COSINE_FLOOR, QUANTIZED_FILE
from exporter.runtime.outputs import SENTENCE_OUTPUT, token_level
from graphs.core.cpu import exact_int8_options
from graphs.core.errors import ProviderUnavailableError, first_line, from_onnxruntime
from graphs.core.sessions import PROVIDERS, open_session

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ParityConfig:
    """How parity is judged.

    shapes: (batch, sequence) grid; default 1x16, 4x64, 8x128 (capped at the model's maximum length).
    fp32_atol: largest absolute error allowed for FP32 files (default 1e-4).
    int8_min_cosine: smallest mean per-sample cosine to the reference allowed for INT8 files (default 0.99).
    fp16_min_cosine: the same for the FP16 file (default 0.999).
    bf16_min_cosine: the same for an FP32 file run by OpenVINO in bfloat16 (default 0.999).
    providers: execution providers to check, short or full names; "auto" (default) checks every provider
        onnxruntime offers here and records CUDA as a skip, with its reason, where it is absent.
    """

    shapes: tuple[tuple[int, int], ...] = ((1, 16), (4, 64), (8, 128))
    fp32_atol: float = 1e-4
    int8_min_cosine: float = 0.99
    fp16_min_cosine: float = 0.999
    bf16_min_cosine: float = 0.999
    providers: tuple[str, ...] = ("auto",)

    def __post_init__(self) -> None:
        # A NaN bar never fails (`err > nan` is False) and an infinite or negative one is no bar: refuse them here,
        # so flags and `--config` replays alike are checked.
        problems = []
        # The same bars bound what `verify` accepts from a manifest (exporter/runtime/artifact.py): one written outside
        # them was not written by export-model.
        if not _is_number(self.fp32_atol) or not math.isfinite(self.fp32_atol) or not 0 <= self.fp32_atol <= FP32_ATOL_MAX:
            problems.append(f"fp32_atol must be a finite number >= 0 and <= {FP32_ATOL_MAX:g} (e.g. 1e-4), got "
                            f"{self.fp32_atol!r}")
        for name in ("int8_min_cosine", "fp16_min_cosine", "bf16_min_cosine"):
            value = getattr(self, name)
            if not _is_number(value) or not MIN_COSINE_FLOOR <= value <= 1.0:  # NaN and infinities fail too
                problems.append(f"{name} must be a number in [{MIN_COSINE_FLOOR:g}, 1], got {value!r}")
        if not isinstance(self.shapes, tuple) or not self.shapes or not all(
            isinstance(s, tuple) and len(s) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                         for n in s) for s in self.shapes):
            problems.append(f"shapes must be (batch, sequence) pairs of positive integers, got {self.shapes!r}")
        if not isinstance(self.providers, tuple) or not self.providers or not all(
                isinstance(p, str) and p for p in self.providers):
            problems.append(f"providers must name at least one execution provider, got {self.providers!r}")
        if problems:
            raise ValueError("invalid parity settings: " + "; ".join(problems))

    def min_cosine(self, precision: str) -> float:
        """The mean-cosine bar of a reduced-precision run ("fp16", "bf16", or "int8" and "int8-bf16": an INT8
        file is held to the INT8 bar whatever its float parts run in)."""
        return {"fp16": self.fp16_min_cosine, "bf16": self.bf16_min_cosine}.get(precision, self.int8_min_cosine)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ParityEntry:
    file: str
    provider: str
    precision: str  # "fp32" | "fp16" | "bf16" | "int8" | "int8-bf16" (OpenVINO: an INT8 file, float parts in bf16)
    status: str  # "pass" | "fail" | "skip"
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    min_cosine: float | None = None
    mean_cosine: float | None = None
    metric: dict[str, float] = field(default_factory=dict)
    tolerance: str = ""
    reason: str | None = None
    first_divergence: str | None = None  # on failure: the first layer boundary that leaves the reference
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    # per parity batch: its (batch, sequence) shape as run, max abs error and mean / min cosine over its rows
    per_shape: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_session(session: Any, batches: Sequence[Batch], output_names: Sequence[str]) -> list[Batch]:
    names = {i.name for i in session.get_inputs()}
    return [dict(zip(output_names, session.run(list(output_names), {k: v for k, v in b.items() if k in names}),
                     strict=True)) for b in batches]


def compare(
    file: str, provider: str, precision: str, task: str, batches: Sequence[Batch], expected: Sequence[Batch],
    actual: Sequence[Batch], config: ParityConfig,
) -> ParityEntry:
    """Judge `actual` against `expected` under `precision`'s tolerance profile."""
    entry = ParityEntry(file=file, provider=provider, precision=precision, status="pass")
    max_errors, mean_errors, cosines = [], [], []
    for name in expected[0]:
        errors, sums, count = [], 0.0, 0
        per_token = token_level(task, name)
        for feeds, ref, out in zip(batches, expected, actual, strict=True):
            mask = feeds["attention_mask"].astype(bool)
            diff = np.abs(_valid(ref[name], mask, per_token) - _valid(out[name], mask, per_token))
            errors.append(float(diff.max()))
            sums += float(diff.sum())
            count += diff.size
            cosines.extend(_row_cosines(ref[name], out[name], mask, per_token))
        entry.per_output[name] = {"max_abs_error": max(errors), "mean_abs_error": sums / max(count, 1)}
        max_errors.append(max(errors))
        mean_errors.append(sums / max(count, 1))
    for index, (feeds, ref, out) in enumerate(zip(batches, expected, actual, strict=True)):
        mask = feeds["attention_mask"].astype(bool)
        worst, row_cosines = 0.0, []
        for name in ref:
            per_token = token_level(task, name)
            worst = max(worst, float(np.abs(_valid(ref[name], mask, per_token) - _valid(out[name], mask, per_token)).max()))
            row_cosines.extend(_row_cosines(ref[name], out[name], mask, per_token))
        entry.per_shape.append({"batch": index, "shape": list(mask.shape), "max_abs_error": worst,
                                "mean_cosine": float(np.mean(row_cosines)), "min_cosine": float(np.min(row_cosines))})
    entry.max_abs_error = max(max_errors)
    entry.mean_abs_error = float(np.mean(mean_errors))
    entry.min_cosine = float(min(cosines))
    entry.mean_cosine = float(np.mean(cosines))
    entry.metric = task_metric(task, batches, expected, actual)
    if precision == "fp32":
        entry.tolerance = f"max_abs_error <= {config.fp32_atol:g}"
        if entry.max_abs_error > config.fp32_atol or not np.isfinite(entry.max_abs_error):
            entry.status = "fail"
            entry.reason = f"max abs error {entry.max_abs_error:.3g} > {config.fp32_atol:g}"
    else:
        bar = config.min_cosine(precision)
        entry.tolerance = f"mean_cosine >= {bar:g}"
        if not entry.mean_cosine >= bar:
            entry.status = "fail"
            entry.reason = f"mean cosine {entry.mean_cosine:.4f} < {bar:g}"
    return entry


def _valid(values: np.ndarray, mask: np.ndarray, per_token: bool) -> np.ndarray:
    """Token-level outputs at unmasked positions only; sequence-level outputs whole."""
    return values[mask] if per_token else values


def _row_cosines(ref: np.ndarray, out: np.ndarray, mask: np.ndarray, per_token: bool) -> list[float]:
    result = []
    for row in range(ref.shape[0]):
        a, b = ref[row], out[row]
        if per_token:
            a, b = a[mask[row]], b[mask[row]]
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        result.append(float(a @ b / denominator) if denominator > 0 else float(np.array_equal(a, b)))
    return result


def task_metric(task: str, batches: Sequence[Batch], expected: Sequence[Batch], actual: Sequence[Batch]) -> dict[str, float]:
    """The figure a user of `task` cares about, `actual` vs `expected`."""
    if task == "feature-extraction" and SENTENCE_OUTPUT in expected[0]:
        cos = []
        for ref, out in zip(expected, actual, strict=True):
            a, b = ref[SENTENCE_OUTPUT].astype(np.float64), out[SENTENCE_OUTPUT].astype(np.float64)
            cos.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        return {"sentence_embedding_cosine": float(np.mean(cos)), "sentence_embedding_min_cosine": float(np.min(cos))}
    if task == "feature-extraction":
        cos = []
        for feeds, ref, out in zip(batches, expected, actual, strict=True):
            mask = feeds["attention_mask"][..., None].astype(np.float64)
            a = (ref["last_hidden_state"] * mask).sum(1) / mask.sum(1)
            b = (out["last_hidden_state"] * mask).sum(1) / mask.sum(1)
            cos.extend((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        return {"mean_pooled_cosine": float(np.mean(cos))}
    agree, total = 0, 0
    for feeds, ref, out in zip(batches, expected, actual, strict=True):
        mask = feeds["attention_mask"].astype(bool)
        for name in ref:
            if name == SENTENCE_OUTPUT:
                continue
            a, b = ref[name].argmax(-1), out[name].argmax(-1)
            if task == "token-classification":
                a, b = a[mask], b[mask]
            elif task == "question-answering":
                a, b = ref[name].copy(), out[name].copy()
                a[~mask], b[~mask] = -np.inf, -np.inf
                a, b = a.argmax(-1), b.argmax(-1)
            agree += int((a == b).sum())
            total += a.size
    name = {"text-classification": "label_agreement", "token-classification": "token_label_agreement",
            "question-answering": "start_end_agreement"}[task]
    return {name: agree / max(total, 1)}


def resolve_providers(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(providers to run, {provider: skip reason}). An explicitly named provider that is absent is an error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if tuple(names) == ("auto",):
        run = [p for p in available if p in (PROVIDERS["cpu"], PROVIDERS["cuda"])]
        skipped = {} if PROVIDERS["cuda"] in available else {
            PROVIDERS["cuda"]: f"not available in this onnxruntime build (available: {available}); install onnxruntime-gpu"}
        return run, skipped
    run = []
    for name in names:
        provider = PROVIDERS.get(name.lower(), name)
        if provider not in available:
            short = {v: k for k, v in PROVIDERS.items() if v in available}
            raise ProviderUnavailableError(
                f"{provider} requested; available: {available}. Install its onnxruntime build or pass "
                f"--providers {','.join(short.values()) or 'auto'}"
            )
        run.append(provider)
    return run, {}


def session_entries(manifest: Mapping[str, Any], file: str) -> dict[str, str]:
    """The session options ``file`` of the artifact described by ``manifest`` needs on this machine: an INT8 file
    imported with full-range learned weights (``qat.int8.session_options_without_vnni``) asks for exact int8
    products where this x86 CPU lacks VNNI (:func:`graphs.core.cpu.exact_int8_options`); none otherwise."""
    qat = manifest.get("qat")
    int8 = qat.get("int8") if isinstance(qat, dict) else None
    asked = int8.get("session_options_without_vnni") if isinstance(int8, dict) and file == QUANTIZED_FILE else None
    return exact_int8_options(bool(asked))


def check_file(
    path: Path | str, precision: str, task: str, batches: Sequence[Batch], expected: Sequence[Batch],
    config: ParityConfig, model: bytes | Path | None = None, options: Mapping[str, str] | None = None,
) -> list[ParityEntry]:
    """Parity entries for one file on every configured provider (an absent one under "auto" is a recorded skip).
    `model`: the file's bytes, already read and checked, or a private copy of them (the deployment side, see
    `Artifact.model_source`); None opens `path`. `options`: its session options (:func:`session_entries`). A file
    onnxruntime cannot load or run is a `fail` entry saying why, not an exception."""
    run, skipped = resolve_providers(config.providers)
    name = Path(path).name if model is None else str(path)
    entries = [ParityEntry(name, provider, precision, "skip", reason=reason) for provider, reason in skipped.items()]
    output_names = list(expected[0])
    for provider in run:
        start = time.perf_counter()
        try:
            actual = run_session(open_session(Path(path) if model is None else model, provider, entries=options),
                                 batches, output_names)
        except ProviderUnavailableError:
            raise
        except Exception as error:
            if not from_onnxruntime(error):
                raise
            entries.append(ParityEntry(name, provider, precision, "fail", reason=ort_failure(error)))
            continue
        entry = compare(name, provider, precision, task, batches, expected, actual, config)
        log.info("parity %s on %s: %s (max abs %.2e, mean cosine %.6f) in %.1fs", name, provider, entry.status,
                 entry.max_abs_error, entry.mean_cosine, time.perf_counter() - start)
        entries.append(entry)
    return entries


def ort_failure(error: BaseException) -> str:
    """One line for onnxruntime failing on a model: an allocation past the memory limit named as such."""
    text = str(error)
    if "Failed to allocate memory" in text or "bad_alloc" in text:
        return ("onnxruntime cannot load or run it: it asked for more memory than the limit allows "
                f"({text[text.find('Failed to allocate'):][:120] if 'Failed to allocate' in text else 'bad_alloc'})")
    return f"onnxruntime cannot load or run it: {first_line(error, 200)}"


def failure_table(entries: Sequence[ParityEntry]) -> str:
    rows = [f"  {e.file:<24} {e.provider:<24} {e.status:<5} {e.reason}"
            + (f"; {e.first_divergence}" if e.first_divergence else "") for e in entries if e.status == "fail"]
    return "\n".join(["  file                     provider                 status reason", *rows])

"""Orders the stages and owns the work folder; holds no stage logic.

    resolve -> load -> compact -> export -> fuse -> quantize -> parity -> package -> move in place

The artifact is built in a hidden sibling of the output folder and renamed into place only at the end, so an
error or an interruption at any point leaves nothing half-written where the output goes.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, load_texts, sample_texts
from calibration.quantize import quantize_model
from calibration.tune import tune_quantization
from exporter.architectures import TASK_OUTPUTS, Architecture
from exporter.compaction import compact_model, mask_heads, parse_drop_heads
from exporter.config import ExportConfig
from exporter.divergence import boundaries, locate, torch_boundaries
from exporter.errors import (
    CalibrationDataError,
    ExportError,
    OutputError,
    ParityError,
    UsageError,
    first_line,
    from_onnxruntime,
)
from exporter.latency import binds_io, latency_feeds, measure_latency, peak_memory_mb, throughput_modes
from exporter.loading import load_checkpoint, resolve_checkpoint
from exporter.manifest import checkpoint_hash, write_manifest
from exporter.onnx_export import export_onnx
from exporter.parity import (
    PROVIDERS,
    ParityConfig,
    ParityEntry,
    build_batches,
    check_file,
    failure_table,
    reference_outputs,
    resolve_providers,
)
from exporter.text import make_tokenize
from graphs.float16 import to_float16
from graphs.fusion import GraphPlan, fuse_graph

log = logging.getLogger(__name__)

MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE = "model.onnx", "model_optimized.onnx", "model_quantized.onnx"
MODEL_FILES = (MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE)
FP16_FILE = "model_fp16.onnx"
FP16_MODES = ("auto", "always", "never")
LATENCY_BATCHES = (1, 2, 4, 8)
STAGES = 8
# errno values that mean "the output's filesystem cannot take more": the user can free space or move --output.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass
class ExportResult:
    output: Path
    manifest: dict[str, Any]
    deployable: bool
    seconds: float


class _Stages:
    """Prints "[i/N] stage: detail (s)" per stage and keeps the timings for the manifest."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._index = 0
        self.current = "setup"

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        self._index += 1
        self.current = name
        note: dict[str, str] = {"detail": ""}
        start = time.perf_counter()
        try:
            yield note
        except Exception as error:
            if not from_onnxruntime(error):
                raise
            # onnxruntime's own exceptions (pybind Fail, InvalidGraph, ...) are a stage failure, not a crash.
            raise ExportError(
                f"onnxruntime failed in the {name} stage ({type(error).__name__}: {first_line(error)}); "
                "rerun with --debug for the traceback, or report it with the manifest options"
            ) from error
        self.timings[name] = round(time.perf_counter() - start, 3)
        log.info("[%d/%d] %-9s %s (%.1f s)", self._index, STAGES, name, note["detail"], self.timings[name])


def resolve_output(config: ExportConfig, source: Path) -> Path:
    default_name = "all-MiniLM-L6-v2" if config.model is None else source.name
    output = Path(config.output) if config.output else Path("artifacts") / default_name
    output = output.expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file; pass a folder path")
    if output.resolve() == source.resolve() or output.resolve() in source.resolve().parents:
        # --force would move the checkpoint aside and delete it with the work folder.
        raise OutputError(f"--output {output} holds the checkpoint being exported ({source}); choose a folder outside it")
    if output.is_dir() and any(output.iterdir()) and not config.force:
        raise OutputError(f"--output {output} exists and is not empty; pass --force to replace it or choose another folder")
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create {parent} ({error.strerror}); choose a writable --output") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent} is not writable; choose a writable --output")
    return output


@contextmanager
def work_folder(output: Path) -> Iterator[Path]:
    """A hidden sibling of `output` (same filesystem, so the final rename is atomic), always removed."""
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as error:
        raise OutputError(
            f"cannot create a work folder in {output.parent} ({error.strerror}); choose a writable --output"
        ) from None
    try:
        yield work
    finally:
        _remove_uninterrupted(work)


def _remove_uninterrupted(work: Path) -> None:
    """Remove `work` with SIGINT/SIGTERM held back, so a second Ctrl-C cannot leave half of it behind."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal is delivered here


def move_in_place(built: Path, output: Path, work: Path) -> None:
    """Rename `built` to `output`; a replaced artifact (--force) comes back if that rename fails."""
    previous = None
    if output.exists():
        if any(output.iterdir()):
            previous = work / "previous"
            os.rename(output, previous)  # --force was checked in resolve_output
        else:
            output.rmdir()
    try:
        os.rename(built, output)
    except BaseException:  # an error or an interrupt between the two renames: put the old artifact back
        if previous is not None and not output.exists():
            os.rename(previous, output)
        raise


def check_options(config: ExportConfig) -> None:
    """Refuse flags that contradict each other before any work starts."""
    if config.fp16 not in FP16_MODES:
        raise UsageError(f"fp16 option {config.fp16!r} is not one of {list(FP16_MODES)}; pass --fp16 auto, always or never")
    if config.calibration_field != ExportConfig().calibration_field:
        if config.calibration_data is None:
            raise UsageError(
                f"--calibration-field {config.calibration_field!r} has no effect without --calibration-data (the "
                "built-in corpus is plain text); pass --calibration-data FILE.jsonl or drop --calibration-field"
            )
        if Path(config.calibration_data).suffix == ".txt":
            raise UsageError(
                f"--calibration-field {config.calibration_field!r} does not apply to {config.calibration_data}, "
                "a .txt file holds one text per line; drop --calibration-field or pass a .jsonl file"
            )


def _disk_full(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error` (libraries wrap it), or None."""
    seen = 0
    cause: BaseException | None = error
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def export_model(config: ExportConfig) -> ExportResult:
    """Run the whole pipeline for `config`; returns the result, or raises an ExportError.

    On a parity failure the artifact is still written (marked not deployable) and ParityError is raised
    after it is in place.
    """
    start = time.perf_counter()
    drops = parse_drop_heads(config.drop_heads)
    check_options(config)
    resolve_providers(config.parity.providers)  # a requested provider that is absent fails before any work
    source = resolve_checkpoint(config.model)
    output = resolve_output(config, source)
    # Bad calibration data is bad input: refuse it before minutes of loading and export, not after.
    calibration_pool, heldout = split_texts(builtin_texts())
    texts = calibration_pool if config.calibration_data is None else load_texts(
        Path(config.calibration_data), config.calibration_field)
    samples, sample_hash = sample_texts(texts, config.quantization.samples, config.quantization.seed)
    if config.calibration_data is not None and len(samples) < config.quantization.samples:
        raise CalibrationDataError(
            f"{config.calibration_data} holds {len(samples)} texts; {config.quantization.samples} were asked "
            "for: pass --calibration-samples at most that, or add texts"
        )
    stages = _Stages()
    try:
        manifest, failed, entries = _build(config, source, output, drops, stages, samples, sample_hash, heldout)
    except Exception as error:
        full = _disk_full(error)
        if full is None:
            raise
        raise OutputError(
            f"no space left for the artifact in {output.parent} during {stages.current} "
            f"({full.strerror}); free space there or choose another --output; nothing was written"
        ) from error
    seconds = time.perf_counter() - start
    result = ExportResult(output, manifest, not failed, seconds)
    if failed:
        raise ParityError(
            f"parity failed for {len(failed)} of {len(entries)} checks; artifact kept at {output} but marked not "
            f"deployable:\n{failure_table(failed)}"
        )
    return result


def _build(
    config: ExportConfig, source: Path, output: Path, drops: dict[int, list[int]], stages: _Stages,
    samples: list[Any], sample_hash: str, heldout: list[str],
) -> tuple[dict[str, Any], list[ParityEntry], list[ParityEntry]]:
    """The stages, in a work folder beside `output`; returns (manifest, failed parity entries, all entries)."""
    with work_folder(output) as work:
        built = work / "artifact"
        built.mkdir()
        with stages.stage("load") as note:
            checkpoint = load_checkpoint(source, config.task)
            arch, task, hf_config = checkpoint.architecture, checkpoint.task, checkpoint.config
            reference = checkpoint.model
            if drops:
                mask_heads(reference, arch, hf_config, drops)  # parity compares against the masked model
            note["detail"] = f"{arch.name} {task} from {source.name}, layer norm {checkpoint.layer_norm}"
        with stages.stage("compact") as note:
            compacted = copy.deepcopy(reference)
            compaction = compact_model(compacted, arch, hf_config, drops)
            note["detail"] = compaction.summary()
        with stages.stage("export") as note:
            signature = export_onnx(compacted, arch, task, built / MODEL_FILE)
            note["detail"] = f"{MODEL_FILE}, inputs {list(signature.inputs)}, outputs {list(signature.outputs)}"
        with stages.stage("fuse") as note:
            plan = GraphPlan(
                heads_per_layer=compaction.heads_per_layer,
                hidden_size=arch.hidden_size(hf_config),
                architecture=arch.name,
                layer_norm=checkpoint.layer_norm,
                activation=arch.activation_name(hf_config),
            )
            fusion = fuse_graph(built / MODEL_FILE, built / OPTIMIZED_FILE, plan, config.fusion)
            note["detail"] = fusion.summary()
            fp16 = _fp16_variant(config, built)
            if fp16.get("built"):
                note["detail"] += f"; {FP16_FILE}"
        max_length = min(arch.max_positions(hf_config), 512, int(getattr(checkpoint.tokenizer, "model_max_length", 512)))
        pairs = task == "question-answering"
        tokenize = make_tokenize(checkpoint.tokenizer, arch.input_names, max_length, pairs=pairs)
        # The INT8 search chooses fallbacks on one half of the held-out texts; parity and latency use the other.
        search_pool, report_pool = heldout[0::2], heldout[1::2]
        working_length = min(128, max_length)  # calibration and latency sequence length
        with stages.stage("quantize") as note:
            calibration_tokenize = make_tokenize(checkpoint.tokenizer, arch.input_names, working_length, pairs=pairs)
            reader = TextCalibrationReader(samples, calibration_tokenize, config.quantization.batch_size)
            wanted = config.quantization.validation_count(task)
            search_texts = search_pool[:wanted]
            if len(search_texts) < wanted:
                log.warning("the accuracy search judges on %d held-out texts, fewer than the %d its bar at "
                               "--max-accuracy-drop %g needs to allow one changed decision", len(search_texts),
                               wanted, config.quantization.max_accuracy_drop)
            validation = [calibration_tokenize(search_texts[i : i + 16]) for i in range(0, len(search_texts), 16)]
            tuning: list[dict[str, Any]] = []
            if config.quantization.tune:
                timing = latency_feeds(calibration_tokenize, search_texts, [(1, working_length), (8, working_length)])
                quantization, tuning = tune_quantization(
                    {"fused": built / OPTIMIZED_FILE, "unfused": built / MODEL_FILE}, built / QUANTIZED_FILE, reader,
                    config.quantization, timing, sample_sha256=sample_hash, validation=validation, metric=task)
            else:
                source_graph = OPTIMIZED_FILE if config.quantization.uses_fused_graph else MODEL_FILE
                quantization = quantize_model(built / source_graph, built / QUANTIZED_FILE, reader,
                                              config.quantization, sample_sha256=sample_hash, validation=validation,
                                              metric=task)
            note["detail"] = f"{QUANTIZED_FILE}, {quantization.quantized_nodes} nodes INT8, {len(samples)} texts"
            if tuning:
                note["detail"] += f", tuned: {quantization.preset} fastest of {len(tuning)} presets"
        with stages.stage("parity") as note:
            batches = build_batches(report_pool, tokenize, config.parity.shapes, max_length)
            expected = reference_outputs(reference, batches, TASK_OUTPUTS[task])
            entries = []
            checked = [(MODEL_FILE, "fp32"), (OPTIMIZED_FILE, "fp32"), (QUANTIZED_FILE, "int8")]
            if fp16.get("built"):
                checked.append((FP16_FILE, "fp16"))
            else:
                entries.append(ParityEntry(FP16_FILE, PROVIDERS["cuda"], "fp16", "skip", reason=fp16["reason"]))
            for name, precision in checked:
                entries += check_file(built / name, precision, task, batches, expected, config.parity)
            failed = [e for e in entries if e.status == "fail"]
            if failed:
                localize_failures(failed, built, reference, arch, batches[-1], config.parity)
            note["detail"] = ", ".join(f"{e.file} {e.status}" for e in entries if e.status != "skip")
        with stages.stage("latency") as note:
            latency = measure_files(built, tokenize, report_pool[:40], working_length, config.parity.providers,
                                    [name for name, _ in checked])
            cpu = latency.get("CPUExecutionProvider", {}).get("files", {})
            note["detail"] = ", ".join(f"{n} {v[f'b8xs{working_length}']['median_ms']:.0f} ms@b8"
                                       for n, v in cpu.items())
        with stages.stage("package") as note:
            checkpoint.tokenizer.save_pretrained(built)
            deploy_config = copy.deepcopy(hf_config)
            deploy_config.pruned_heads = compaction.pruned_heads
            deploy_config.architectures = [arch.class_name(task)]
            deploy_config.save_pretrained(built)
            _save_parity_data(built / "parity", batches, expected)
            resolved = config.to_dict() | {"model": str(source), "output": str(output), "task": task}
            manifest = write_manifest(built, {
                "source": {"name": source.name, "path": str(source), **checkpoint_hash(source)},
                "task": task,
                "architecture": arch.name,
                "layer_norm": checkpoint.layer_norm,
                "activation": arch.activation_name(hf_config),
                "options": resolved,
                "signature": signature.to_dict(),
                "compaction": compaction.to_dict(),
                "fusion": fusion.to_dict() | {"summary": fusion.summary()},
                "quantization": quantization.to_dict() | ({"tuning": tuning} if tuning else {}),
                "fp16": fp16,
                "parity": [e.to_dict() for e in entries],
                "parity_data": {"inputs": "parity/inputs.npz", "reference": "parity/reference.npz",
                                "shapes": [list(s) for s in config.parity.shapes]},
                "latency": latency,
                "deployable": not failed,
                "timings": stages.timings,
            })
            note["detail"] = f"{len(manifest['files'])} files"
        move_in_place(built, output, work)
    return manifest, failed, entries


def measure_files(
    built: Path, tokenize: Any, texts: list[str], length: int, providers: tuple[str, ...], names: list[str],
) -> dict[str, Any]:
    """Per provider: latency percentiles and peak memory of each file over batch 1-8 with all threads; on CPU also
    one thread per session at batch 1 and 8 (the thread-settings grid) and the best throughput mode."""
    feeds = latency_feeds(tokenize, texts, [(b, length) for b in LATENCY_BATCHES])
    smallest, largest = f"b{LATENCY_BATCHES[0]}xs{length}", f"b{LATENCY_BATCHES[-1]}xs{length}"
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {}
    for provider in resolve_providers(providers)[0]:
        files = {name: measure_latency(built / name, provider, feeds) for name in names}
        for name in names:  # peak memory at the largest shape, each file in a fresh process
            files[name][largest]["peak_mb"] = peak_memory_mb(built / name, provider, feeds[largest])
        result[provider] = {"files": files, "sequence": length, "threads": cores, "io_binding": binds_io(provider)}
        if provider == "CPUExecutionProvider":
            ends = {label: feeds[label] for label in (smallest, largest)}
            result[provider]["by_threads"] = {"1": {
                name: measure_latency(built / name, provider, ends, threads=1) for name in names}} if cores > 1 else {}
            result[provider]["throughput"] = {name: throughput_modes(built / name, feeds[largest]) for name in names}
    return result


def _fp16_wanted(config: ExportConfig) -> bool:
    """Whether model_fp16.onnx is built: --fp16 always, or auto with CUDA among the providers checked."""
    if config.fp16 == "never":
        return False
    return config.fp16 == "always" or PROVIDERS["cuda"] in resolve_providers(config.parity.providers)[0]


def _fp16_variant(config: ExportConfig, built: Path) -> dict[str, Any]:
    """Build model_fp16.onnx from the fused graph when config.fp16 asks for it (see ExportConfig.fp16)."""
    import onnxruntime as ort

    if not _fp16_wanted(config):
        where = ("absent here" if PROVIDERS["cuda"] not in ort.get_available_providers()
                 else "not among the providers checked (--providers)")
        why = ("not requested (--fp16 never)" if config.fp16 == "never" else
               f"{PROVIDERS['cuda']} {where}, so {FP16_FILE} was not built (float16 is a CUDA variant; "
               "--fp16 always builds it anyway)")
        return {"built": False, "reason": why}
    try:
        report = to_float16(built / OPTIMIZED_FILE, built / FP16_FILE)
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as error:
        (built / FP16_FILE).unlink(missing_ok=True)
        why = f"float16 conversion of {OPTIMIZED_FILE} failed ({type(error).__name__}: {str(error)[:200]})"
        if config.fp16 == "always":
            raise ExportError(f"{why}; pass --fp16 auto or never to export without {FP16_FILE}") from error
        log.warning("%s; %s left out", why, FP16_FILE)  # optional under auto: recorded as a skip row
        return {"built": False, "reason": why}
    return {"built": True, "source": OPTIMIZED_FILE, **report.to_dict()}


def localize_failures(
    failed: list[ParityEntry], built: Path, reference: Any, arch: Architecture, feeds: dict[str, np.ndarray],
    parity: ParityConfig,
) -> None:
    """Name, for each failing CPU entry, the first layer boundary where its file leaves the PyTorch model."""
    layer_tensors = boundaries(built / MODEL_FILE)
    expected = torch_boundaries(reference, arch, feeds)
    for entry in failed:
        if entry.provider != "CPUExecutionProvider":
            continue
        atol, min_cosine = (
            (parity.fp32_atol, -1.0) if entry.precision == "fp32" else (float("inf"), parity.min_cosine(entry.precision)))
        found = locate(built / entry.file, layer_tensors, expected, feeds, atol, min_cosine)
        entry.first_divergence = found.describe() if found else "no layer boundary exceeds the tolerance; the task head differs"
        log.info("%s: %s", entry.file, entry.first_divergence)


def _save_parity_data(folder: Path, batches: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]) -> None:
    """Reference inputs and PyTorch outputs, so a deployment machine can re-check parity (`np.load`)."""
    folder.mkdir()
    np.savez_compressed(folder / "inputs.npz", **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    np.savez_compressed(folder / "reference.npz", **{f"{i}/{k}": v for i, b in enumerate(expected) for k, v in b.items()})

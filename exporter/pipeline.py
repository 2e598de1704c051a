"""Orders the stages and owns the work folder; holds no stage logic.

    resolve -> load -> compact -> export -> fuse -> quantize -> parity -> package -> move in place

The artifact is built in a hidden sibling of the output folder and renamed into place only at the end, so an
error or an interruption at any point leaves nothing half-written where the output goes.

Safe to run unattended on a mistyped --output:
- `--force` replaces only an earlier export-model artifact: a folder whose manifest.json names export-model (tool
  and schema_version) and that holds nothing its manifest does not list. Any other non-empty folder is refused,
  and so are, always, `/`, the working directory, the home folder and their parents, the checkpoint, its parents
  and anything inside it (judged on the path with every symlink resolved), and an --output that is itself a
  symbolic link (neither the link nor its target is written or replaced).
- One run at a time per output: `.NAME.lock` beside it holds an flock for the whole run and the run's pid; a
  second run to the same output is refused naming that pid. The lock file is removed at the end.
- The work folder `.NAME.partial-*` holds a marker (`.export-model-work`: tool, pid, host, start time, output) and
  every temporary file of the run (tempfile's default folder and TMPDIR point into it while the run lasts), so a
  killed run leaves only that folder; the next run to the same output removes such folders when the marker proves
  them export-model's and their pid is no longer running (a folder without the marker is never touched).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.corpus import builtin_texts, split_texts
from calibration.data import ChainedReader, TextCalibrationReader, joined_texts, load_texts, sample_texts
from calibration.learned import quantize_learned
from calibration.quantize import quantize_model
from calibration.tune import tune_quantization
from exporter.architectures import Architecture
from exporter.compaction import compact_model, mask_heads, parse_drop_heads
from exporter.config import ExportConfig
from exporter.divergence import boundaries, locate, torch_boundaries
from exporter.eval_data import parse_fields, read_eval_data
from exporter.evaluation import SEARCHABLE, evaluation_rows, gold_search_metric, split_for_search
from exporter.latency import binds_io, latency_feeds, measure_latency, peak_memory_mb, throughput_modes
from exporter.loading import load_checkpoint, resolve_checkpoint
from exporter.manifest import checkpoint_hash, write_manifest
from exporter.onnx_export import export_onnx
from exporter.openvino_stage import QDQ_FILE, build_qdq, keep_qdq, openvino_latency, openvino_parity
from exporter.qat import refuse_calibration_options
from exporter.qat_reference import qat_parity
from exporter.qat_targets import learned_linears
from exporter.reference import build_batches, reference_outputs
from exporter.runtime.files import MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE, Limits
from exporter.runtime.openvino_check import record as openvino_record
from exporter.runtime.outputs import output_names
from exporter.runtime.parity import (
    PROVIDERS,
    ParityConfig,
    ParityEntry,
    check_file,
    failure_table,
    resolve_providers,
    session_entries,
)
from exporter.stages import Stages
from exporter.text import make_tokenize
from exporter.workspace import (
    check_replaceable,
    disk_full,
    move_in_place,
    output_lock,
    resolve_output,
    sweep_stale,
    work_folder,
)
from graphs.core.errors import (
    CalibrationDataError,
    CheckpointError,
    ExportError,
    OutputError,
    ParityError,
    UsageError,
)
from graphs.core.openvino_sessions import ENGINE
from graphs.core.progress import bar
from graphs.float16 import to_float16
from graphs.fusion import GraphPlan, fuse_graph

log = logging.getLogger(__name__)

MODEL_FILES = (MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE)
FP16_FILE = "model_fp16.onnx"
FP16_MODES = ("auto", "always", "never")
LATENCY_BATCHES = (1, 2, 4, 8)
LATENCY_MODES = ("quick", "full", "off")
LONG_CALIBRATION_TEXTS = 16
"""Calibration rows of ``--max-length`` tokens (consecutive calibration texts joined), beside the texts at 128
tokens: positions past 128 reach activation ranges (position embeddings, longer attention) that short texts never
show."""
STAGES = 8


@dataclass
class ExportResult:
    output: Path
    manifest: dict[str, Any]
    deployable: bool
    seconds: float


def check_options(config: ExportConfig) -> None:
    """Refuse flags that contradict each other before any work starts."""
    if config.fp16 not in FP16_MODES:
        raise UsageError(f"fp16 option {config.fp16!r} is not one of {list(FP16_MODES)}; pass --fp16 auto, always or never")
    if config.openvino_int8 not in ("auto", "never"):
        raise UsageError(f"openvino_int8 option {config.openvino_int8!r} is not auto or never; pass --openvino-int8 "
                         "auto or never")
    if config.latency not in LATENCY_MODES:  # --config and Python callers bypass argparse's choices
        raise UsageError(f"latency option {config.latency!r} is not one of {list(LATENCY_MODES)}; pass --latency "
                         "quick, full or off")
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


    if config.max_length is not None and (isinstance(config.max_length, bool) or not isinstance(config.max_length, int)
                                          or not 16 <= config.max_length <= 8192):
        raise UsageError(f"--max-length {config.max_length!r} must be an integer from 16 to 8192")
    if config.eval_fields and config.eval_data is None:
        raise UsageError("--eval-fields has no effect without --eval-data; pass --eval-data FILE or drop it")
    if isinstance(config.eval_batch_size, bool) or not isinstance(config.eval_batch_size, int) \
            or not 1 <= config.eval_batch_size <= 1024:
        raise UsageError(f"--eval-batch-size {config.eval_batch_size!r} must be an integer from 1 to 1024")
    if config.eval_data is not None and not Path(config.eval_data).exists():
        raise UsageError(f"--eval-data {config.eval_data}: no such file or folder")


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
    with output_lock(output):
        check_replaceable(output, config.force)  # again under the lock: it may have been filled meanwhile
        # Bad calibration data is bad input: refuse it before minutes of loading and export, not after.
        calibration_pool, heldout = split_texts(builtin_texts())
        texts = calibration_pool if config.calibration_data is None else load_texts(
            Path(config.calibration_data), config.calibration_field)
        samples, sample_hash = sample_texts(texts, config.quantization.samples, config.quantization.seed)
        del texts
        if config.calibration_data is not None and len(samples) < config.quantization.samples:
            raise CalibrationDataError(
                f"{config.calibration_data} holds {len(samples)} texts; {config.quantization.samples} were asked "
                "for: pass --calibration-samples at most that, or add texts"
            )
        sweep_stale(output)
        stages = Stages(STAGES + (config.eval_data is not None))
        try:
            manifest, failed, entries = _build(config, source, output, drops, stages, samples, sample_hash, heldout)
        except Exception as error:
            full = disk_full(error)
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
    config: ExportConfig, source: Path, output: Path, drops: dict[int, list[int]], stages: Stages,
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
            evalset = None
            if config.eval_data is not None:  # checked row by row now, before the long stages
                labels = [str(hf_config.id2label[i]) for i in range(len(hf_config.id2label))]
                evalset = read_eval_data(Path(config.eval_data), task, parse_fields(config.eval_fields, task),
                                         labels)
                note["detail"] += f"; eval data {len(evalset.examples)} {evalset.format} rows"
        # What the graph takes: positions and the tokenizer. A sentence-transformers max_seq_length (what
        # SentenceTransformer.encode truncates to, and the runtime with it) does not cap the parity length: the
        # graph is checked at the longest input it accepts.
        model_max = min(arch.max_positions(hf_config), int(getattr(checkpoint.tokenizer, "model_max_length", 512)))
        if config.max_length is not None and config.max_length > model_max:
            raise UsageError(f"--max-length {config.max_length} is longer than this model takes ({model_max} tokens: "
                             "its positions and tokenizer limits); pass at most that")
        max_length = config.max_length or min(model_max, 384 if task == "question-answering" else 512)
        shapes = tuple(config.parity.shapes)
        if max_length > max(length for _, length in shapes):  # a batch at the length the model is served at
            shapes += ((2, max_length),)
        with stages.stage("compact") as note:
            compacted = copy.deepcopy(reference)
            compaction = compact_model(compacted, arch, hf_config, drops)
            # A quantization-aware-trained checkpoint's INT8 scales, sliced as compaction sliced the weights.
            learned = learned_linears(reference, compacted, arch, checkpoint.qat) if checkpoint.qat else None
            refuse_calibration_options(config, checkpoint.qat if learned is not None else None)
            if checkpoint.qat and learned is None:
                log.warning("%s checkpoint: no linear reads a fake-quantized tensor (no learned input range); "
                            "model_quantized.onnx is calibrated from text (manifest qat.int8)", checkpoint.qat.format)
            note["detail"] = compaction.summary()
        with stages.stage("export") as note:
            sentence = checkpoint.sentence
            pooling = sentence.pooling if sentence else None
            signature = export_onnx(compacted, arch, task, built / MODEL_FILE, pooling)
            del compacted  # the graph holds it now; parity compares against `reference`
            note["detail"] = f"{MODEL_FILE}, inputs {list(signature.inputs)}, outputs {list(signature.outputs)}"
        with stages.stage("fuse") as note:
            plan = GraphPlan(
                heads_per_layer=compaction.heads_per_layer,
                hidden_size=arch.hidden_size(hf_config),
                architecture=arch.name,
                layer_norm=checkpoint.layer_norm,
                activation=arch.activation_name(hf_config),
                attention_pass=arch.attention_pass(checkpoint.layer_norm),
                pre_norm=arch.pre_norm,
                max_length=max_length,
            )
            fusion = fuse_graph(built / MODEL_FILE, built / OPTIMIZED_FILE, plan, config.fusion)
            note["detail"] = fusion.summary()
            fp16 = _fp16_variant(config, built)
            if fp16.get("built"):
                note["detail"] += f"; {FP16_FILE}"
        pairs = task == "question-answering"
        tokenize = make_tokenize(checkpoint.tokenizer, arch.input_names, max_length, pairs=pairs)
        # The INT8 search chooses fallbacks on one half of the held-out texts; parity and latency use the other.
        search_pool, report_pool = heldout[0::2], heldout[1::2]
        working_length = min(128, max_length)  # calibration and latency sequence length
        checkpoint.tokenizer.save_pretrained(built)  # what the runtime (and the evaluation) reads
        for saved in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            cap = Limits().cap(saved)  # what `run` will open: an artifact it would refuse is not written
            if (built / saved).is_file() and (built / saved).stat().st_size > cap:
                raise CheckpointError(f"the tokenizer saves as a {(built / saved).stat().st_size:,}-byte {saved}, "
                                      f"over the {cap:,} bytes the deployment side opens (exporter/runtime/artifact.py); "
                                      "use a smaller vocabulary")
        for name in sentence.files if sentence else []:  # read and checked at load: small regular JSON files
            (built / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint.path / name, built / name)
        deploy_config = copy.deepcopy(hf_config)
        deploy_config.pruned_heads = compaction.pruned_heads
        deploy_config.architectures = [arch.class_name(task)]
        deploy_config.save_pretrained(built)
        gold_search, reported = None, evalset  # with labelled data the search judges on its gold metric
        # The PyTorch outputs parity compares against, before the long stages: then, unless the evaluation needs
        # it, the PyTorch model is released (a BERT-large reference is 1.3 GB the quantize stage can use) and
        # loaded again only to localize a parity failure.
        batches = build_batches(report_pool, tokenize, shapes, max_length)
        expected = reference_outputs(reference, batches, output_names(task, sentence is not None), pooling)
        qat_report: dict[str, Any] = checkpoint.qat.to_dict() if checkpoint.qat else {}
        if checkpoint.qat and learned is None:
            qat_report["int8"] = {"calibration": "calibrated from text: no linear's input is a tensor the training "
                                                 "fake-quantized (no learned input range)"}
        if evalset is None and learned is None:  # a QAT import's parity needs it again (fake-quantized)
            reference = checkpoint.model = None
        with stages.stage("quantize") as note:
            calibration_tokenize = make_tokenize(checkpoint.tokenizer, arch.input_names, working_length, pairs=pairs)
            calibration_rows = [{"texts": len(samples), "tokens": working_length}]
            # Rows that span the positions up to the longest length served (not for the histogram methods, whose
            # chunked calibration needs one reader's set_range).
            long_rows = max_length > working_length and config.quantization.method not in ("entropy", "percentile")
            joined = joined_texts(samples, max_length)[:LONG_CALIBRATION_TEXTS] if long_rows else []

            def make_reader() -> Any:  # one reader per quantized file: a reader is read to its end once
                short = TextCalibrationReader(samples, calibration_tokenize, config.quantization.batch_size)
                return ChainedReader([short, TextCalibrationReader(joined, tokenize, 2)]) if joined else short

            reader = make_reader()
            if joined:
                calibration_rows.append({"texts": len(joined), "tokens": max_length,
                                         "made_of": "consecutive calibration texts joined"})
            wanted = config.quantization.validation_count(task)
            search_texts = search_pool[:wanted]
            metric: Any = task
            if evalset is not None and task in SEARCHABLE and len(evalset.examples) >= 8:
                searched, reported = split_for_search(evalset)
                metric = gold_search_metric(built, task, searched, built / OPTIMIZED_FILE, config.eval_batch_size)
                validation = metric.batches
                gold_search = {"metric": metric.name, "examples": len(searched.examples),
                               "rows": "every 4th row of --eval-data, from the first"}
            else:
                if len(search_texts) < wanted:
                    log.warning("the accuracy search judges on %d held-out texts, fewer than the %d its bar at "
                                "--max-accuracy-drop %g needs to allow one changed decision", len(search_texts),
                                wanted, config.quantization.max_accuracy_drop)
                validation = [calibration_tokenize(search_texts[i : i + 16]) for i in range(0, len(search_texts), 16)]
            tuning: list[dict[str, Any]] = []
            if learned is not None:  # its own scales: nothing calibrated, nothing searched
                quantization, qat_report["int8"] = quantize_learned(built / OPTIMIZED_FILE, built / QUANTIZED_FILE,
                                                                    learned, config.quantization)
                calibration_rows, tuning = [], []
            elif config.quantization.tune:
                timing = latency_feeds(calibration_tokenize, search_texts, [(1, working_length), (8, working_length)])
                quantization, tuning = tune_quantization(
                    {"fused": built / OPTIMIZED_FILE, "unfused": built / MODEL_FILE}, built / QUANTIZED_FILE, reader,
                    config.quantization, timing, sample_sha256=sample_hash, validation=validation, metric=metric)
            else:
                source_graph = OPTIMIZED_FILE if config.quantization.uses_fused_graph else MODEL_FILE
                quantization = quantize_model(built / source_graph, built / QUANTIZED_FILE, reader,
                                              config.quantization, sample_sha256=sample_hash, validation=validation,
                                              metric=metric)
            note["detail"] = f"{QUANTIZED_FILE}, {quantization.quantized_nodes} nodes INT8, " + (
                "scales from the checkpoint" if learned is not None else f"{len(samples)} texts")
            note["detail"] += f", tuned: {quantization.preset} fastest of {len(tuning)} presets" if tuning else ""
            qdq = build_qdq(built / MODEL_FILE, built / QDQ_FILE, make_reader(), config.quantization, sample_hash,
                            config.openvino_int8, validation, metric,
                            (quantization.search or {}).get("seconds", 0.0)) if learned is None else {
                "built": False, "reason": "quantization-aware-trained: INT8 only from the learned scales"}
            note["detail"] += f"; {QDQ_FILE}, {qdq['quantized_nodes']} nodes INT8" if qdq["built"] else ""
        with stages.stage("parity") as note:
            entries = []
            checked = [(MODEL_FILE, "fp32"), (OPTIMIZED_FILE, "fp32"), (QUANTIZED_FILE, "int8")]
            checked += [(QDQ_FILE, "int8")] if qdq["built"] else []
            if fp16.get("built"):
                checked.append((FP16_FILE, "fp16"))
            else:
                entries.append(ParityEntry(FP16_FILE, PROVIDERS["cuda"], "fp16", "skip", reason=fp16["reason"]))
            for name, precision in checked:
                entries += check_file(built / name, precision, task, batches, expected, config.parity,
                                      options=session_entries({"qat": qat_report}, name))
            entries += openvino_parity(built, checked, task, batches, expected, config.parity,
                                       (validation, metric, config.quantization.max_accuracy_drop))
            entries, checked = keep_qdq(built, entries, checked, qdq)
            failed = [e for e in entries if e.status == "fail"]
            if failed:
                if reference is None:  # released before quantizing: the same load again
                    reference = load_checkpoint(source, config.task).model
                    if drops:
                        mask_heads(reference, arch, hf_config, drops)
                localize_failures(failed, built, reference, arch, batches[-1], config.parity)
            note["detail"] = ", ".join(f"{e.file} {e.status}" if e.provider != ENGINE else
                                       f"{e.file} {e.status} on OpenVINO {e.precision}"
                                       for e in entries if e.status != "skip")
            if learned is not None:
                qat_report["parity"] = qat_parity(reference, checkpoint.qat, qat_report["int8"], built / QUANTIZED_FILE,
                                                  task, batches, output_names(task, sentence is not None), pooling,
                                                  config.parity)
        with stages.stage("latency") as note:
            latency: dict[str, Any] = {}
            if config.latency != "off":
                latency = measure_files(built, tokenize, report_pool[:40], working_length, config.parity.providers,
                                        [name for name, _ in checked], full=config.latency == "full",
                                        max_length=max_length, openvino=entries)
            note["detail"] = ", ".join(
                f"{n} {v[f'b8xs{working_length}']['median_ms']:.0f} ms@b8" + (f" on OpenVINO{key.removeprefix(ENGINE)}"
                                                                            if key.startswith(ENGINE) else "")
                for key in ("CPUExecutionProvider", *(k for k in latency if k.startswith(ENGINE)))
                for n, v in latency.get(key, {}).get("files", {}).items()) or "off (--latency off)"
        evaluation: list[dict[str, Any]] = []
        if reported is not None:
            with stages.stage("evaluate") as note:
                names = [name for name, _ in checked]
                providers = resolve_providers(config.parity.providers)[0]
                evaluation = evaluation_rows(built, task, reported, reference, arch.input_names,
                                             output_names(task, sentence is not None), pooling, names, providers,
                                             config.eval_batch_size)
                note["detail"] = ", ".join(f"{r['file']} {r['metric']} {r['value']:.4f}" for r in evaluation
                                           if r["provider"] in ("torch CPU", PROVIDERS["cpu"]))
        with stages.stage("package") as note:
            _save_parity_data(built / "parity", batches, expected)
            resolved = config.to_dict() | {"model": str(source), "output": str(output), "task": task}
            manifest = write_manifest(built, {
                "source": {"name": source.name, "path": str(source), **checkpoint_hash(source, checkpoint.files_read)},
                "task": task,
                "architecture": arch.name,
                "layer_norm": checkpoint.layer_norm,
                "activation": arch.activation_name(hf_config),
                "options": resolved,
                "signature": signature.to_dict(),
                "sentence_embedding": sentence.to_dict() if sentence else None,
                "qat": qat_report or None,
                "compaction": compaction.to_dict(),
                "fusion": fusion.to_dict() | {"summary": fusion.summary()},
                "quantization": quantization.to_dict() | {"calibration_rows": calibration_rows}
                | ({"tuning": tuning} if tuning else {}),
                "fp16": fp16,
                "openvino": openvino_record() | {"qdq_file": qdq},
                "parity": [e.to_dict() for e in entries],
                "parity_data": {"inputs": "parity/inputs.npz", "reference": "parity/reference.npz",
                                "shapes": [list(b["attention_mask"].shape) for b in batches]},
                "max_length": max_length,
                # the most tokens the model's positions hold (RoBERTa's start after the padding index), or the
                # fused graph's position caches (rotary): the runtime's truncation reads it here instead of
                # knowing each family
                "max_tokens": min(arch.max_positions(hf_config), fusion.max_tokens or arch.max_positions(hf_config)),
                "latency": latency,
                **({"eval_data": evalset.to_dict() | {
                    "search": gold_search,  # None: the search judged on agreement with FP32, as without labels
                    "reported_examples": len(reported.examples),
                    "reported_rows": "the rows the search did not use" if gold_search else "every row"},
                    "evaluation": evaluation} if evalset is not None and reported is not None else {}),
                "deployable": not failed,
                "timings": stages.timings,
                "peak_rss_mb": stages.peak_rss_mb,
            })
            note["detail"] = f"{len(manifest['files'])} files"
        check_replaceable(output, config.force)  # a person may have put files there while the run lasted
        move_in_place(built, output, work)
    return manifest, failed, entries


def measure_files(
    built: Path, tokenize: Any, texts: list[str], length: int, providers: tuple[str, ...], names: list[str],
    full: bool = False, max_length: int | None = None, openvino: list[ParityEntry] | None = None,
) -> dict[str, Any]:
    """Per provider: latency percentiles of each file at batch 1 and 8 (``full``: 1, 2, 4, 8) of ``length``
    tokens and at batch 1 of ``max_length`` (when longer), with all threads, and its peak memory at batch 8 in a
    fresh process; ``full`` adds, on CPU, one thread per session at batch 1 and 8 (the thread-settings grid) and
    the best throughput mode. ``openvino``: the parity entries; each (file, precision) that passed on OpenVINO
    is timed there too (the same feeds; exporter/openvino_stage.py)."""
    batches = LATENCY_BATCHES if full else (LATENCY_BATCHES[0], LATENCY_BATCHES[-1])
    shapes = [(b, length) for b in batches] + ([(1, max_length)] if max_length and max_length > length else [])
    feeds = latency_feeds(tokenize, texts, shapes)
    smallest, largest = f"b{LATENCY_BATCHES[0]}xs{length}", f"b{LATENCY_BATCHES[-1]}xs{length}"
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {}
    for provider in resolve_providers(providers)[0]:
        files = {}
        for name in bar(names, desc=f"latency on {provider.replace('ExecutionProvider', '')}"):
            files[name] = measure_latency(built / name, provider, feeds)
            # peak memory at batch 8, each file in a fresh process
            files[name][largest]["peak_mb"] = peak_memory_mb(built / name, provider, feeds[largest])
        result[provider] = {"files": files, "sequence": length, "threads": cores, "io_binding": binds_io(provider),
                            "mode": "full" if full else "quick", "shapes": list(feeds)}
        if provider == "CPUExecutionProvider" and full:
            ends = {label: feeds[label] for label in (smallest, largest)}
            result[provider]["by_threads"] = {"1": {
                name: measure_latency(built / name, provider, ends, threads=1) for name in names}} if cores > 1 else {}
            result[provider]["throughput"] = {name: throughput_modes(built / name, feeds[largest]) for name in names}
    return result | openvino_latency(built, openvino or [], feeds, length, full)


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

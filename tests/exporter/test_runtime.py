"""The torch-free runtime (exporter/runtime/model.py, `export-model run`) and a torch-free `verify`.

The runtime and `verify` run in a child process whose `import torch` / `import transformers` / `import optimum` /
`import onnx` fail (a sys.meta_path finder installed before anything else), and their outputs are compared with
the PyTorch model computed here: sentence-transformers' mean pooling + normalization implemented in torch for the
real all-MiniLM-L6-v2, the classification model's argmax, and transformers' own question-answering and
token-classification pipelines (``align_to_words=False``; ``aggregation_strategy="simple"``) on the PyTorch
checkpoints.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exporter.runtime.decode import Answer, group_entities
from exporter.runtime.model import Runtime, choose_file
from exporter.runtime.pooling import Pooling, pool, read_pooling
from graphs.core.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "optimum", "onnx", "sentence_transformers")
GUARD = textwrap.dedent(f"""
    import importlib.abc, sys
    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"blocked by the test: {{name}}", name=name)
            return None
    sys.meta_path.insert(0, _Blocked())
    import atexit
    atexit.register(lambda: print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}),
                                  file=sys.stderr))
    """)
CLI = GUARD + "from exporter.cli import main\nsys.exit(main(sys.argv[1:]))\n"

TEXTS = [
    "The committee postponed its decision on the new bridge until the spring.",
    "A warm front will bring rain to the northern valleys by Thursday evening.",
    "She tuned the old piano herself, one string at a time, over a whole weekend.",
    "Quarterly revenue rose eight percent while operating costs stayed flat.",
    "The museum's east wing reopens after a two-year restoration of its ceiling frescoes.",
    "Volunteers planted four hundred oak saplings along the river bank.",
    "My laptop battery barely lasts an hour since the last update.",
    "Researchers found that the enzyme works best at slightly acidic pH.",
    "He missed the last train and walked home through the quiet streets.",
    "The recipe calls for two cups of flour, a pinch of salt and cold butter.",
    "Short one.",
    "Maria Lopez met the engineers from Northwind in Lisbon on Monday.",
]
LONG_CONTEXT = " ".join(
    f"Paragraph {i}: the survey team measured the glacier's retreat at station {i} and logged {17 * i} metres "
    f"of loss since the first expedition, noting fresh crevasses near the eastern moraine." for i in range(30))
QA = [
    ("When was the decision postponed?", TEXTS[0] + " " + TEXTS[1]),
    ("What did the volunteers plant?", TEXTS[5] + " " + TEXTS[2]),
    ("How much did revenue rise?", TEXTS[3] + " " + TEXTS[7]),
    ("Where did Maria meet the engineers?", TEXTS[11]),
    ("What does the recipe call for?", TEXTS[9] + " " + TEXTS[8]),
    ("How many metres were lost at station 23?", LONG_CONTEXT),  # > 384 tokens: several windows
    ("Who tuned the piano?", TEXTS[2]),
    ("What reopens?", TEXTS[4] + " " + TEXTS[6]),
]


def torch_free(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`export-model ARGV` in a child where torch, transformers, optimum and onnx cannot be imported."""
    done = subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True, timeout=600,
                          cwd=cwd or REPO)
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED")]
    assert loaded == ["LOADED []"], done.stderr[-2000:]
    return done


def run_rows(folder: Path, rows: list[dict[str, str]], tmp: Path, *extra: str) -> list[dict[str, Any]]:
    """`export-model run` (torch-free) on `rows`; one parsed output line per row."""
    source = tmp / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    done = torch_free(["run", str(folder), "--input", str(source), *extra])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == len(rows)
    return lines


def export(folder: Path, model: Path | None = None, *extra: str) -> Path:
    from exporter.cli import main

    argv = ["--output", str(folder), "--calibration-samples", "16", *extra]
    if model is not None:
        argv += ["--model", str(model)]
    assert main(argv) == 0
    return folder


# ----- without an artifact (fast) -----


def test_the_guard_really_blocks_torch() -> None:
    done = subprocess.run([sys.executable, "-c", GUARD + "import torch\n"], capture_output=True, text=True)
    assert done.returncode != 0 and "blocked by the test: torch" in done.stderr


def test_the_verify_and_run_paths_import_no_torch_transformers_or_onnx() -> None:
    """Without the guard, in the full environment: the modules `verify` and `run` load pull in none of them."""
    code = ("import sys\nimport exporter.cli, exporter.runtime.verify, exporter.runtime.model, exporter.runtime.cli, exporter.runtime.parity\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_pooling_modes_match_a_loop() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    for mode in ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                 "lasttoken"):
        got = pool(tokens, mask, Pooling((mode,)))
        for row in range(3):
            n = int(mask[row].sum())
            valid = tokens[row, :n].astype(np.float64)
            want = {"cls_token": valid[0], "max_tokens": valid.max(0), "mean_tokens": valid.mean(0),
                    "mean_sqrt_len_tokens": valid.sum(0) / np.sqrt(n), "lasttoken": valid[-1],
                    "weightedmean_tokens": (valid * np.arange(1, n + 1)[:, None]).sum(0) / np.arange(1, n + 1).sum()}
            np.testing.assert_allclose(got[row], want[mode], rtol=1e-5, atol=1e-6, err_msg=mode)
    both = pool(tokens, mask, Pooling(("cls_token", "mean_tokens"), normalize=True))
    assert both.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, rtol=1e-6)


def test_pooling_read_from_sentence_transformers_files(tmp_path: Path) -> None:
    from tests.checkpoints import minilm_path

    minilm = read_pooling(minilm_path())
    assert minilm.modes == ("mean_tokens",) and minilm.normalize
    assert read_pooling(tmp_path) == Pooling()  # no modules.json: mean pooling, not normalized
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert read_pooling(tmp_path) == Pooling(("cls_token",), False, read_pooling(tmp_path).source)
    modules.append({"path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UsageError, match="Dense"):
        read_pooling(tmp_path)


def test_default_file_is_the_fastest_that_passed_parity() -> None:
    def timing(ms: float) -> dict[str, dict[str, float]]:
        return {"b1xs128": {"median_ms": ms}, "b8xs128": {"median_ms": 4 * ms}}

    cpu = "CPUExecutionProvider"
    manifest: dict[str, Any] = {
        "files": {name: {} for name in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx")},
        "parity": [{"file": "model.onnx", "provider": cpu, "status": "pass"},
                   {"file": "model_optimized.onnx", "provider": cpu, "status": "pass"},
                   {"file": "model_optimized.onnx", "provider": "CUDAExecutionProvider", "status": "skip"},
                   {"file": "model_quantized.onnx", "provider": cpu, "status": "pass"},
                   {"file": "model_fp16.onnx", "provider": cpu, "status": "pass"}],  # not in files: not built
        "latency": {cpu: {"files": {"model.onnx": timing(10), "model_optimized.onnx": timing(8),
                                    "model_quantized.onnx": timing(5)}}},
    }
    assert choose_file(manifest, cpu) == "model_quantized.onnx"
    manifest["parity"][3]["status"] = "fail"
    assert choose_file(manifest, cpu) == "model_optimized.onnx"
    manifest["latency"] = {}
    assert choose_file(manifest, cpu) == "model_optimized.onnx"  # no timings: the fused FP32 graph
    manifest["parity"] = [{"file": "model.onnx", "provider": cpu, "status": "fail"}]
    with pytest.raises(Exception, match="no model file of this artifact passed parity"):
        choose_file(manifest, cpu)


def test_entity_grouping_follows_the_simple_strategy() -> None:
    text = "Ann Lee flew to New York from Rome"
    tokens = [("B-PER", 0.9, 0, 3), ("I-PER", 0.7, 4, 7), ("O", 0.99, 8, 12), ("O", 0.9, 13, 15),
              ("B-LOC", 0.8, 16, 19), ("I-LOC", 0.6, 20, 24), ("O", 0.9, 25, 29), ("I-LOC", 0.5, 30, 34)]
    got = [(e.entity, e.word, e.start, e.end, round(e.score, 6)) for e in group_entities(tokens, text)]
    assert got == [("PER", "Ann Lee", 0, 7, 0.8), ("LOC", "New York", 16, 24, 0.7), ("LOC", "Rome", 30, 34, 0.5)]
    # B- starts a new entity even after the same type; labels without a prefix continue while they repeat
    split = group_entities([("B-LOC", 1.0, 0, 3), ("B-LOC", 1.0, 4, 7), ("LABEL_1", 0.5, 8, 9), ("LABEL_1", 0.7, 9, 12)],
                   "Foo Bar bazz")
    assert [(e.entity, e.start, e.end) for e in split] == [("LOC", 0, 3), ("LOC", 4, 7), ("LABEL_1", 8, 12)]


def _fake_qa_runtime(start: list[float], end: list[float]) -> Runtime:
    """A Runtime over a word-level tokenizer whose model returns the given start/end logits."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "who": 4, "is": 5, "ann": 6, "lee": 7, "flew": 8}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    runtime = Runtime.__new__(Runtime)
    runtime.tokenizer, runtime.task, runtime.max_length, runtime.batch_size = tokenizer, "question-answering", 64, 8
    runtime.cls_id, runtime.padding_side, runtime.folder = 2, "right", Path("artifact")
    logits = {"start_logits": np.array([start], np.float32), "end_logits": np.array([end], np.float32)}
    runtime._run = lambda rows: (logits, None)  # type: ignore[method-assign]
    return runtime


def test_qa_search_masks_the_question_and_answers_nothing_where_cls_wins() -> None:
    # [CLS] who is ann [SEP] ann lee flew [SEP]: context tokens 5..7, "ann lee flew" at characters 0..12
    question, context = "who is ann", "ann lee flew"
    high_question = [0, 0, 0, 9, 0, 2, 0, 0, 0], [0, 0, 0, 9, 0, 0, 2, 0, 0]  # question token 3 scores highest
    runtime = _fake_qa_runtime(*high_question)
    best = runtime.answer([question], [context], null_answer=False)[0]
    assert (best.answer, best.start, best.end) == ("ann lee", 0, 7)
    assert runtime.answer([question], [context], max_answer_length=1, null_answer=False)[0].answer in ("ann", "lee")
    cls_wins = _fake_qa_runtime([6, 0, 0, 0, 0, 2, 0, 0, 0], [6, 0, 0, 0, 0, 0, 2, 0, 0])
    assert cls_wins.answer([question], [context])[0] == Answer("", pytest.approx(cls_wins.answer(
        [question], [context])[0].score), 0, 0)
    assert cls_wins.answer([question], [context])[0].score > 0.5
    assert cls_wins.answer([question], [context], null_answer=False)[0].answer == "ann lee"
    span_wins = _fake_qa_runtime([1, 0, 0, 0, 0, 6, 0, 0, 0], [1, 0, 0, 0, 0, 0, 6, 0, 0])
    assert span_wins.answer([question], [context])[0].answer == "ann lee"


# ----- the real all-MiniLM-L6-v2 -----


@pytest.fixture(scope="module")
def minilm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(tmp_path_factory.mktemp("rt-minilm") / "art")


def _torch_sentence_embeddings(texts: list[str], normalize: bool) -> np.ndarray:
    """sentence-transformers' Transformer -> Pooling(mean) -> Normalize for all-MiniLM-L6-v2, written out in
    torch (sentence-transformers is not installed): max_seq_length 256 from sentence_bert_config.json."""
    import torch
    import transformers

    from tests.checkpoints import minilm_path

    path = minilm_path()
    max_length = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.numpy()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers_pooling(minilm_artifact: Path, tmp_path: Path) -> None:
    """With the model's sentence-transformers files in the folder: mean pooling + Normalize, as the model defines
    its embedding; FP32 files within cosine 0.9999 (and 1e-4 absolute) of the torch computation."""
    from tests.checkpoints import minilm_path

    folder = tmp_path / "with-st"
    shutil.copytree(minilm_artifact, folder)
    for name in ("modules.json", "sentence_bert_config.json"):
        if not (folder / name).exists():
            shutil.copy(minilm_path() / name, folder / name)
    if not (folder / "1_Pooling").exists():
        shutil.copytree(minilm_path() / "1_Pooling", folder / "1_Pooling")
    texts = [*TEXTS, " ".join(TEXTS * 4)]  # the last is longer than max_seq_length 256
    reference = _torch_sentence_embeddings(texts, normalize=True)
    try:  # where sentence-transformers is installed (the main stack's test extra), its own encode is the reference
        from sentence_transformers import SentenceTransformer

        from tests.checkpoints import minilm_path as _path

        encoded = SentenceTransformer(str(_path()), device="cpu", local_files_only=True).encode(texts)
        assert float(np.abs(encoded - reference).max()) < 1e-5  # the torch computation is what encode computes
        reference = encoded
    except ImportError:
        pass
    for file in ("model.onnx", "model_optimized.onnx"):
        got = np.array([row["embedding"] for row in run_rows(folder, [{"text": t} for t in texts], tmp_path,
                                                             "--file", file)])
        assert got.shape == reference.shape
        cosines = _cosines(got, reference)
        assert cosines.min() >= 0.9999, (file, cosines.min())
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert float(np.abs(got - reference).max()) < 1e-4, file
    quantized = np.array([row["embedding"] for row in run_rows(folder, [{"text": t} for t in texts], tmp_path,
                                                               "--file", "model_quantized.onnx")])
    assert _cosines(quantized, reference).mean() >= 0.99


@pytest.mark.slow
def test_minilm_without_sentence_transformers_files_mean_pools(minilm_artifact: Path, tmp_path: Path) -> None:
    """A folder without modules.json: mean pooling over the attention mask, as the runtime's docstring says."""
    folder = tmp_path / "plain"
    shutil.copytree(minilm_artifact, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling"):
        target = folder / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k != name and not k.startswith(name + "/")}
    (folder / "manifest.json").write_text(json.dumps(manifest))  # the folder as an export without them lists it
    got = np.array([row["embedding"] for row in run_rows(folder, [{"text": t} for t in TEXTS], tmp_path,
                                                         "--file", "model.onnx")])
    manifest = json.loads((folder / "manifest.json").read_text())
    in_graph = "sentence_embedding" in manifest["signature"]["outputs"]
    reference = _torch_sentence_embeddings(TEXTS, normalize=in_graph)
    assert _cosines(got, reference).min() >= 0.9999
    assert float(np.abs(got - reference).max()) < 1e-4


@pytest.mark.slow
def test_default_file_and_verify_without_torch(minilm_artifact: Path, tmp_path: Path) -> None:
    manifest = json.loads((minilm_artifact / "manifest.json").read_text())
    done = torch_free(["verify", str(minilm_artifact)])
    assert done.returncode == 0, done.stderr[-2000:]
    cpu_rows = [line for line in done.stdout.splitlines() if line.split()[1:2] == ["CPUExecutionProvider"]]
    assert "verified:" in done.stdout and len(cpu_rows) == _cpu_rows(minilm_artifact) and all(" pass " in line for line in cpu_rows)
    # The default: the smallest summed median latency among (file, engine, precision) runs whose parity passed,
    # on onnxruntime's CPU provider and, where openvino is installed, OpenVINO (keys "OpenVINO CPU <precision>").
    code = GUARD + ("from exporter.runtime import Runtime\n"
                    f"print(Runtime.load({str(minilm_artifact)!r}).run_choice.describe())\n")
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    passed = {(e["file"], e["provider"] if e["provider"] != "OpenVINO CPU" else f"OpenVINO CPU {e['precision']}")
              for e in manifest["parity"] if e["status"] == "pass"}
    runs = {(name, key): sum(r["median_ms"] for r in timed.values())
            for key, measured in manifest["latency"].items() for name, timed in measured["files"].items()
            if (name, key) in passed}
    fastest = min(runs, key=runs.__getitem__)
    assert chosen.stdout.strip() == f"{fastest[0]} on {fastest[1]}"
    # One byte of a model file changed: verify exits 3 naming it, and run refuses the file the same way.
    from tests.checkpoints import changed_copy

    copy = changed_copy(minilm_artifact, tmp_path / "copy", "model_optimized.onnx")
    done = torch_free(["verify", str(copy)])
    assert done.returncode == 3 and "model_optimized.onnx: sha256 differs" in done.stderr
    rows = tmp_path / "one.jsonl"
    rows.write_text('{"text": "hi"}\n')
    done = torch_free(["run", str(copy), "--input", str(rows), "--file", "model_optimized.onnx"])
    assert done.returncode == 3 and "sha256 differs" in done.stderr and done.stdout == ""


# ----- tiny QA / classification / token classification checkpoints -----


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """{task: (checkpoint, artifact)} for tiny seeded BERT checkpoints with dead heads and units. No physically
    pruned heads: transformers 5 cannot load those with from_pretrained, and the reference must load on 4.57 and 5.x."""
    from tests.checkpoints import tiny_checkpoint

    root = tmp_path_factory.mktemp("rt-tiny")
    result = {}
    for task in ("question-answering", "text-classification", "token-classification"):
        truth = tiny_checkpoint(root / f"ck-{task}", "bert", task, pruned_heads={})
        # INT8 is not what is tested here: a random tiny head may not keep its metric within the default 1%.
        result[task] = (truth.path, export(root / f"art-{task}", truth.path, "--max-accuracy-drop", "0.9"))
    return result


def _pipeline(task: str, checkpoint: Path) -> Any:
    import transformers

    from tests.checkpoints import AUTO_CLASSES

    model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(checkpoint).eval()
    return transformers.pipeline(task, model=model, tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint),
                                 device="cpu")


def _torch_answer(model: Any, tokenizer: Any, question: str, context: str, null_answer: bool,
                  max_answer_len: int = 15) -> tuple[str, float, int, int]:
    """The usual start/end search on the PyTorch model (transformers 5 has no question-answering pipeline): 384-token
    windows with stride 128, logits of non-context tokens masked (CLS kept in the softmax), best start <= end <
    start + max_answer_len over all windows; the empty answer where CLS's start x end beats it."""
    import torch

    enc = tokenizer(question, context, truncation="only_second", max_length=384, stride=128, padding=True,
                    return_overflowing_tokens=True, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")
    feeds = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = model(**feeds)
    best, null = (-1.0, 0, 0), float("inf")
    for w in range(len(feeds["input_ids"])):
        ctx = torch.tensor([s == 1 for s in enc.sequence_ids(w)])
        keep = ctx.clone()
        keep[0] = True
        sp = torch.where(keep, out.start_logits[w].double(), -10000.0).softmax(-1)
        ep = torch.where(keep, out.end_logits[w].double(), -10000.0).softmax(-1)
        null = min(null, float(sp[0] * ep[0]))
        i, j = torch.meshgrid(torch.arange(len(ctx)), torch.arange(len(ctx)), indexing="ij")
        valid = ctx[:, None] & ctx[None, :] & (j >= i) & (j - i < max_answer_len)
        scores = torch.where(valid, sp[:, None] * ep[None, :], -1.0)
        flat = int(scores.argmax())
        s, e = divmod(flat, len(ctx))
        if float(scores[s, e]) > best[0]:
            best = (float(scores[s, e]), int(offsets[w, s, 0]), int(offsets[w, e, 1]))
    if null_answer and null > best[0]:
        return "", null, 0, 0
    return context[best[1]:best[2]], best[0], best[1], best[2]


@pytest.mark.slow
@pytest.mark.parametrize("null_answer", [True, False])
def test_qa_spans_equal_a_pytorch_search(tiny: dict[str, tuple[Path, Path]], tmp_path: Path,
                                         null_answer: bool) -> None:
    import transformers

    checkpoint, artifact = tiny["question-answering"]
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    rows = [{"question": q, "context": c} for q, c in QA]
    extra = () if null_answer else ("--always-answer",)
    got = run_rows(artifact, rows, tmp_path, "--file", "model_optimized.onnx", *extra)
    for (question, context), answer in zip(QA, got, strict=True):
        text, score, start, end = _torch_answer(model, tokenizer, question, context, null_answer)
        assert (answer["answer"], answer["start"], answer["end"]) == (text, start, end), question
        assert answer["score"] == pytest.approx(score, rel=1e-3, abs=1e-6)
        if answer["answer"]:
            assert context[answer["start"]:answer["end"]] == answer["answer"]
    if not null_answer:
        assert all(a["answer"] for a in got)


@pytest.mark.slow
def test_labels_equal_the_pytorch_argmax(tiny: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    import torch
    import transformers

    checkpoint, artifact = tiny["text-classification"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        probs = model(**tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")).logits.softmax(-1)
    for file in ("model.onnx", "model_optimized.onnx"):
        got = run_rows(artifact, [{"text": t} for t in TEXTS], tmp_path, "--file", file)
        assert [g["label"] for g in got] == [model.config.id2label[int(i)] for i in probs.argmax(-1)]
        np.testing.assert_allclose([g["score"] for g in got], probs.max(-1).values.numpy(), rtol=1e-4)


@pytest.mark.slow
def test_entities_equal_the_pytorch_pipeline(tiny: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    checkpoint, artifact = tiny["token-classification"]
    ner = _pipeline("token-classification", checkpoint)
    got = run_rows(artifact, [{"text": t} for t in TEXTS], tmp_path, "--file", "model_optimized.onnx")
    for text, row in zip(TEXTS, got, strict=True):
        want = ner(text, aggregation_strategy="simple")
        assert [(e["entity"], e["start"], e["end"]) for e in row["entities"]] == [
            (w["entity_group"], w["start"], w["end"]) for w in want]
        assert [e["score"] for e in row["entities"]] == pytest.approx([float(w["score"]) for w in want], rel=1e-4)


@pytest.mark.slow
def test_run_rejects_bad_rows_with_one_line_naming_the_row(tiny: dict[str, tuple[Path, Path]],
                                                           tmp_path: Path) -> None:
    artifact = tiny["text-classification"][1]
    qa_artifact = tiny["question-answering"][1]
    cases = [  # (artifact, rows, message, lines printed before it: run streams, so the good rows before are out)
        (artifact, '{"text": "fine"}\n{"txt": "typo"}\n', "row 2: no 'text' field", 1),
        (artifact, '{"text": "fine"}\n\n{"text": 3}\n', "row 3: 'text' must be a string", 1),
        (artifact, '{"text": "fine"}\n{"text": "cut\n', "row 2: not valid JSON", 1),
        (artifact, '["text"]\n', "row 1: expected a JSON object", 0),
        (artifact, '{"text": "\\ud800"}\n', "row 1: 'text' holds a lone surrogate", 0),
        (artifact, '[' * 100_000 + '\n', "row 1: JSON nested too deep", 0),
        (artifact, '{"text": ' + "9" * 5000 + '}\n', "row 1: not valid JSON", 0),
        (qa_artifact, '{"text": "no question"}\n', "row 1: no 'question' field", 0),
        (qa_artifact, json.dumps({"question": "why " * 600, "context": "because"}) + "\n",
         "row 1: the question cannot fit", 0),
    ]
    for folder, body, message, printed in cases:
        source = tmp_path / "bad.jsonl"
        source.write_text(body, encoding="utf-8")
        done = torch_free(["run", str(folder), "--input", str(source)])
        assert done.returncode == 2, (body, done.stderr)
        errors = [line for line in done.stderr.splitlines() if not line.startswith("LOADED")]
        assert len(errors) == 1 and errors[0].startswith("export-model run: error: "), done.stderr
        assert message in errors[0] and str(source) in errors[0], errors
        assert done.stdout.count("\n") == printed, done.stdout
    done = torch_free(["run", str(artifact), "--input", str(tmp_path / "absent.jsonl")])
    assert done.returncode == 2 and "no such file" in done.stderr
    done = torch_free(["run", str(artifact), "--input", str(source), "--file", "model_nope.onnx"])
    assert done.returncode == 2 and "is not a model file" in done.stderr


def _cpu_rows(folder: Path) -> int:
    """The artifact's onnxruntime CPU parity rows (model_qdq.onnx adds one where openvino was installed)."""
    import json

    return sum(e["provider"] == "CPUExecutionProvider" for e in json.loads((folder / "manifest.json").read_text())["parity"])

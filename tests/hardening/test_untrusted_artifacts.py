"""`verify` and `run` on artifact folders an attacker changed: one test per class of failure.

Every deployment-side command here runs as its own process tree under a test-side address-space cap
(``TEST_MEMORY``, RLIMIT_AS on the process and the child it starts) and a wall-clock limit, with every file it
opens recorded (``strace -f`` where installed, a Python audit hook in every process otherwise). The contract each
case checks: the exit code (2 bad input, 3 an artifact that does not match what it claims or hit a limit), exactly
one ``export-model ...: error:`` line, no traceback, and nothing opened outside the artifact folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from exporter.cli import main
from graphs.core.telemetry import child_env
from tests.exporter.test_loading import tiny_bert

REPO = Path(__file__).resolve().parents[2]
TEST_MEMORY = 6 << 30  # the test's own cap on every deployment-side process (each one's address space)
TEXTS = ["The committee postponed its decision on the new bridge.", "Rain will reach the valleys by Thursday."]
_AUDIT = '''import os, sys
_log = os.environ.get("EXPORT_MODEL_TEST_OPEN_LOG")
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # before the hook: not itself logged
    def _hook(event, args, _fd=_fd):
        if event == "open" and isinstance(args[0], (str, bytes)):
            os.write(_fd, os.fsencode(args[0]) + b"\\n")
    sys.addaudithook(_hook)
'''


@dataclass
class Done:
    code: int
    out: str
    err: str
    opened: list[str]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def deploy(argv: list[str], tmp: Path, seconds: float = 180, memory: int = TEST_MEMORY) -> Done:
    """``export-model <argv>`` as a process tree capped at `memory` each and `seconds` in all, with opens traced."""
    log = tmp / f"opened-{time.monotonic_ns()}.log"
    hooks = tmp / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(_AUDIT, encoding="utf-8")
    env = child_env({**os.environ, "PYTHONPATH": f"{hooks}:{REPO}", "EXPORT_MODEL_TEST_OPEN_LOG": str(log)})
    command = [sys.executable, "-m", "exporter.cli", *argv]
    strace = shutil.which("strace")
    if strace:
        command = [strace, "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log) + ".strace", *command]

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                               env=env, cwd=tmp, preexec_fn=cap, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:  # the whole tree, so no orphan keeps the pipes open
        os.killpg(process.pid, 9)
        process.communicate()
        raise AssertionError(f"export-model {argv[0]} ran past the test's {seconds} s limit") from None
    done = subprocess.CompletedProcess(command, process.returncode, out, err)
    opened = log.read_text().splitlines() if log.exists() else []
    if strace and Path(str(log) + ".strace").exists():
        for line in Path(str(log) + ".strace").read_text(errors="replace").splitlines():
            if '"' in line:
                opened.append(line.split('"')[1])
    return Done(done.returncode, done.stdout, done.stderr, opened)


def assert_refused(done: Done, code: int, *phrases: str, prog: str = "export-model verify") -> str:
    assert done.code == code, (done.code, done.err[-3000:])
    assert "Traceback" not in done.err and "panicked at" not in done.err, done.err[-3000:]
    errors = [line for line in done.error_lines if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, done.err[-3000:]
    if prog == "export-model run":
        assert len(done.error_lines) == 1, done.err[-3000:]
    for phrase in phrases:
        assert phrase.lower() in errors[0].lower(), (phrase, errors[0])
    return errors[0]


def never_opened(done: Done, outside: Path) -> None:
    hits = [path for path in done.opened if path.startswith(str(outside))]
    assert not hits, f"opened outside the artifact: {hits}"
    assert done.opened, "the open trace recorded nothing: the tracing itself is broken"


def sha(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def rewrite(folder: Path, edit: object = None, rehash: tuple[str, ...] = ()) -> None:
    """The attacker's manifest: `edit(manifest)` applied, the `rehash` files' entries recomputed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in rehash:
        manifest["files"][name] = sha(folder / name)
    if callable(edit):
        edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny feature-extraction artifact built by export-model (no latency stage), never modified."""
    root = tmp_path_factory.mktemp("untrusted")
    checkpoint = tiny_bert(root / "ckpt", max_position_embeddings=64)
    assert main(["--model", str(checkpoint), "--output", str(root / "art"), "--calibration-samples", "8", "--latency", "off"]) == 0
    return root / "art"


@pytest.fixture
def copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "art"))


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files beside the artifact that nothing may open: a secret and copies of artifact files."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.json").write_text('{"password": "hunter2"}')
    return folder


def rows(tmp: Path, texts: list[str] = TEXTS) -> Path:
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# ----- 1. reads outside the folder -----


@pytest.mark.parametrize("where", ["absolute", "dotdot", "npz"])
def test_a_manifest_naming_a_file_outside_the_folder_is_refused_unopened(copy: Path, outside: Path, tmp_path: Path,
                                                                          where: str) -> None:
    secret = outside / "secret.json"
    name = {"absolute": str(secret), "dotdot": "../outside/secret.json", "npz": "../outside/secret.json"}[where]

    def edit(manifest: dict) -> None:
        manifest["files"][name] = sha(secret)  # its true size and hash: the old verify answered "0" here
        if where == "npz":
            manifest["parity_data"]["inputs"] = name

    rewrite(copy, edit)
    done = deploy(["verify", str(copy)], tmp_path)
    assert_refused(done, 2, "not a plain relative name")
    never_opened(done, outside)


def test_a_symlink_leaving_the_folder_is_neither_verified_nor_served(copy: Path, outside: Path,
                                                                     tmp_path: Path) -> None:
    shutil.copy(copy / "tokenizer.json", outside / "tokenizer.json")  # same bytes: the hash would match
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    done = deploy(["verify", str(copy)], tmp_path)
    assert done.code == 3 and "tokenizer.json: a symbolic link" in done.err, done.err
    never_opened(done, outside)
    done = deploy(["run", str(copy), "--input", str(rows(tmp_path))], tmp_path)
    assert_refused(done, 3, "tokenizer.json", "symbolic link", prog="export-model run")
    assert done.out == ""
    never_opened(done, outside)


# ----- 2. files read without a check, unlisted files, tables that cannot fail -----


def test_an_edited_tokenizer_config_is_refused_by_run(copy: Path, tmp_path: Path) -> None:
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings["model_max_length"] = 4  # changes every embedding; the old run read it unchecked and exited 0
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    done = deploy(["run", str(copy), "--input", str(rows(tmp_path))], tmp_path)
    assert_refused(done, 3, "tokenizer_config.json: sha256 differs", prog="export-model run")
    assert done.out == ""


def test_an_unlisted_file_fails_verify_and_is_never_read_by_run(artifact: Path, copy: Path, tmp_path: Path) -> None:
    (copy / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[SEP]", "cls_token": "[SEP]"}))
    done = deploy(["verify", str(copy)], tmp_path)
    assert done.code == 3 and "unlisted  special_tokens_map.json" in done.err, done.err
    clean = deploy(["run", str(artifact), "--input", str(rows(tmp_path))], tmp_path)
    dirty = deploy(["run", str(copy), "--input", str(rows(tmp_path))], tmp_path)
    assert clean.code == dirty.code == 0 and clean.out == dirty.out, dirty.err
    assert not any(path.endswith("special_tokens_map.json") for path in dirty.opened)


@pytest.mark.parametrize("edit, phrase", [
    (lambda m: m.update(files={}), "'files' is not a non-empty table"),
    (lambda m: m.update(parity=[]), "'parity' is not a non-empty list"),
    (lambda m: m["options"]["parity"].update(fp32_atol=1e30), "fp32_atol 1e+30 is outside what export writes"),
    (lambda m: m["options"]["parity"].update(int8_min_cosine=0.0), "int8_min_cosine 0.0 is outside"),
    (lambda m: m.update(parity=[e for e in m["parity"] if e["file"] != "model.onnx"]), "no parity row"),
])
def test_a_manifest_that_cannot_fail_is_refused(copy: Path, tmp_path: Path, edit: object, phrase: str) -> None:
    rewrite(copy, edit)
    assert_refused(deploy(["verify", str(copy)], tmp_path), 2, phrase)


# ----- 3. check-then-use -----


def _scaled_model(source: Path, target: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.ndim == 2 and array.size > 1000:
            tensor.CopyFrom(numpy_helper.from_array((array * np.float32(-1.5)).astype(np.float32), tensor.name))
    onnx.save(model, str(target))


def test_a_model_swapped_right_after_its_check_is_never_served(artifact: Path, copy: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst timing, made certain: the file is swapped the moment after its bytes were read and hashed. The
    session is built from those bytes, so the genuine model runs (the old runtime opened the name again)."""
    from exporter.runtime.artifact import Artifact
    from exporter.runtime.model import Runtime

    evil = tmp_path / "evil.onnx"
    _scaled_model(copy / "model.onnx", evil)
    genuine = Runtime.load(artifact, file="model.onnx").embed(TEXTS)
    real_check = Artifact._check

    def read_then_swap(self: Artifact, name: str, keep: bool) -> tuple[str | None, bytes | None]:
        result = real_check(self, name, keep)
        if name == "model.onnx":
            os.replace(evil, copy / "model.onnx")
        return result

    monkeypatch.setattr(Artifact, "_check", read_then_swap)
    served = Runtime.load(copy, file="model.onnx")
    assert (copy / "model.onnx").read_bytes() != (artifact / "model.onnx").read_bytes()  # the swap happened
    np.testing.assert_array_equal(served.embed(TEXTS), genuine)


def test_a_racing_swap_never_serves_the_swapped_model(artifact: Path, copy: Path, tmp_path: Path) -> None:
    """A thread flips model.onnx between the genuine and a swapped file while `run` loads it 12 times: every run
    either refuses (exit 3) or prints the genuine model's output."""
    evil = tmp_path / "evil.onnx"
    _scaled_model(copy / "model.onnx", evil)
    genuine_copy = tmp_path / "genuine.onnx"
    shutil.copy(copy / "model.onnx", genuine_copy)
    source = rows(tmp_path)
    want = deploy(["run", str(artifact), "--input", str(source), "--file", "model.onnx"], tmp_path).out
    stop = threading.Event()

    def flip() -> None:
        staging = copy / ".staging"
        while not stop.is_set():
            for file in (evil, genuine_copy):
                shutil.copy(file, staging)
                os.replace(staging, copy / "model.onnx")
                time.sleep(0.002)

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    outcomes = []
    try:
        for _ in range(12):
            done = deploy(["run", str(copy), "--input", str(source), "--file", "model.onnx"], tmp_path)
            assert done.code in (0, 3), done.err
            assert done.code == 3 or done.out == want, "a swapped model was served"
            outcomes.append(done.code)
    finally:
        stop.set()
        flipper.join()
    assert 3 in outcomes or 0 in outcomes


# ----- 4. bounds on the deployment side -----


def test_a_2_gib_manifest_is_refused_before_it_is_read(copy: Path, tmp_path: Path) -> None:
    with open(copy / "manifest.json", "r+b") as handle:
        handle.truncate(2 << 30)  # sparse: no disk, but 2 GiB to anyone who reads it
    done = deploy(["verify", str(copy)], tmp_path, seconds=60, memory=2 << 30)
    assert_refused(done, 2, "over the 16,777,216-byte cap")


def _write_npz(path: Path, members: dict[str, bytes], compress: bool = True) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("kind, phrase", [
    ("bomb", "unpack to more than"),
    ("batches", "more than 64 parity batches"),
    ("pickle", "is not a parity array"),
    ("garbage", "not an npz archive"),
])
def test_hostile_parity_data_is_refused_within_bounds(copy: Path, tmp_path: Path, kind: str, phrase: str) -> None:
    target = copy / "parity" / "inputs.npz"
    if kind == "bomb":  # 3 GB of zeros in a few MB
        import io

        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "<i8", "fortran_order": False,
                                                      "shape": (8, 400_000_000 // 8)})
        header = buffer.getvalue()
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            with archive.open("0/input_ids.npy", "w", force_zip64=True) as member:
                member.write(header)
                block = bytes(64 << 20)
                for _ in range(48):
                    member.write(block)
    elif kind == "batches":
        _write_npz(target, {f"{i}/{name}.npy": _npy(np.ones((1, 4), np.int64)) for i in range(100)
                            for name in ("input_ids", "attention_mask")})
    elif kind == "pickle":
        _write_npz(target, {"0/input_ids.npy": _npy(np.array([{"a": 1}], dtype=object))})
    else:
        target.write_bytes(os.urandom(4096))
    rewrite(copy, rehash=("parity/inputs.npz",))
    done = deploy(["verify", str(copy)], tmp_path, seconds=120, memory=3 << 30)
    assert_refused(done, 3, phrase)


def test_a_fifo_in_place_of_parity_data_does_not_hang_verify(copy: Path, tmp_path: Path) -> None:
    (copy / "parity" / "inputs.npz").unlink()
    os.mkfifo(copy / "parity" / "inputs.npz")
    start = time.monotonic()
    done = deploy(["verify", str(copy)], tmp_path, seconds=120)
    assert time.monotonic() - start < 120
    assert done.code == 3 and "inputs.npz: a FIFO" in done.err, done.err


def test_an_oversized_tokenizer_is_refused_before_it_is_read(copy: Path, tmp_path: Path) -> None:
    with open(copy / "tokenizer.json", "ab") as handle:  # a 10-million-entry vocabulary is about this size
        handle.truncate(40 << 20)
    rewrite(copy, rehash=("tokenizer.json",))
    done = deploy(["run", str(copy), "--input", str(rows(tmp_path))], tmp_path, memory=3 << 30)
    assert_refused(done, 3, "tokenizer.json", "cap", prog="export-model run")


def test_a_huge_input_line_is_refused_and_a_long_text_is_cut(artifact: Path, tmp_path: Path) -> None:
    line = tmp_path / "line.jsonl"
    with open(line, "wb") as handle:  # one 256 MiB line, not read whole
        handle.write(b'{"text": "')
        handle.write(b"word " * ((256 << 20) // 5))
    done = deploy(["run", str(artifact), "--input", str(line)], tmp_path, seconds=120, memory=3 << 30)
    assert_refused(done, 2, "row 1: longer than 1,048,576 bytes", prog="export-model run")
    text = "the bridge " * 90_000  # 990 KB: under the line cap, far over what 64 positions use
    long_rows = rows(tmp_path, [text, text[: 64 * 64]])
    start = time.monotonic()
    done = deploy(["run", str(artifact), "--input", str(long_rows), "--time-limit", "30"], tmp_path,
                  memory=3 << 30)
    assert done.code == 0 and time.monotonic() - start < 60, done.err
    first, second = (json.loads(line)["embedding"] for line in done.out.splitlines())
    assert first == second  # cut to max_length x 64 characters before tokenizing: the same tokens


def test_run_streams_rows_one_batch_at_a_time(artifact: Path, tmp_path: Path) -> None:
    """Through a FIFO: the first rows' lines come out while the writer still holds the input open (the old run
    read the whole input first and blocked here)."""
    fifo = tmp_path / "rows.fifo"
    os.mkfifo(fifo)
    command = [sys.executable, "-m", "exporter.cli", "run", str(artifact), "--input", str(fifo), "--batch-size", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env=child_env(), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:  # the writer end opens once run opens the FIFO for reading (a run that never does fails here)
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "run never opened the FIFO"
                time.sleep(0.1)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "w", encoding="utf-8") as writer:
            writer.write("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
            writer.flush()
            ready, _, _ = select.select([process.stdout], [], [], 90)
            assert ready, "no output while the input stayed open: run does not stream"
            first = process.stdout.readline()  # type: ignore[union-attr]
            assert "embedding" in json.loads(first)
        _, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
    finally:
        process.kill()


def _hostile_model(kind: str) -> bytes:
    """A model with the artifact's inputs and output whose compute is the attacker's: a 6 GB ConstantOfShape, or
    a Loop of 2^62 steps."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["x", "y", "z"])
    if kind == "memory":
        shape = helper.make_tensor("shape", TensorProto.INT64, [3], [1500, 1000, 1000])
        nodes = [helper.make_node("ConstantOfShape", ["shape"], ["last_hidden_state"])]
        graph = helper.make_graph(nodes, "bomb", inputs, [output], [shape])
    else:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["x_in"], ["x_out"])],
            "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 1, 1])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 1, 1])])
        initializers = [helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
                        helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
                        helper.make_tensor("x", TensorProto.FLOAT, [1, 1, 1], [0.0])]
        nodes = [helper.make_node("Loop", ["trips", "cond", "x"], ["last_hidden_state"], body=body)]
        graph = helper.make_graph(nodes, "spin", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("kind, argv, phrase", [
    ("memory", ["--memory-limit", "2G"], "more memory than the limit allows (Failed to allocate memory for requested"),
    ("time", ["--time-limit", "15"], "ran past the 15 s time limit"),
])
def test_an_attackers_graph_runs_inside_the_limits(copy: Path, tmp_path: Path, kind: str, argv: list[str],
                                                   phrase: str) -> None:
    (copy / "model.onnx").write_bytes(_hostile_model(kind))
    rewrite(copy, rehash=("model.onnx",))
    start = time.monotonic()
    done = deploy(["verify", str(copy), *argv], tmp_path, seconds=120, memory=4 << 30)
    assert time.monotonic() - start < 100
    assert done.code == 3 and "Traceback" not in done.err and phrase in done.err, done.err[-2000:]


# ----- 5. tokenizer regexes -----


def _with_regex(tokenizer_json: Path, pattern: str) -> None:
    spec = json.loads(tokenizer_json.read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        spec["pre_tokenizer"]]}
    tokenizer_json.write_text(json.dumps(spec))


def test_a_panicking_tokenizer_regex_is_one_line_at_run(copy: Path, tmp_path: Path) -> None:
    _with_regex(copy / "tokenizer.json", "(a+)+$")
    rewrite(copy, rehash=("tokenizer.json",))
    done = deploy(["run", str(copy), "--input", str(rows(tmp_path, ["a" * 40 + "!"]))], tmp_path)
    assert_refused(done, 3, "panicked", prog="export-model run")


def test_a_panicking_tokenizer_regex_is_refused_at_export(tmp_path: Path) -> None:
    checkpoint = tiny_bert(tmp_path / "ckpt", max_position_embeddings=64)
    _with_regex(checkpoint / "tokenizer.json", "(a+)+$")
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(checkpoint), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=child_env())
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("export-model: error:")]
    assert len(errors) == 1 and "regex fails on a test text" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


# ----- 6. exit codes: bad input is 2, a bad artifact 3, never a traceback -----


@pytest.mark.parametrize("body, code, phrase", [
    ("[" * 200_000 + "]" * 200_000, 2, "nested too deep"),
    (None, 2, "'files' is not a non-empty table"),
    ("task", 2, "task 'summarization' is not one of"),
    ('{"schema_version": 1, "n": ' + "9" * 5000 + "}", 2, "not valid JSON"),
])
def test_a_malformed_manifest_is_exit_2_with_one_line(copy: Path, tmp_path: Path, body: str | None, code: int,
                                                      phrase: str) -> None:
    if body is None:
        rewrite(copy, lambda m: m.update(files=list(m["files"])))
    elif body == "task":
        rewrite(copy, lambda m: m.update(task="summarization"))
    else:
        (copy / "manifest.json").write_text(body)
    assert_refused(deploy(["verify", str(copy)], tmp_path), code, phrase)
    assert_refused(deploy(["run", str(copy), "--input", str(rows(tmp_path))], tmp_path), code, phrase,
                   prog="export-model run")


@pytest.mark.parametrize("kind, phrase", [
    ("garbage", "onnxruntime cannot load or run it"),
    ("custom-op", "onnxruntime cannot load or run it"),
    ("external", "onnxruntime cannot load or run it"),
])
def test_a_model_onnxruntime_cannot_load_is_exit_3(copy: Path, outside: Path, tmp_path: Path, kind: str,
                                                   phrase: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    if kind == "garbage":
        (copy / "model.onnx").write_bytes(os.urandom(10_000))
    else:
        model = onnx.load(str(copy / "model.onnx"))
        if kind == "custom-op":
            model.graph.node.append(helper.make_node("Boom", ["input_ids"], ["boom"], domain="com.evil"))
            model.opset_import.append(helper.make_opsetid("com.evil", 1))
        else:  # an initializer whose bytes live "outside"
            (outside / "weights.bin").write_bytes(bytes(4096))
            tensor = model.graph.initializer[0]
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", "../outside/weights.bin"), ("offset", "0"), ("length", "4096")):
                tensor.external_data.add(key=key, value=value)
        (copy / "model.onnx").write_bytes(model.SerializeToString())
    rewrite(copy, rehash=("model.onnx",))
    done = deploy(["verify", str(copy)], tmp_path)
    assert done.code == 3 and phrase in done.err and "Traceback" not in done.err, done.err[-2000:]
    never_opened(done, outside)
    done = deploy(["run", str(copy), "--input", str(rows(tmp_path)), "--file", "model.onnx"], tmp_path)
    assert_refused(done, 3, "onnxruntime cannot load it", prog="export-model run")


def test_an_input_that_is_not_a_file_is_exit_2(artifact: Path, tmp_path: Path) -> None:
    done = deploy(["run", str(artifact), "--input", str(tmp_path)], tmp_path)
    assert_refused(done, 2, "is not a regular file or FIFO", prog="export-model run")


def test_a_model_with_external_data_runs_from_a_checked_private_copy(artifact: Path, copy: Path, outside: Path,
                                                                     tmp_path: Path) -> None:
    """Past 2 GB export writes weights to `model.onnx.data` (XLM-R large, say). Both files are checked and
    copied to a private folder for onnxruntime, so the listed data file is used and nothing else is opened."""
    import onnx

    model = onnx.load(str(copy / "model.onnx"))
    onnx.save(model, str(copy / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    rewrite(copy, rehash=("model.onnx", "model.onnx.data"))
    done = deploy(["verify", str(copy)], tmp_path)
    assert done.code == 0, done.err[-2000:]
    source = rows(tmp_path)
    want = deploy(["run", str(artifact), "--input", str(source), "--file", "model.onnx"], tmp_path)
    got = deploy(["run", str(copy), "--input", str(source), "--file", "model.onnx"], tmp_path)
    assert got.code == 0 and got.out == want.out, got.err
    never_opened(got, outside)


def test_export_refuses_a_tokenizer_the_deployment_side_would_refuse(tmp_path: Path) -> None:
    """31 MB of compact JSON (1.4 million entries) is under the 32 MiB input cap but saves indented as 39 MB: it
    is refused at load, one line, before the long stages, not shipped as an artifact `run` cannot open."""
    checkpoint = tiny_bert(tmp_path / "ckpt", max_position_embeddings=64)
    (checkpoint / "vocab.txt").unlink()
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab.update({f"zz{i:08d}": len(vocab) + i for i in range(1_400_000 - len(vocab))})
    (checkpoint / "tokenizer.json").write_text(json.dumps(spec, separators=(",", ":")))
    assert (checkpoint / "tokenizer.json").stat().st_size < 32 << 20
    done = subprocess.run([sys.executable, "-m", "exporter.cli", "--model", str(checkpoint), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=child_env())
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("export-model: error:")]
    assert len(errors) == 1 and "over the 33,554,432 the deployment side opens" in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()

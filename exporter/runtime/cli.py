"""`export-model run DIR --input FILE.jsonl [--file NAME]`: an artifact's task outputs, one JSON line per row.

Rows are ``{"text": ...}`` (``{"question": ..., "context": ...}`` for question answering); each output line is
``{"embedding": [...]}``, ``{"label": ..., "score": ...}``, ``{"answer": ..., "score": ..., "start": ..., "end": ...}``
or ``{"entities": [{"entity": ..., "start": ..., "end": ..., "score": ...}]}`` (see exporter/runtime/model.py).

Streaming: rows are read ``--batch-size`` at a time, run, and their lines printed and flushed before the next rows
are read, so memory does not grow with the number of rows. A bad row (not JSON, a line over 1 MiB, a missing
field, a lone surrogate) ends the run with one line ``export-model run: error: ... row N ...`` and exit 2, after
the lines of the rows before it. The work runs in a bounded child process (exporter/runtime/sandbox.py): a batch that
takes longer than ``--time-limit`` or a process that passes ``--memory-limit`` is exit 3. Needs no torch or
transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from exporter.runtime import sandbox
from exporter.runtime.engines import ENGINES
from exporter.runtime.files import parse_json
from exporter.runtime.trust import Trust
from graphs.core.errors import ExportError, UsageError, first_line
from graphs.core.openvino_sessions import ENGINE
from graphs.core.telemetry import quiet_onnxruntime

PROG = "export-model run"
MAX_LINE_BYTES = 2**20  # one JSON row; a JSON line cannot be cut, so a longer one is refused


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, and where the flags are listed), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_trust_options(parser: argparse.ArgumentParser) -> None:
    """--public-key, --digest, --require-signature, --memory-limit: shared by `verify` and `run`."""
    parser.add_argument("--public-key", action="append", default=[], metavar="PEM",
                        help="public key the manifest must be signed with (repeatable; never from the folder)")
    parser.add_argument("--digest", default=None, metavar="sha256:HEX",
                        help="the manifest's pinned sha256 (as export-model sign and verify print it)")
    parser.add_argument("--require-signature", action="store_true",
                        help="refuse an artifact without a valid signature by a --public-key")
    parser.add_argument("--memory-limit", type=sandbox.parse_size, default=sandbox.DEFAULT_MEMORY, metavar="SIZE",
                        help="address-space cap of the process that opens the artifact (default: 8G)")


def trust_from(args: argparse.Namespace) -> Trust:
    return Trust(tuple(Path(p) for p in args.public_key), args.digest, args.require_signature)


def run_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Run an artifact on the rows of a JSONL file: one JSON line per row "
                     "on stdout, streamed (needs only onnxruntime, numpy, tokenizers and cryptography).")
    parser.add_argument("folder", help="artifact folder written by export-model")
    parser.add_argument("--input", required=True, metavar="FILE.jsonl",
                        help='rows {"text": ...} or, for question answering, {"question": ..., "context": ...} '
                        "(a file or a FIFO; read as a stream)")
    parser.add_argument("--file", default=None, metavar="NAME",
                        help="model file to run (default: the fastest deployable one in the manifest)")
    parser.add_argument("--provider", default="cpu", help="execution provider: cpu, cuda, ... (default: cpu)")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="auto (default): the fastest deployable (file, engine, precision) in the manifest's "
                        "latency table, OpenVINO included where openvino is installed and the provider is cpu (not "
                        "a row the export measured and did not serve); "
                        "onnxruntime or openvino to keep to one; with --file, the file runs at its own precision")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per session run (default: 8)")
    parser.add_argument("--max-answer-length", type=int, default=15,
                        help="question answering: longest answer in tokens (default: 15)")
    parser.add_argument("--always-answer", action="store_true",
                        help="question answering: never return the empty (no) answer")
    add_trust_options(parser)
    parser.add_argument("--time-limit", type=sandbox.positive_seconds, default=120.0, metavar="SECONDS",
                        help="wall-clock limit per batch (default: 120)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def open_input(path: Path) -> IO[bytes]:
    """`path` opened for reading as a stream: a regular file or a FIFO; anything else is one UsageError line."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file; pass a JSONL file, one JSON object per line") from None
    except OSError as error:
        raise UsageError(f"--input {path} cannot be read ({error.strerror}); pass a JSONL file") from None
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise UsageError(f"--input {path} is not a regular file or FIFO; pass a JSONL file, one JSON object per line")
    try:
        handle = open(path, "rb")  # noqa: SIM115  (closed by the caller)
    except FileNotFoundError:
        raise UsageError(f"--input {path}: no such file; pass a JSONL file, one JSON object per line") from None
    except OSError as error:
        raise UsageError(f"--input {path} cannot be opened ({error.strerror}); pass a JSONL file") from None
    mode = os.fstat(handle.fileno()).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        handle.close()
        raise UsageError(f"--input {path} is not a regular file or FIFO; pass a JSONL file, one JSON object per line")
    return handle


def read_rows(handle: IO[bytes], path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line, read one line at a time (at most MAX_LINE_BYTES);
    a UsageError naming the line if it is too long, not UTF-8 or not JSON."""
    number = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise UsageError(f"--input {path} row {number}: longer than {MAX_LINE_BYTES:,} bytes; split the text "
                             "(the model reads at most its maximum length of it anyway)")
        if not line.strip():
            continue
        yield number, parse_json(line, f"--input {path} row {number}")


def _execute(args: argparse.Namespace) -> int:
    from exporter.runtime.model import Runtime

    sandbox.arm(args.time_limit)  # loading counts as one batch
    runtime = Runtime.load(Path(args.folder), file=args.file, provider=args.provider, batch_size=args.batch_size,
                           trust=trust_from(args), engine=args.engine)
    sandbox.disarm()
    path = Path(args.input)
    options: dict[str, Any] = {}
    if runtime.task == "question-answering":
        options = {"max_answer_length": args.max_answer_length, "null_answer": not args.always_answer}
    rows: list[dict[str, Any]] = []
    names: list[str] = []

    def answer() -> None:
        """Run the rows read so far and print their lines, flushed (the stream's unit of work)."""
        batch, batch_names = rows[:], names[:]
        rows.clear()  # taken before running: a batch that fails is not run again by the error path
        names.clear()
        if batch:
            sandbox.arm(args.time_limit)
            results = runtime.predict_rows(batch, names=batch_names, **options)
            sandbox.disarm()
            sys.stdout.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))
            sys.stdout.flush()

    with open_input(path) as handle:
        try:
            for number, row in read_rows(handle, path):
                name = f"--input {path} row {number}"
                checked = runtime.check_row(row, name)
                rows.append({key: checked[key] for key in runtime.row_fields})
                names.append(name)
                if len(rows) == args.batch_size:
                    answer()
        except UsageError:
            answer()  # the rows before the bad one get their lines first
            raise
        answer()
    return 0


def run_main(argv: Sequence[str]) -> int:
    """The `run` subcommand; returns the exit code (0; 2 bad input; 3 an artifact that does not match what it
    claims, or hit a limit; 1 only for a bug of this tool)."""
    args = run_parser().parse_args(argv)
    if args.batch_size < 1 or args.max_answer_length < 1:
        print(f"{PROG}: error: --batch-size and --max-answer-length must be >= 1", file=sys.stderr)
        return 2
    if not sandbox.in_child():
        return sandbox.run_bounded("run", list(argv), PROG, args.memory_limit, args.time_limit, "a batch",
                                   args.debug)
    sandbox.enter_child(args.memory_limit, args.debug)
    return guarded(PROG, args.debug, lambda: _execute(args))


def guarded(prog: str, debug: bool, work: Any) -> int:
    """`work()`'s exit code, every failure one line on stderr: ExportError its own code; running out of the
    memory limit, onnxruntime failing on the artifact's graph, or a library panic on its files 3; anything else
    (a bug of this tool) 1. Tracebacks only with `debug`."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format=f"{prog}: %(levelname)s: %(message)s")
    quiet_onnxruntime()
    try:
        return work()
    except ExportError as error:
        code, line = error.exit_code, f"error: {error}"
    except MemoryError:
        code, line = 3, "error: the artifact passed the memory limit (--memory-limit) and was stopped"
    except RecursionError:
        code, line = 2, "error: input nested too deep to read"
    except KeyboardInterrupt:
        code, line = 130, "interrupted"
    except Exception as error:
        from graphs.core.errors import from_onnxruntime

        if from_onnxruntime(error):
            from exporter.runtime.parity import ort_failure

            code, line = 3, f"error: the artifact's graph failed: {ort_failure(error)}; refuse the artifact"
        else:
            code, line = 1, (f"internal error: {type(error).__name__}: {first_line(error)} (rerun with --debug for "
                             "the traceback)")
    except BaseException as error:  # noqa: B036  (a Rust panic in a library: pyo3's PanicException)
        code, line = 3, f"error: a library panicked on the artifact's files ({first_line(error, 200)})"
    print(f"{prog}: {line}", file=sys.stderr)
    if debug:
        traceback.print_exc()
    return code


def verify_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="export-model verify", description="Check an artifact: its signature or pinned digest "
                     "(when given), every file against the manifest, no unlisted files, and parity re-run from its "
                     "stored reference inputs and outputs.")
    parser.add_argument("folder", help="artifact folder written by export-model")
    parser.add_argument("--providers", type=comma_list, default=("auto",),
                        help="execution providers, comma-separated (default: auto, every provider present)")
    add_trust_options(parser)
    parser.add_argument("--time-limit", type=sandbox.positive_seconds, default=900.0, metavar="SECONDS",
                        help="wall-clock limit of the whole check (default: 900)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def verify_main(argv: Sequence[str]) -> int:
    """`export-model verify DIR`: 0 when the trust anchors, hashes and parity hold; 3 when not (or a limit was
    hit); 2 for bad input. Runs in a bounded child process (exporter/runtime/sandbox.py)."""
    parser = verify_parser()
    args = parser.parse_args(argv)
    if not sandbox.in_child():
        return sandbox.run_bounded("verify", list(argv), "export-model verify", args.memory_limit, args.time_limit,
                                   "verify", args.debug)
    sandbox.enter_child(args.memory_limit, args.debug)
    sandbox.arm(args.time_limit)
    return guarded("export-model verify", args.debug, lambda: _verify(args))


def _verify(args: argparse.Namespace) -> int:
    from exporter.runtime.verify import verify_artifact

    report = verify_artifact(Path(args.folder), args.providers, trust_from(args))
    for entry in report.parity:
        detail = f"max abs {entry.max_abs_error:.2e}" if entry.max_abs_error is not None else entry.reason
        where = entry.provider if entry.provider != ENGINE else f"{ENGINE} {entry.precision}"
        print(f"{entry.file:<24} {where:<24} {entry.status:<5} {detail}")
    print(f"trust: {report.trust}")
    if not report.ok:
        print(f"export-model verify: FAILED for {args.folder}:\n{report.table()}", file=sys.stderr)
        return 3
    print(f"verified: {args.folder} (manifest sha256:{report.manifest_sha256}; {len(report.parity)} parity checks, "
          "every file's sha256 matches, no unlisted files)")
    return 0


def sign_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="export-model sign", description="Check an artifact against its manifest, then sign the "
                     "manifest (which lists every file's sha256) with a private key: DIR/manifest.sig.")
    parser.add_argument("folder", help="artifact folder written by export-model")
    parser.add_argument("--key", required=True, metavar="PEM", help="Ed25519 or ECDSA private key (unencrypted PEM)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def sign_main(argv: Sequence[str]) -> int:
    """`export-model sign DIR --key private.pem`: write DIR/manifest.sig (exporter/runtime/signing.py)."""
    parser = sign_parser()
    args = parser.parse_args(argv)
    def sign() -> int:
        from exporter.runtime.signing import load_private_key, sign_artifact

        record = sign_artifact(args.folder, load_private_key(args.key))
        print(f"signed: {args.folder} (manifest sha256:{record['manifest_sha256']}, key {record['key_id']})")
        return 0

    return guarded("export-model sign", args.debug, sign)

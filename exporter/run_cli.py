"""`export-model run DIR --input FILE.jsonl [--file NAME]`: an artifact's task outputs, one JSON line per row.

Rows are ``{"text": ...}`` (``{"question": ..., "context": ...}`` for question answering); each output line is
``{"embedding": [...]}``, ``{"label": ..., "score": ...}``, ``{"answer": ..., "score": ..., "start": ..., "end": ...}``
or ``{"entities": [{"entity": ..., "start": ..., "end": ..., "score": ...}]}`` (see exporter/runtime.py). Every
row is read and checked before anything runs, so bad input prints nothing on stdout: one line
``export-model run: error: ...`` naming the row on stderr, exit code 2. Needs no torch or transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from exporter.errors import ExportError, UsageError, first_line
from exporter.telemetry import quiet_onnxruntime

PROG = "export-model run"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Run an artifact on the rows of a JSONL file: one JSON line per row "
                     "on stdout (needs only onnxruntime, numpy and tokenizers).")
    parser.add_argument("folder", help="artifact folder written by export-model")
    parser.add_argument("--input", required=True, metavar="FILE.jsonl",
                        help='rows {"text": ...} or, for question answering, {"question": ..., "context": ...}')
    parser.add_argument("--file", default=None, metavar="NAME",
                        help="model file to run (default: the fastest deployable one in the manifest)")
    parser.add_argument("--provider", default="cpu", help="execution provider: cpu, cuda, ... (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per session run (default: 8)")
    parser.add_argument("--max-answer-length", type=int, default=15,
                        help="question answering: longest answer in tokens (default: 15)")
    parser.add_argument("--always-answer", action="store_true",
                        help="question answering: never return the empty (no) answer")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of `path`; a UsageError naming the line if not JSON."""
    if not path.is_file():
        raise UsageError(f"--input {path}: no such file; pass a JSONL file, one JSON object per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"--input {path} is not UTF-8 text ({error})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise UsageError(f"--input {path} row {number}: not valid JSON ({error.msg} at column {error.colno})"
                             ) from None
    return rows


def run_main(argv: Sequence[str]) -> int:
    """The `run` subcommand; returns the exit code (0, 2 bad input, 3 a changed file, 1 internal error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    quiet_onnxruntime()
    try:
        if args.batch_size < 1 or args.max_answer_length < 1:
            raise UsageError("--batch-size and --max-answer-length must be >= 1")
        from exporter.runtime import Runtime

        runtime = Runtime.load(Path(args.folder), file=args.file, provider=args.provider,
                               batch_size=args.batch_size)
        path = Path(args.input)
        numbered = read_rows(path)
        names = [f"--input {path} row {number}" for number, _ in numbered]
        rows = [runtime.check_row(row, name) for name, (_, row) in zip(names, numbered, strict=True)]
        options: dict[str, Any] = {}
        if runtime.task == "question-answering":
            options = {"max_answer_length": args.max_answer_length, "null_answer": not args.always_answer}
        results = runtime.predict_rows(rows, names=names, **options)  # all rows first: an error prints nothing
        sys.stdout.write("".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results))
        sys.stdout.flush()
    except ExportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return error.exit_code
    except Exception as error:  # one line, traceback on request
        print(f"{PROG}: internal error: {type(error).__name__}: {first_line(error)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 1
    return 0

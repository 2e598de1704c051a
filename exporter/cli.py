"""`export-model`: the command line. Flags come from `config.OPTIONS`; errors map to exit codes.

`export-model verify DIR` re-checks an artifact (see exporter/runtime/verify.py).

Exit codes: 0 success; 2 bad input or usage; 3 parity failed (artifact kept, marked not deployable);
4 a pipeline stage failed; 1 an unexpected internal error; 130 interrupted (SIGINT/SIGTERM).
Only this module configures logging; a traceback is printed only with --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from exporter.runtime.cli import Parser, comma_list
from graphs.core.errors import ExportError, UsageError
from graphs.core.telemetry import quiet_onnxruntime

if TYPE_CHECKING:  # imported where used: `verify` and `run` must start without torch, onnx or transformers
    from exporter.config import ExportConfig, Option

log = logging.getLogger("exporter")


def _choices(option: Option) -> Sequence[str] | None:
    if option.field == "task":
        from exporter.architectures import TASKS

        return TASKS
    if option.field == "quantization.preset":
        from calibration.settings import PRESETS

        return sorted(PRESETS)
    if option.field == "quantization.method":
        from calibration.settings import METHODS

        return sorted(METHODS)
    return option.choices


SUBCOMMANDS = """subcommands:
  export-model [export] [flags]        load, compact, export, fuse, quantize, check and package (the default)
  export-model verify DIR [flags]      check an artifact: signature or digest, hashes, unlisted files, parity
  export-model run DIR --input FILE    run an artifact on JSONL rows, one JSON line out per row
  export-model sign DIR --key PEM      sign an artifact's manifest
see `export-model SUBCOMMAND --help`; every flag: docs/cli.md"""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("export-model")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _shown(default: object) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default).lower() if isinstance(default, bool) else str(default)


def build_parser() -> argparse.ArgumentParser:
    from exporter.config import OPTIONS, field_default

    parser = Parser(
        prog="export-model",
        description="Compact, export, fuse, quantize and verify a BERT-family checkpoint as a deployable ONNX artifact.",
        epilog=SUBCOMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"export-model {_version()}")
    for option in OPTIONS:
        default = field_default(option.field)
        shown = "" if "default" in option.help or default in (None, "") else f" (default: {_shown(default)})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": option.field, "help": option.help + shown}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            if isinstance(default, tuple):
                kwargs["type"] = comma_list
            elif isinstance(default, (int, float)):
                kwargs["type"] = type(default)
            elif option.kind is not None:
                kwargs["type"] = option.kind
            kwargs["choices"] = _choices(option)
            kwargs["metavar"] = option.flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(option.flag, **kwargs)
    parser.add_argument("--config", metavar="FILE", help="replay the options stored in a manifest.json (flags override)")
    parser.add_argument("--sign-key", metavar="PEM", help="sign the artifact's manifest with this Ed25519 or ECDSA "
                        "private key (manifest.sig; checked before the export starts; not stored in the manifest)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--verbose", action="store_true", help="log every stage's details")
    return parser


def config_from_args(args: argparse.Namespace) -> ExportConfig:
    """The run's config: `--config FILE` (if given), then each flag; a value the config refuses is a UsageError."""
    from exporter.config import OPTIONS, ExportConfig, load_config_file

    config = ExportConfig()
    if args.config:
        try:
            config = ExportConfig.from_dict(load_config_file(args.config))
        except (ValueError, TypeError) as error:
            raise UsageError(f"--config {args.config}: {error}; fix the value or pass it as a flag") from None
    # A preset sets every quantization field at once, so it goes first and the other flags refine it.
    for option in sorted(OPTIONS, key=lambda o: o.field != "quantization.preset"):
        if hasattr(args, option.field):
            value = getattr(args, option.field)
            try:
                if option.field == "quantization.preset":
                    config = config.replace("quantization", type(config.quantization).from_preset(value))
                else:
                    config = config.replace(option.field, value)
            except ValueError as error:
                raise UsageError(f"{option.flag} {value!r}: {error}") from None
    return config


def _configure_logging(debug: bool, verbose: bool, transformers_too: bool = True) -> None:
    # Root at ERROR: onnxruntime's quantizer logs advice through the root logger ("consider pre-processing").
    root_level = logging.DEBUG if debug else logging.WARNING if verbose else logging.ERROR
    logging.basicConfig(level=root_level, format="%(message)s", stream=sys.stderr)
    for name in ("exporter", "graphs", "calibration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("exporter.pipeline").setLevel(logging.INFO)
    if verbose or debug:
        for name in ("exporter", "graphs", "calibration"):
            logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        if not transformers_too:  # verify: never import transformers (and torch) just to quiet it
            raise ImportError
        import transformers

        transformers.utils.logging.set_verbosity_error()  # "weights not used" chatter about the pooler, etc.
    except ImportError:
        pass


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _never_read_stdin() -> None:
    """The tool reads nothing from stdin: a library's prompt (transformers' "trust this code?") gets end-of-file,
    never the "y" of `yes | export-model ...`."""
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115  (lives as long as the process)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--reference"]:
        sys.stdout.write(reference_markdown())
        return 0
    _never_read_stdin()
    quiet_onnxruntime()  # no telemetry from this process or its children (graphs/core/telemetry.py)
    if argv[:1] == ["export"]:  # the explicit form of the default subcommand
        argv = argv[1:]
    if argv[:1] == ["verify"]:
        from exporter.runtime.cli import verify_main

        return verify_main(argv[1:])
    if argv[:1] == ["run"]:
        from exporter.runtime.cli import run_main

        return run_main(argv[1:])
    if argv[:1] == ["sign"]:
        from exporter.runtime.cli import sign_main

        return sign_main(argv[1:])
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug, args.verbose)
    signal.signal(signal.SIGTERM, _interrupt)
    start = time.perf_counter()
    try:
        key, signature = None, {}
        if args.sign_key:  # a bad key is refused before hours of export, not after
            from exporter.runtime.signing import load_private_key

            key = load_private_key(args.sign_key)
        from exporter.pipeline import export_model

        result = export_model(config_from_args(args))
        if key is not None:
            from exporter.runtime.signing import sign_artifact

            signature = sign_artifact(result.output, key)
    except ExportError as error:
        print(f"export-model: error: {error}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return error.exit_code
    except KeyboardInterrupt:
        print("export-model: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as error:  # the CLI's last line of defence: one line, traceback on request
        print(f"export-model: internal error: {type(error).__name__}: {error} (rerun with --debug for the traceback)",
              file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 1
    passed = [f"{e['file']} {e['status']}" + (f" on {e['provider']} {e['precision']}" if "Execution" not in e["provider"]
                                              else "") for e in result.manifest["parity"] if e["status"] != "skip"]
    print(f"artifact: {result.output}")
    from exporter.runtime.files import sha256_digest

    digest = sha256_digest((result.output / "manifest.json").read_bytes())
    print(f"manifest: sha256:{digest}" + (f" (signed by {signature['key_id']})" if key is not None else ""))
    print(f"parity: {', '.join(passed)}")
    print(f"total wall time: {time.perf_counter() - start:.1f} s")
    return 0


def reference_markdown() -> str:
    """docs/cli.md: every subcommand's flags, generated from the parsers (tests/test_docs.py keeps the file in
    sync; regenerate with `python -m exporter.cli --reference > docs/cli.md`)."""
    from exporter.runtime.cli import run_parser, sign_parser, verify_parser

    lines = ["# Command-line reference", "", "Generated from the parsers by `python -m exporter.cli --reference`; "
             "`tests/test_docs.py` fails when it is out of date.", "", "```", SUBCOMMANDS, "```"]
    for title, parser in (("export-model [export]", build_parser()), ("export-model verify", verify_parser()),
                          ("export-model run", run_parser()), ("export-model sign", sign_parser())):
        lines += ["", f"## {title}", "", (parser.description or "").strip(), "", "| flag | value | meaning |",
                  "| --- | --- | --- |"]
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = ", ".join(action.option_strings) or action.dest
            value = "" if action.nargs == 0 else (
                " \\| ".join(map(str, action.choices)) if action.choices else str(action.metavar or action.dest.upper()))
            meaning = (action.help or "").replace("|", "\\|")
            lines.append(f"| `{flag}` | {value} | {meaning} |")
    return "\n".join(lines) + "\n"


def run() -> None:
    try:  # also at the descriptor level, for code that reads fd 0 directly
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    except OSError:
        pass
    sys.exit(main())


if __name__ == "__main__":
    run()

"""`verify` and `run` execute in a child process under a memory and a wall-clock limit.

An artifact's ONNX graph and tokenizer are the artifact author's code in all but name: a ``ConstantOfShape`` of
gigabytes, a ``Loop`` of 2^62 steps, a tokenizer regex that backtracks for minutes or panics. The CLI therefore
re-runs itself as a child (``python -m exporter.cli verify|run ...`` with ``EXPORT_MODEL_SANDBOXED`` set): the
child caps its own address space (``RLIMIT_AS``) before it opens anything, and arms a timer whose signal kills it
(``SIGALRM`` with its default action, which no native call can block): once for the whole of `verify`, per batch
for `run`. The parent relays the child's output line by line and turns a killed child into one line and exit 3.

Defaults: 8 GiB of address space (``--memory-limit``; BERT-large's FP32 file needs about 4), 900 s for `verify`
and 120 s per batch for `run` (``--time-limit``). Imports only the standard library.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
from typing import IO

ENV = "EXPORT_MODEL_SANDBOXED"
DEFAULT_MEMORY = 8 * 2**30
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "8G", "512M", "1048576" (binary units); argparse type for --memory-limit."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size such as 8G or 512M")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < 10**7:
        raise ValueError(f"{text!r} is not a number of seconds > 0")
    return value


def in_child() -> bool:
    return os.environ.get(ENV) == "1"


def enter_child(memory: int, debug: bool = False) -> None:
    """In the child: cap the address space (and core dumps) before anything from the artifact is opened. Without
    `debug`, native code's writes to descriptor 2 (a Rust panic's message, onnxruntime's own log) go nowhere; the
    tool's Python-level lines still reach stderr through a duplicate of it."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)  # a lower limit inherited from the caller stays
    memory = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if not debug:
        sys.stderr.flush()
        python_stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        sys.stderr = os.fdopen(python_stderr, "w", buffering=1, encoding="utf-8", errors="replace")


def arm(seconds: float) -> None:
    """Kill this process `seconds` from now unless `disarm` (or another `arm`) comes first."""
    signal.setitimer(signal.ITIMER_REAL, seconds)


def disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _relay(source: IO[bytes], target: IO[str]) -> None:
    for raw in iter(source.readline, b""):
        target.write(raw.decode("utf-8", "replace"))
        target.flush()


def run_bounded(subcommand: str, argv: list[str], prog: str, memory: int, seconds: float, what: str,
                debug: bool = False) -> int:
    """Run ``export-model <subcommand> argv`` in a bounded child; its exit code, or 3 with one line if a limit
    killed it. `what` names the timed unit in that line ("verify", "a batch")."""
    env = {**os.environ, ENV: "1", "ORT_DISABLE_TELEMETRY": "1", "RUST_BACKTRACE": "0"}
    child = subprocess.Popen([sys.executable, "-m", "exporter.cli", subcommand, *argv], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    threads = [threading.Thread(target=_relay, args=(child.stdout, sys.stdout), daemon=True),
               threading.Thread(target=_relay, args=(child.stderr, sys.stderr), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        code = child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    for thread in threads:
        thread.join()
    if code >= 0:
        return code
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGALRM:
        print(f"{prog}: error: {what} ran past the {seconds:g} s time limit and was stopped; the artifact's graph "
              "or tokenizer takes too long (raise --time-limit if it is trusted and slow)", file=sys.stderr)
    else:
        print(f"{prog}: error: the artifact's graph or tokenizer crashed the bounded process ({name}) or hit its "
              f"{memory / 2**30:g} GiB memory limit; refuse it (raise --memory-limit if it is trusted and big)",
              file=sys.stderr)
    return 3

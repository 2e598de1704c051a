"""No network from an export of a local checkpoint, nor from `verify` / `run`: onnxruntime telemetry is off in
every process the tool starts (graphs/core/telemetry.py), and nothing else reaches out.

Two guards. Python level: socket.connect / connect_ex / sendto / getaddrinfo replaced to record (and refuse) any
non-loopback attempt, in the test process and, through a sitecustomize on PYTHONPATH, in every child. Native level
(onnxruntime's telemetry runs in C++ threads that Python never sees): strace -f of the whole process tree, every
connect/sendto outside loopback counted, and a check that this strace detector does see a
connect from a thread of a child (the way onnxruntime's telemetry thread reaches out). onnxruntime 1.31 with its
telemetry left on was seen looking up its events host about 9 s after start on the development machine, but not
in CI, so that is not a test here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exporter import latency
from graphs.core import telemetry

REPO = Path(__file__).resolve().parents[2]

# Installed in the test process (install_guard) and, as sitecustomize.py, in every child Python.
GUARD_SOURCE = textwrap.dedent("""
    import os, socket

    _LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost", "", None}

    def _record(what):
        path = os.environ.get("NETWORK_GUARD_LOG")
        if path:
            with open(path, "a", encoding="utf-8") as log:
                log.write(f"{os.getpid()} {what}\\n")
        raise OSError(f"network guard: {what} refused")

    def _check(sock, address, what):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else address
            if host not in _LOOPBACK and not str(host).startswith("127."):
                _record(f"{what} {address!r}")

    def _wrap(name):
        original = getattr(socket.socket, name)
        def guarded(self, *args):
            _check(self, args[-1] if name == "sendto" else args[0], name)
            return original(self, *args)
        setattr(socket.socket, name, guarded)

    for _name in ("connect", "connect_ex", "sendto"):
        _wrap(_name)
    _getaddrinfo = socket.getaddrinfo

    def _guarded_getaddrinfo(host, *args, **kwargs):
        if host not in _LOOPBACK and not str(host).startswith("127."):
            _record(f"getaddrinfo {host!r}")
        return _getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = _guarded_getaddrinfo
    """)


def guard_folder(tmp: Path) -> Path:
    folder = tmp / "guard"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(GUARD_SOURCE, encoding="utf-8")
    return folder


def guarded_env(tmp: Path, log: Path) -> dict[str, str]:
    """An environment whose Python children install the guard; ORT_DISABLE_TELEMETRY deliberately removed, so the
    tool itself must turn telemetry off."""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard_folder(tmp)), str(REPO), env.get("PYTHONPATH")]))
    env["NETWORK_GUARD_LOG"] = str(log)
    env["HF_HUB_OFFLINE"] = "0"  # no help from offline switches: the tool must not try on its own
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


_CONNECT = re.compile(r"\b(connect|sendto)\((\d+), \{sa_family=(AF_INET6?|AF_UNIX), ([^}]*)\}")


def outside_loopback(trace: str) -> list[str]:
    """strace lines of connect/sendto to an address outside loopback; a connect to the nscd socket (a host name
    being looked up) counts too."""
    found = []
    for line in trace.splitlines():
        match = _CONNECT.search(line)
        if not match:
            continue
        family, address = match.group(3), match.group(4)
        if family == "AF_UNIX":
            if "nscd" in address:
                found.append(line.strip())
            continue
        if family == "AF_INET" and 'inet_addr("127.' in address:
            continue
        if family == "AF_INET6" and ('"::1"' in address or "::ffff:127." in address):
            continue
        found.append(line.strip())
    return found


# ----- fast -----


def test_quiet_onnxruntime_sets_the_child_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    telemetry.quiet_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    assert telemetry.child_env({"A": "b"}) == {"A": "b", "ORT_DISABLE_TELEMETRY": "1", "NNCF_CI": "1"}


def test_the_memory_probe_child_gets_telemetry_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def fake_run(argv: list[str], **kwargs: object) -> None:
        seen.update(kwargs["env"])  # type: ignore[arg-type]
        raise subprocess.SubprocessError("not run by the test")

    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    monkeypatch.setattr(latency.subprocess, "run", fake_run)
    if not Path("/proc/self/status").exists():
        pytest.skip("peak_memory_mb measures only on Linux")
    assert latency.peak_memory_mb(tmp_path / "m.onnx", "CPUExecutionProvider", {"x": np.zeros(1)}) is None
    assert seen["ORT_DISABLE_TELEMETRY"] == "1"


def test_the_python_guard_records_an_attempt(tmp_path: Path) -> None:
    """The guard itself works (else the tests below could not fail)."""
    log = tmp_path / "net.log"
    code = "import socket\ntry:\n    socket.create_connection(('example.com', 80), timeout=1)\nexcept OSError:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], env=guarded_env(tmp_path, log), check=True, timeout=60)
    assert "getaddrinfo 'example.com'" in log.read_text()


# ----- an export, verify and run of a local checkpoint -----


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoints import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("net") / "ck", "bert", "feature-extraction").path


def _cli(env: dict[str, str], *argv: str, strace: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "exporter.cli", *argv]
    if strace is not None:
        command = ["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(strace), *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)


@pytest.mark.slow
def test_export_verify_and_run_under_the_python_guard(checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process export (the guard installed in this process) and `verify`/`run` children (sitecustomize)."""
    import socket

    from exporter.cli import main

    log = tmp_path / "net.log"
    env = guarded_env(tmp_path, log)
    for key in ("PYTHONPATH", "NETWORK_GUARD_LOG", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY", raising=False)
    namespace: dict[str, object] = {}
    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, getattr(socket.socket, name))  # restored after the test
    monkeypatch.setattr(socket, "getaddrinfo", socket.getaddrinfo)
    exec(compile(GUARD_SOURCE, "network_guard", "exec"), namespace)
    out = tmp_path / "art"
    assert main(["--model", str(checkpoint), "--output", str(out), "--calibration-samples", "16"]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a local run"}\n')
    assert _cli(env, "verify", str(out)).returncode == 0
    done = _cli(env, "run", str(out), "--input", str(rows))
    assert done.returncode == 0 and '"embedding"' in done.stdout, done.stderr
    assert not log.exists() or log.read_text() == "", log.read_text()


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True).returncode == 0


needs_strace = pytest.mark.skipif(not _strace_works(), reason="strace is not installed or not permitted here "
                                  "(apt-get install strace; ptrace must be allowed): native connections unchecked")


@pytest.mark.slow
@needs_strace
def test_no_process_of_an_offline_export_connects_outside_loopback(checkpoint: Path, tmp_path: Path) -> None:
    """strace -f over export (with its memory-probe children), verify and run: no connect/sendto outside
    loopback, no name look-up, from Python or native code (onnxruntime's telemetry threads)."""
    log = tmp_path / "net.log"
    env = guarded_env(tmp_path, log)
    out = tmp_path / "art"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a local run"}\n')
    traces = []
    for step, argv in enumerate((["--model", str(checkpoint), "--output", str(out), "--calibration-samples", "16"],
                                 ["verify", str(out)], ["run", str(out), "--input", str(rows)])):
        trace = tmp_path / f"strace-{step}.txt"
        done = _cli(env, *argv, strace=trace)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        traces.append(trace.read_text())
    attempts = [line for trace in traces for line in outside_loopback(trace)]
    assert attempts == [], attempts[:10]
    assert not log.exists() or log.read_text() == "", log.read_text()


def _strace(trace: Path, code: str, env: dict[str, str] | None = None) -> str:
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace), sys.executable, "-c",
                    code], env=env, check=True, timeout=120)
    return trace.read_text()


@needs_strace
def test_the_strace_detector_sees_a_connect_from_a_thread(tmp_path: Path) -> None:
    """The counter-check that always holds: a connect made from a second thread of a child (as onnxruntime's
    telemetry thread would make it) is seen, and a loopback one is not counted, so the test above can fail. A UDP
    connect sends no packet, so this works on a machine without a network too."""
    code = textwrap.dedent("""
        import socket, threading
        def reach(host):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 53))
        for host in ("127.0.0.1", "198.51.100.7"):
            t = threading.Thread(target=reach, args=(host,)); t.start(); t.join()
        """)
    found = outside_loopback(_strace(tmp_path / "strace.txt", code))
    assert len(found) == 1 and "198.51.100.7" in found[0], found

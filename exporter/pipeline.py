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
import errno
import fcntl
import gc
import json
import logging
import os
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from calibration.corpus import builtin_texts, split_texts
from calibration.data import ChainedReader, TextCalibrationReader, joined_texts, load_texts, sample_texts
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
from exporter.manifest import TOOL, checkpoint_hash, write_manifest
from exporter.onnx_export import export_onnx
from exporter.reference import build_batches, reference_outputs
from exporter.runtime.files import Limits
from exporter.runtime.outputs import output_names
from exporter.runtime.parity import (
    PROVIDERS,
    ParityConfig,
    ParityEntry,
    check_file,
    failure_table,
    resolve_providers,
)
from exporter.text import make_tokenize
from graphs.core.errors import (
    CalibrationDataError,
    CheckpointError,
    ExportError,
    OutputError,
    ParityError,
    UsageError,
    first_line,
    from_onnxruntime,
)
from graphs.core.progress import bar
from graphs.float16 import to_float16
from graphs.fusion import GraphPlan, fuse_graph

log = logging.getLogger(__name__)

MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE = "model.onnx", "model_optimized.onnx", "model_quantized.onnx"
MODEL_FILES = (MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE)
FP16_FILE = "model_fp16.onnx"
FP16_MODES = ("auto", "always", "never")
LATENCY_BATCHES = (1, 2, 4, 8)
LONG_CALIBRATION_TEXTS = 16
"""Calibration rows of ``--max-length`` tokens (consecutive calibration texts joined), beside the texts at 128
tokens: positions past 128 reach activation ranges (position embeddings, longer attention) that short texts never
show."""
STAGES = 8
# errno values that mean "the output's filesystem cannot take more": the user can free space or move --output.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WORK_MARKER = ".export-model-work"  # written into every work folder at creation: what proves a folder is ours
MANIFEST_LIMIT = 16 << 20  # a manifest.json larger than this is not one export-model wrote
_LISTED_ENTRIES = 6  # names shown when a refusal says what a folder holds
_WALK_LIMIT = 10_000  # entries examined when deciding whether a folder is an artifact


@dataclass
class ExportResult:
    output: Path
    manifest: dict[str, Any]
    deployable: bool
    seconds: float


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere only
    the collection). Between stages, what one stage freed (a traced graph, an optimizer's model copies) otherwise
    stays resident and every later stage's peak sits on top of it."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    """Reset this process's peak-RSS mark (``VmHWM``) to its current RSS (Linux ``clear_refs`` 5; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory since the last :func:`_reset_peak_rss`, in MB (None off Linux)."""
    from exporter.memory_probe import status_bytes

    try:
        return round(status_bytes("VmHWM") / 2**20, 1)
    except (OSError, ValueError):
        return None


class _Stages:
    """Prints "[i/N] stage: detail (s)" per stage and keeps the timings for the manifest."""

    def __init__(self, total: int = STAGES) -> None:
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        """Per stage, the process's peak resident memory during it (Linux: the peak mark is reset at each
        stage's start, so a stage's figure is its own peak, not an earlier stage's)."""
        self.total = total
        self._index = 0
        self.current = "setup"

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        self._index += 1
        self.current = name
        note: dict[str, str] = {"detail": ""}
        release_memory()
        _reset_peak_rss()
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
        peak = _peak_rss_mb()
        if peak is not None:
            self.peak_rss_mb[name] = peak
        log.info("[%d/%d] %-9s %s (%.1f s)", self._index, self.total, name, note["detail"], self.timings[name])


def resolve_output(config: ExportConfig, source: Path) -> Path:
    """The output folder with every symlink resolved, after refusing every location --output must never be."""
    default_name = "all-MiniLM-L6-v2" if config.model is None else source.name
    given = Path(config.output) if config.output else Path("artifacts") / default_name
    output = Path(os.path.abspath(given.expanduser()))  # ".." folded, so the folder's name is its real name
    if output.is_symlink():
        raise OutputError(
            f"--output {output} is a symbolic link (to {os.readlink(output)}); export-model neither writes through "
            "nor replaces a link: pass the real folder path, or a new folder"
        )
    real = output.resolve()
    shown = str(output) if real == output else f"{output} (that is {real})"
    _refuse_protected(real, shown, source.resolve())
    if real.exists() and not real.is_dir():
        raise OutputError(f"--output {shown} is a file; pass a folder path")
    check_replaceable(real, config.force, shown)
    parent = real.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create {parent} ({error.strerror}); choose a writable --output") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent} is not writable; choose a writable --output")
    return real


def _refuse_protected(real: Path, shown: str, source: Path) -> None:
    """Refuse an output that is the root, the checkpoint (or holds it, or is inside it), the working directory,
    the home folder, or a parent of either: --force or not, these are never replaced."""
    if real == Path(real.anchor):
        raise OutputError(f"--output {shown} is the filesystem root; choose a new folder for the artifact")
    if real == source or real in source.parents:
        # --force would move the checkpoint aside and delete it with the work folder.
        raise OutputError(f"--output {shown} holds the checkpoint being exported ({source}); choose a folder outside it")
    if source in real.parents:
        raise OutputError(f"--output {shown} is inside the checkpoint being exported ({source}); choose a folder "
                          "outside it")
    for what, where in (("the working directory", Path.cwd), ("the home folder", Path.home)):
        try:
            place = where().resolve()
        except (OSError, RuntimeError):  # a deleted working directory, no HOME and no passwd entry
            continue
        if real == place or real in place.parents:
            which = what if real == place else f"a parent of {what} ({place})"
            raise OutputError(f"--output {shown} is {which}; export-model never replaces it, even with --force: "
                              f"pass a new folder, e.g. {place / 'artifacts' / source.name}")


def _listing(folder: Path) -> str:
    """What `folder` holds, for a refusal: a count and the first few names."""
    names: list[str] = []
    count = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            count += 1
            if len(names) < 1000:
                names.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    shown = ", ".join(sorted(names)[:_LISTED_ENTRIES])
    return f"{count} entries: {shown}" + (f", ... ({count - _LISTED_ENTRIES} more)" if count > _LISTED_ENTRIES else "")


def not_an_artifact(folder: Path) -> str | None:
    """Why `folder` is not an earlier export-model artifact that --force may replace, or None when it is one.

    An artifact has a regular manifest.json (at most MANIFEST_LIMIT bytes) whose "tool" names export-model and
    which has a "schema_version", and holds nothing else than the files that manifest lists (no symlink, no
    extra file or folder), so replacing it deletes only what export-model wrote.
    """
    manifest = folder / "manifest.json"
    try:
        info = os.lstat(manifest)
    except FileNotFoundError:
        return f"is not an export-model artifact (it has no manifest.json; it holds {_listing(folder)})"
    except OSError as error:
        return f"is not an export-model artifact (its manifest.json cannot be read: {error.strerror})"
    if not stat.S_ISREG(info.st_mode) or info.st_size > MANIFEST_LIMIT:
        return (f"is not an export-model artifact (its manifest.json is not a regular file of at most "
                f"{MANIFEST_LIMIT >> 20} MiB; it holds {_listing(folder)})")
    try:
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"is not an export-model artifact (its manifest.json is not valid JSON; it holds {_listing(folder)})"
    tool = data.get("tool") if isinstance(data, dict) else None
    if not (isinstance(tool, dict) and tool.get("name") == TOOL and "schema_version" in data):
        return (f"is not an export-model artifact (its manifest.json does not name {TOOL} as its tool; it holds "
                f"{_listing(folder)})")
    files = data.get("files")
    listed = {str(name) for name in files} if isinstance(files, dict) else set()
    listed_dirs = {str(parent) for name in listed for parent in Path(name).parents if str(parent) != "."}
    extra: list[str] = []
    seen = 0

    def unreadable(error: OSError) -> None:
        extra.append(f"{error.filename} (unreadable)")

    for root, dirs, names in os.walk(folder, onerror=unreadable):
        here = Path(root).relative_to(folder)
        for name in sorted(dirs + names):
            seen += 1
            relative = str(here / name) if str(here) != "." else name
            path = Path(root) / name
            if relative in ("manifest.json", "manifest.sig"):  # the signature signs the manifest, unlisted in it
                continue
            if path.is_symlink():
                extra.append(relative + " (a symbolic link)")
            elif name in dirs and relative not in listed_dirs:
                extra.append(relative + "/")
            elif name in names and (relative not in listed or not path.is_file()):
                extra.append(relative)
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]
        if seen > _WALK_LIMIT:
            extra.append(f"more than {_WALK_LIMIT:,} entries")
            break
    if extra:
        more = f", ... ({len(extra) - _LISTED_ENTRIES} more)" if len(extra) > _LISTED_ENTRIES else ""
        return (f"holds {len(extra)} entries its export-model manifest.json does not list "
                f"({', '.join(extra[:_LISTED_ENTRIES])}{more}), so it is not only an earlier artifact")
    return None


def check_replaceable(output: Path, force: bool, shown: str | None = None) -> None:
    """Refuse a non-empty `output` unless `force` and it is an earlier export-model artifact."""
    if not output.is_dir() or output.is_symlink():
        return
    with os.scandir(output) as entries:
        empty = next(entries, None) is None
    if empty:
        return
    shown = shown or str(output)
    if not force:
        raise OutputError(f"--output {shown} exists and is not empty; pass --force to replace it or choose another folder")
    problem = not_an_artifact(output)
    if problem:
        raise OutputError(f"--output {shown} {problem}; --force replaces only an earlier export-model artifact: "
                          "choose another folder, or empty this one yourself")


def _lock_holder(fd: int) -> str:
    """Who holds the lock whose file is open as `fd`, from what it wrote there (it may still be writing)."""
    for _ in range(20):
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
            return f"pid {int(holder['pid'])} on {holder['host']}, started {started}"
        except (ValueError, KeyError, TypeError, OSError):
            time.sleep(0.05)
    return "pid unknown"


@contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Hold an exclusive flock on `.NAME.lock` beside `output` for the run; refuse when another run holds it.

    The file names the holder (pid, host, start) and is removed at the end; one left by a killed run holds no
    lock (the kernel drops a dead process's flock) and is taken over.
    """
    lock = output.parent / f".{output.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise OutputError(f"cannot open the lock file {lock} ({error.strerror}); remove it if it is not a "
                              "regular file, or choose another --output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"--output {output} is being written by another export-model run ({holder}; lock "
                              f"{lock}); wait for it to end, or choose another --output") from None
        try:  # the holder may have removed the file between our open and flock: then lock the new one
            current = os.stat(lock, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.time(), "output": str(output)}).encode("utf-8"), 0)
        yield lock
    finally:
        with suppress(OSError):
            os.unlink(lock)  # while still holding it, so no other run has it in between
        os.close(fd)


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _work_owner(folder: Path, output: Path) -> dict[str, Any] | None:
    """The marker of an export-model work folder for `output`, or None when `folder` cannot be proven one."""
    try:
        info = os.lstat(folder / WORK_MARKER)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        marker = json.loads((folder / WORK_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(marker, dict) and marker.get("tool") == TOOL and marker.get("output") == str(output)
            and isinstance(marker.get("pid"), int) and isinstance(marker.get("created"), (int, float))):
        return None
    return marker


def _still_running(marker: dict[str, Any]) -> bool:
    """Whether the run that wrote `marker` may still be running (True whenever that cannot be ruled out)."""
    if marker.get("host") != socket.gethostname():
        return True  # another machine sharing the folder: its pids mean nothing here
    pid = marker["pid"]
    if pid == os.getpid():
        return False  # this process holds the output's lock and is not inside a run to it yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    started = _process_start(pid)
    # The pid is alive; it is another process (the pid was reused) only if that process started after the marker.
    return started is None or started <= float(marker["created"]) + 1.0


def sweep_stale(output: Path) -> list[str]:
    """Remove `.NAME.partial-*` folders beside `output` left by killed runs; returns their names.

    Only folders whose marker names export-model and this output, and whose run is no longer running, are
    removed; call it holding the output's lock (so no live run to this output can own one).
    """
    prefix = f".{output.name}.partial-"
    swept: list[str] = []
    with os.scandir(output.parent) as entries:
        candidates = [Path(e.path) for e in entries if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    for folder in sorted(candidates):
        marker = _work_owner(folder, output)
        if marker is None or _still_running(marker):
            continue
        _remove_uninterrupted(folder)
        if not folder.exists():
            swept.append(folder.name)
    if swept:
        log.info("removed %d work folder(s) left beside %s by killed runs: %s", len(swept), output.name,
                 ", ".join(swept))
    return swept


@contextmanager
def _scratch(folder: Path) -> Iterator[None]:
    """Point tempfile's default folder (and TMPDIR, for child processes) at `folder` while the block runs."""
    previous_dir, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(folder), str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous_dir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env


@contextmanager
def work_folder(output: Path) -> Iterator[Path]:
    """A hidden sibling of `output` (same filesystem, so the final rename is atomic), always removed.

    It holds the marker that proves it export-model's (see sweep_stale) and, in `tmp/`, every temporary file
    of the run.
    """
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as error:
        raise OutputError(
            f"cannot create a work folder in {output.parent} ({error.strerror}); choose a writable --output"
        ) from None
    try:
        (work / WORK_MARKER).write_text(json.dumps({
            "tool": TOOL, "pid": os.getpid(), "host": socket.gethostname(), "created": time.time(),
            "output": str(output)}), encoding="utf-8")
        scratch = work / "tmp"
        scratch.mkdir()
        with _scratch(scratch):
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
    """Rename `built` to `output`; a replaced artifact (--force) comes back if that rename fails.

    The caller checks, just before, that a non-empty `output` may be replaced (check_replaceable); a symbolic
    link at `output` is refused here (never replaced, never followed).
    """
    if output.is_symlink():
        raise OutputError(f"--output {output} became a symbolic link during the run; it was not replaced: pass a "
                          "real folder path")
    previous = None
    if output.exists():
        if any(output.iterdir()):
            previous = work / "previous"
            os.rename(output, previous)  # --force was checked in resolve_output and again just before this
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
        stages = _Stages(STAGES + (config.eval_data is not None))
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
        if evalset is None:
            reference = checkpoint.model = None
        with stages.stage("quantize") as note:
            calibration_tokenize = make_tokenize(checkpoint.tokenizer, arch.input_names, working_length, pairs=pairs)
            reader: Any = TextCalibrationReader(samples, calibration_tokenize, config.quantization.batch_size)
            calibration_rows = [{"texts": len(samples), "tokens": working_length}]
            # Rows that span the positions up to the longest length served (not for the histogram methods, whose
            # chunked calibration needs one reader's set_range).
            if max_length > working_length and config.quantization.method not in ("entropy", "percentile"):
                joined = joined_texts(samples, max_length)[:LONG_CALIBRATION_TEXTS]
                reader = ChainedReader([reader, TextCalibrationReader(joined, tokenize, 2)])  # tokenize: max_length
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
            if config.quantization.tune:
                timing = latency_feeds(calibration_tokenize, search_texts, [(1, working_length), (8, working_length)])
                quantization, tuning = tune_quantization(
                    {"fused": built / OPTIMIZED_FILE, "unfused": built / MODEL_FILE}, built / QUANTIZED_FILE, reader,
                    config.quantization, timing, sample_sha256=sample_hash, validation=validation, metric=metric)
            else:
                source_graph = OPTIMIZED_FILE if config.quantization.uses_fused_graph else MODEL_FILE
                quantization = quantize_model(built / source_graph, built / QUANTIZED_FILE, reader,
                                              config.quantization, sample_sha256=sample_hash, validation=validation,
                                              metric=metric)
            note["detail"] = f"{QUANTIZED_FILE}, {quantization.quantized_nodes} nodes INT8, {len(samples)} texts"
            if tuning:
                note["detail"] += f", tuned: {quantization.preset} fastest of {len(tuning)} presets"
        with stages.stage("parity") as note:
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
                if reference is None:  # released before quantizing: the same load again
                    reference = load_checkpoint(source, config.task).model
                    if drops:
                        mask_heads(reference, arch, hf_config, drops)
                localize_failures(failed, built, reference, arch, batches[-1], config.parity)
            note["detail"] = ", ".join(f"{e.file} {e.status}" for e in entries if e.status != "skip")
        with stages.stage("latency") as note:
            latency = measure_files(built, tokenize, report_pool[:40], working_length, config.parity.providers,
                                    [name for name, _ in checked], full=config.latency == "full",
                                    max_length=max_length)
            cpu = latency.get("CPUExecutionProvider", {}).get("files", {})
            note["detail"] = ", ".join(f"{n} {v[f'b8xs{working_length}']['median_ms']:.0f} ms@b8"
                                       for n, v in cpu.items())
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
                "compaction": compaction.to_dict(),
                "fusion": fusion.to_dict() | {"summary": fusion.summary()},
                "quantization": quantization.to_dict() | {"calibration_rows": calibration_rows}
                | ({"tuning": tuning} if tuning else {}),
                "fp16": fp16,
                "parity": [e.to_dict() for e in entries],
                "parity_data": {"inputs": "parity/inputs.npz", "reference": "parity/reference.npz",
                                "shapes": [list(b["attention_mask"].shape) for b in batches]},
                "max_length": max_length,
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
    full: bool = False, max_length: int | None = None,
) -> dict[str, Any]:
    """Per provider: latency percentiles of each file at batch 1 and 8 (``full``: 1, 2, 4, 8) of ``length``
    tokens and at batch 1 of ``max_length`` (when longer), with all threads, and its peak memory at batch 8 in a
    fresh process; ``full`` adds, on CPU, one thread per session at batch 1 and 8 (the thread-settings grid) and
    the best throughput mode."""
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

"""The output folder, handled safely: where an artifact may go, replacing only an earlier artifact, one run per
output (a lock), killed runs' work folders swept, building in a hidden sibling and moving into place at the end.

Nothing here knows about models: the pipeline asks for a work folder, builds in it, and moves it into place.
"""

from __future__ import annotations

import errno
import fcntl
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.manifest import TOOL
from graphs.core.errors import OutputError

if TYPE_CHECKING:
    from exporter.config import ExportConfig

log = logging.getLogger("exporter.pipeline")  # what it removes is said on the console, with the stage lines

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
WORK_MARKER = ".export-model-work"  # written into every work folder at creation: what proves a folder is ours
MANIFEST_LIMIT = 16 << 20  # a manifest.json larger than this is not one export-model wrote
_LISTED_ENTRIES = 6  # names shown when a refusal says what a folder holds
_WALK_LIMIT = 10_000  # entries examined when deciding whether a folder is an artifact


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


def disk_full(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error` (libraries wrap it), or None."""
    seen = 0
    cause: BaseException | None = error
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None

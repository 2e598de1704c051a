"""Opening files inside an artifact folder someone else could have written: names, containment, caps, JSON.

Every name is a plain relative name (no ``..``, no absolute path, no backslash or control character), opened
component by component under the folder's descriptor with ``O_NOFOLLOW`` (a symbolic link anywhere on the way is
refused) and ``O_NONBLOCK`` (a FIFO cannot hang it), and refused unless ``fstat`` says it is a regular file; its size
is checked against a cap before a byte is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from exporter.runtime.outputs import TASKS  # noqa: F401  (the manifest's task must be one of them)
from graphs.core.errors import UsageError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # written by `export-model sign`; not listed in the manifest it signs
SCHEMA_VERSION = 1
MODEL_FILE, OPTIMIZED_FILE, QUANTIZED_FILE = "model.onnx", "model_optimized.onnx", "model_quantized.onnx"
# The parity bars export accepts (exporter.runtime.parity.ParityConfig enforces the same ones), so a manifest outside
# them was not written by export-model.
FP32_ATOL_MAX = 1e-2
MIN_COSINE_FLOOR = 0.9
_MiB = 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")



@dataclass(frozen=True)
class Limits:
    """Caps on what the deployment side reads from an artifact, checked before reading."""

    manifest_bytes: int = 16 * _MiB
    json_bytes: int = 4 * _MiB  # config.json, tokenizer_config.json, sentence-transformers files
    tokenizer_bytes: int = 32 * _MiB  # XLM-R's 250k-token tokenizer.json is 17 MB
    model_bytes: int = 8 * 2**30
    npz_bytes: int = 256 * _MiB  # compressed, on disk
    npz_unpacked_bytes: int = 512 * _MiB  # all members of one npz, as declared by their zip headers
    npz_members: int = 1024
    parity_batches: int = 64
    batch_rows: int = 64
    batch_tokens: int = 8192
    manifest_files: int = 512  # entries of the manifest's file table
    folder_entries: int = 4096  # entries walked to find files the manifest does not list
    depth: int = 8  # folder levels in a file name

    def cap(self, name: str) -> int:
        """The size cap of file `name` by its kind."""
        if name == "tokenizer.json":
            return self.tokenizer_bytes
        if name.endswith(".json"):
            return self.json_bytes
        if name.endswith(".npz"):
            return self.npz_bytes
        return self.model_bytes


def check_name(name: object, where: str = "manifest.json") -> str:
    """`name` if it is a plain relative file name inside the folder (parts of letters, digits, ``_ . + -``, not
    starting with a dot, at most 8 levels); a UsageError otherwise."""
    if not isinstance(name, str) or not 0 < len(name) <= 512:
        raise UsageError(f"{where}: file name {str(name)[:80]!r} is not a string of 1-512 characters; re-export")
    parts = name.split("/")
    if len(parts) > Limits.depth or not all(_NAME_PART.fullmatch(part) for part in parts):
        raise UsageError(f"{where}: file name {name[:120]!r} is not a plain relative name inside the folder "
                         "(absolute, '..', a hidden or odd character); the artifact was not written by export-model")
    return name


def sha256_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, where: str, error: type[UsageError] = UsageError) -> Any:
    """JSON from `data`, strict (no NaN or Infinity); nesting too deep, an integer of thousands of digits or bad
    UTF-8 is `error` with one line, never a traceback."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"{where}: JSON nested too deep to read") from None
    except (ValueError, UnicodeDecodeError) as problem:  # JSONDecodeError, int digit limit, NaN, bad UTF-8
        raise error(f"{where}: not valid JSON ({str(problem)[:160]})") from None


def open_contained(root_fd: int, name: str) -> int:
    """A read-only descriptor of regular file `name` under the directory `root_fd`, walked one component at a
    time without following a link; a UsageError naming the component otherwise."""
    parts = name.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    directory = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=directory)
            except OSError as error:
                raise UsageError(f"{name}: {part!r} is not a folder inside the artifact ({error.strerror})") from None
            os.close(directory)
            directory = inner
        try:
            mode = os.stat(parts[-1], dir_fd=directory, follow_symlinks=False).st_mode
        except FileNotFoundError:
            raise UsageError(f"{name}: missing") from None
        if not stat.S_ISREG(mode):
            raise UsageError(f"{name}: {kind(mode)}, not a regular file; restore the file export-model wrote")
        try:
            fd = os.open(parts[-1], flags | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=directory)
        except OSError as error:
            raise UsageError(f"{name}: cannot be opened ({error.strerror})") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
        what = kind(os.fstat(fd).st_mode)
        os.close(fd)
        raise UsageError(f"{name}: {what}, not a regular file")
    return fd


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_fd(fd: int, size: int) -> bytes:
    """Exactly `size` bytes of `fd` (one more byte means the file grew while read: refused)."""
    chunks, left = [], size
    while left > 0:
        chunk = os.read(fd, min(left, 16 * _MiB))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    if left or os.read(fd, 1):
        raise UsageError("the file changed size while it was read")
    return b"".join(chunks)


def read_capped(root_fd: int, name: str, cap: int) -> bytes:
    fd = open_contained(root_fd, name)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise UsageError(f"{name} is {size:,} bytes, over the {cap:,}-byte cap for this kind of file")
        try:
            return read_fd(fd, size)
        except UsageError as error:
            raise UsageError(f"{name}: {error}") from None
    finally:
        os.close(fd)

"""Reading an artifact folder that someone else could have written: the deployment side's one way in.

`verify` and `run` read an artifact only through :class:`Artifact`. What it guarantees:

- **Containment.** Every name it opens is a plain relative name from the manifest (no ``..``, no absolute path,
  no backslash or control character), opened component by component under the folder's descriptor with
  ``O_NOFOLLOW`` (a symbolic link anywhere on the way is refused) and ``O_NONBLOCK`` (a FIFO cannot hang it), and
  refused unless ``fstat`` says it is a regular file. Nothing outside the folder is opened.
- **Bytes once.** A file is read once, hashed, compared with the manifest, and those same bytes are what the
  caller uses (the ONNX session is built from them), so a file swapped after the check is never served.
- **Everything listed.** Every file read must be listed in the manifest with its size and sha256;
  :meth:`Artifact.unlisted` names what the folder holds beyond the manifest.
- **Bounds** (:class:`Limits`): the manifest, JSON files, tokenizer, models and parity npz files have size caps
  checked on ``fstat`` before a byte is read; npz members are checked on their declared uncompressed size, dtype
  and shape before they are decompressed; the number of parity batches and their shapes are capped.
- **A trust anchor outside the folder** (:class:`Trust`): an Ed25519 or ECDSA signature of the manifest's exact
  bytes checked against public keys the caller names, or a pinned sha256 of the manifest. The manifest lists the
  sha256 of every other file, so either one covers the whole folder. Without them, `verify` proves only that the
  folder agrees with itself.

What it does not bound: the compute of the ONNX graph and tokenizer the artifact holds. The CLI runs `verify` and
`run` in a child process under a memory and time limit for that (exporter/runtime/sandbox.py); a Python caller of
:class:`Artifact` or :class:`exporter.runtime.Runtime` gets the containment, hashing and size bounds only.

Imports only the standard library, numpy and graphs.core.errors (``cryptography`` when a signature is checked).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporter.runtime.files import (
    _HEX64,
    FP32_ATOL_MAX,
    MANIFEST,
    MIN_COSINE_FLOOR,
    SCHEMA_VERSION,
    SIGNATURE,
    TASKS,
    Limits,
    _MiB,
    check_name,
    kind,
    open_contained,
    parse_json,
    read_capped,
    sha256_digest,
)
from exporter.runtime.npz import load_npz_batches
from exporter.runtime.trust import Trust, anchor, check_digest_form, load_public_keys
from graphs.core.errors import ParityError, UsageError

__all__ = ["MANIFEST", "SIGNATURE", "TASKS", "Artifact", "Limits", "Trust", "parse_json", "sha256_digest",
           "validate_manifest"]


class FileMismatch(ParityError):
    """A listed file that is not what the manifest says; `line` is the "name: why" that `verify` reports."""

    def __init__(self, line: str, message: str) -> None:
        super().__init__(message)
        self.line = line


@dataclass
class Artifact:
    """An artifact folder opened for the deployment side; see the module docstring. Use :meth:`open`."""

    folder: Path
    root_fd: int
    manifest: dict[str, Any]
    manifest_bytes: bytes  # the exact bytes parsed (and signed)
    manifest_sha256: str
    trust: str  # what anchors it: "signature ...", "digest ...", or "none ..."
    limits: Limits = field(default_factory=Limits)

    # ----- opening and trust -----

    @classmethod
    def open(cls, folder: str | Path, trust: Trust | None = None, limits: Limits | None = None) -> Artifact:
        """Open `folder`, read manifest.json once (capped), check it against `trust`, then its schema."""
        folder, trust, limits = Path(folder), trust or Trust(), limits or Limits()
        keys = load_public_keys(trust.public_keys, folder)
        digest = check_digest_form(trust.digest)
        if trust.require_signature and not keys:
            raise UsageError("--require-signature needs --public-key FILE (the key the builder signed with; it "
                             "must not come from the folder being checked)")
        try:
            root_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise UsageError(f"{folder} is not a folder; pass an artifact folder written by export-model") from None
        try:
            try:
                data = read_capped(root_fd, MANIFEST, limits.manifest_bytes)
            except UsageError as error:
                problem = "has no manifest.json" if str(error).endswith("missing") else f": {error}"
                raise UsageError(f"{folder} {problem}; pass an artifact folder written by export-model") from None
            manifest_sha = sha256_digest(data)
            anchored = anchor(root_fd, folder, data, manifest_sha, keys, digest, trust.require_signature, limits)
            manifest = parse_json(data, str(folder / MANIFEST))
            validate_manifest(manifest, str(folder / MANIFEST), limits)
        except BaseException:
            os.close(root_fd)
            raise
        return cls(folder, root_fd, manifest, data, manifest_sha, anchored, limits)

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- reading files -----

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> bytes:
        """The bytes of listed file `name`, opened contained, checked against the manifest's size and sha256
        (FileMismatch, exit 3, when they differ; UsageError for a name the manifest does not list)."""
        if name not in self.files:
            raise UsageError(f"{self.folder}: {name} is not listed in manifest.json; re-export the artifact")
        failure, data = self._check(name, keep=True)
        if failure is not None:
            raise FileMismatch(failure, f"{self.folder}: {failure}; run export-model verify {self.folder}")
        assert data is not None
        return data

    def read_json(self, name: str) -> Any:
        """Listed JSON file `name`, checked; malformed content is exit 3 (it is what the manifest vouches for)."""
        return parse_json(self.read(name), str(self.folder / name), ParityError)

    def check_all(self, skip: Iterable[str] = ()) -> list[str]:
        """"name: why" for each listed file (but `skip`, which the caller reads, and so checks, itself) that is
        missing, not a plain file inside the folder, or differs from the manifest (streamed: nothing is kept)."""
        skipped = set(skip)
        return [failure for name in self.files if name not in skipped
                if (failure := self._check(name, keep=False)[0]) is not None]

    def _check(self, name: str, keep: bool) -> tuple[str | None, bytes | None]:
        """("name: why", None) if listed file `name` is over its cap, not a plain file inside the folder, or not
        the size and sha256 the manifest says; else (None, its bytes if `keep`). One read: the bytes returned are
        the bytes hashed."""
        expected = self.files[name]
        cap = self.limits.cap(name)
        if expected["bytes"] > cap:
            return (f"{name}: the manifest says {expected['bytes']:,} bytes, over the {cap:,}-byte cap for this kind "
                    "of file"), None
        try:
            fd = open_contained(self.root_fd, name)
        except UsageError as error:
            return str(error), None
        try:
            size = os.fstat(fd).st_size
            if size != expected["bytes"]:
                return (f"{name}: sha256 differs from the manifest (file changed since export: {size:,} bytes, the "
                        f"manifest says {expected['bytes']:,})"), None
            digest, chunks, left = hashlib.sha256(), [], size
            while left > 0 and (chunk := os.read(fd, min(left, 16 * _MiB))):
                digest.update(chunk)
                if keep:
                    chunks.append(chunk)
                left -= len(chunk)
            if left or os.read(fd, 1) or digest.hexdigest() != expected["sha256"]:
                return f"{name}: sha256 differs from the manifest (file changed since export)", None
        finally:
            os.close(fd)
        return None, b"".join(chunks) if keep else None

    def unlisted(self) -> list[str]:
        """Entries of the folder the manifest does not list (besides manifest.json and manifest.sig): files,
        links, FIFOs, devices; folders only where they hold none of the listed files."""
        listed = set(self.files) | {MANIFEST, SIGNATURE}
        prefixes = {name.rsplit("/", 1)[0] for name in self.files if "/" in name}
        prefixes |= {p.rsplit("/", i)[0] for p in list(prefixes) for i in range(1, p.count("/") + 1)}
        found, count = [], 0
        for relative, mode in self._walk(self.root_fd, ""):
            count += 1
            if count > self.limits.folder_entries:
                found.append(f"more than {self.limits.folder_entries} entries (not all checked)")
                break
            if stat.S_ISDIR(mode):
                if relative not in prefixes:
                    found.append(f"{relative}/ (a folder)")
            elif relative not in listed or not stat.S_ISREG(mode):
                found.append(relative if stat.S_ISREG(mode) else f"{relative} ({kind(mode)})")
        return found

    def _walk(self, fd: int, prefix: str) -> Iterator[tuple[str, int]]:
        for entry in sorted(os.listdir(fd)):
            relative = f"{prefix}{entry}"
            try:
                mode = os.stat(entry, dir_fd=fd, follow_symlinks=False).st_mode
            except OSError:
                continue
            yield relative, mode
            if stat.S_ISDIR(mode) and any(name.startswith(relative + "/") for name in self.files):
                inner = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    yield from self._walk(inner, relative + "/")
                finally:
                    os.close(inner)

    @contextlib.contextmanager
    def model_source(self, name: str) -> Iterator[bytes | Path]:
        """What an onnxruntime session is built from for model file `name`: its checked bytes; for a model whose
        weights live in a listed ``<name>.data`` file (export writes one past 2 GB), a private copy (mode 0700
        folder) of both checked files, removed when the block ends. Either way the session never opens the
        artifact's files by name."""
        data_name = f"{name}.data"
        if data_name not in self.files:
            yield self.read(name)
            return
        with tempfile.TemporaryDirectory(prefix="export-model-") as private:
            for part in (name, data_name):
                fd = os.open(Path(private) / part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(self.read(part))
            yield Path(private) / name

    def batches(self, name: str) -> list[dict[str, np.ndarray]]:
        """Parity batches of listed npz `name` ("<index>/<array>" members), bounded; see :class:`Limits`."""
        return load_npz_batches(self.read(name), str(self.folder / name), self.limits)


def validate_manifest(manifest: Any, where: str, limits: Limits | None = None) -> None:
    """Refuse (UsageError, exit 2) a manifest export-model would not have written: wrong types, names that leave
    the folder, empty file or parity tables, a model without parity rows, or parity bars outside export's."""
    limits = limits or Limits()

    def bad(what: str) -> UsageError:
        return UsageError(f"{where}: {what}; the artifact was not written by this export-model: re-export it")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    for key in ("files", "parity", "parity_data", "options", "task"):
        if key not in manifest:
            raise bad(f"lacks {key!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise bad(f"schema_version {str(manifest.get('schema_version'))[:20]!r} is not {SCHEMA_VERSION}")
    if manifest["task"] not in TASKS:
        raise bad(f"task {str(manifest['task'])[:40]!r} is not one of {list(TASKS)}")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise bad("'files' is not a non-empty table of file name -> {sha256, bytes}")
    if len(files) > limits.manifest_files:
        raise bad(f"'files' lists {len(files)} files, over the cap of {limits.manifest_files}")
    for name, entry in files.items():
        check_name(name, where)
        if name in (MANIFEST, SIGNATURE):
            raise bad(f"'files' lists {name}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _HEX64.fullmatch(entry["sha256"])
                and type(entry.get("bytes")) is int and entry["bytes"] >= 0):
            raise bad(f"'files' entry {name!r} is not {{sha256: 64 hex digits, bytes: integer >= 0}}")
    for required in ("config.json", "tokenizer.json"):
        if required not in files:
            raise bad(f"'files' does not list {required}")
    models = [name for name in files if name.endswith(".onnx") and "/" not in name]
    if not models:
        raise bad("'files' lists no model file (*.onnx)")
    parity = manifest["parity"]
    if not isinstance(parity, list) or not parity or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("provider"), str)
            and e.get("status") in ("pass", "fail", "skip") and e.get("precision") in ("fp32", "fp16", "bf16", "int8", "int8-bf16")
            for e in parity):
        raise bad("'parity' is not a non-empty list of {file, provider, precision, status} rows")
    checked = {e["file"] for e in parity if e["status"] != "skip"}
    unchecked = [name for name in models if name not in checked]
    if unchecked:
        raise bad(f"model files {unchecked} have no parity row")
    data = manifest["parity_data"]
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k] in files
                                             for k in ("inputs", "reference")):
        raise bad("'parity_data' does not name listed inputs and reference npz files")
    options = manifest["options"]
    bars = options.get("parity") if isinstance(options, dict) else None
    if not isinstance(bars, dict):
        raise bad("'options.parity' (the parity bars) is missing")
    atol = bars.get("fp32_atol")
    if not _number(atol) or not 0 <= atol <= FP32_ATOL_MAX:
        raise bad(f"fp32_atol {str(atol)[:30]} is outside what export writes ([0, {FP32_ATOL_MAX:g}])")
    for key in ("int8_min_cosine", "fp16_min_cosine", "bf16_min_cosine"):
        value = bars.get(key, None if key == "int8_min_cosine" else 0.999)
        if not _number(value) or not MIN_COSINE_FLOOR <= value <= 1:
            raise bad(f"{key} {str(value)[:30]} is outside what export writes ([{MIN_COSINE_FLOOR:g}, 1])")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

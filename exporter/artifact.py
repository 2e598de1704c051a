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
`run` in a child process under a memory and time limit for that (exporter/sandbox.py); a Python caller of
:class:`Artifact` or :class:`exporter.runtime.Runtime` gets the containment, hashing and size bounds only.

Imports only the standard library, numpy and graphs.core.errors (``cryptography`` when a signature is checked).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphs.core.errors import ParityError, UsageError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # written by `export-model sign`; not listed in the manifest it signs
SCHEMA_VERSION = 1
TASKS = ("feature-extraction", "text-classification", "question-answering", "token-classification")
# The parity bars export accepts (exporter.parity.ParityConfig enforces the same ones), so a manifest outside
# them was not written by export-model.
FP32_ATOL_MAX = 1e-2
MIN_COSINE_FLOOR = 0.9
_MiB = 2**20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")
_BATCH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NPY_DTYPES = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.float16))
_SIGNED_PREFIX = b"export-model manifest signature v1\n"


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


@dataclass(frozen=True)
class Trust:
    """What anchors the artifact outside its folder. `public_keys`: PEM public keys (files outside the folder)
    one of which must have signed the manifest; `digest`: ``sha256:<hex>`` the manifest's bytes must hash to;
    `require_signature`: refuse an artifact without a valid signature."""

    public_keys: tuple[Path, ...] = ()
    digest: str | None = None
    require_signature: bool = False


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
            raise UsageError(f"{name}: {_kind(mode)}, not a regular file; restore the file export-model wrote")
        try:
            fd = os.open(parts[-1], flags | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=directory)
        except OSError as error:
            raise UsageError(f"{name}: cannot be opened ({error.strerror})") from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the stat and the open
        kind = _kind(os.fstat(fd).st_mode)
        os.close(fd)
        raise UsageError(f"{name}: {kind}, not a regular file")
    return fd


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _read_fd(fd: int, size: int) -> bytes:
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
        keys = _load_public_keys(trust.public_keys, folder)
        digest = _check_digest_form(trust.digest)
        if trust.require_signature and not keys:
            raise UsageError("--require-signature needs --public-key FILE (the key the builder signed with; it "
                             "must not come from the folder being checked)")
        try:
            root_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise UsageError(f"{folder} is not a folder; pass an artifact folder written by export-model") from None
        try:
            try:
                data = _read_capped(root_fd, MANIFEST, limits.manifest_bytes)
            except UsageError as error:
                problem = "has no manifest.json" if str(error).endswith("missing") else f": {error}"
                raise UsageError(f"{folder} {problem}; pass an artifact folder written by export-model") from None
            manifest_sha = sha256_digest(data)
            anchor = _anchor(root_fd, folder, data, manifest_sha, keys, digest, trust.require_signature, limits)
            manifest = parse_json(data, str(folder / MANIFEST))
            validate_manifest(manifest, str(folder / MANIFEST), limits)
        except BaseException:
            os.close(root_fd)
            raise
        return cls(folder, root_fd, manifest, data, manifest_sha, anchor, limits)

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
        (ParityError, exit 3, when they differ; UsageError for a name the manifest does not list)."""
        expected = self.files.get(name)
        if expected is None:
            raise UsageError(f"{self.folder}: {name} is not listed in manifest.json; re-export the artifact")
        cap = self.limits.cap(name)
        if expected["bytes"] > cap:
            raise ParityError(f"{self.folder / name}: the manifest says {expected['bytes']:,} bytes, over the "
                              f"{cap:,}-byte cap for this kind of file")
        try:
            data = _read_capped(self.root_fd, name, cap)
        except UsageError as error:
            raise ParityError(f"{self.folder}: {error}") from None
        if len(data) != expected["bytes"] or sha256_digest(data) != expected["sha256"]:
            raise ParityError(f"{self.folder / name}: sha256 differs from the manifest (file changed since export); "
                              f"run export-model verify {self.folder}")
        return data

    def read_json(self, name: str) -> Any:
        """Listed JSON file `name`, checked; malformed content is exit 3 (it is what the manifest vouches for)."""
        return parse_json(self.read(name), str(self.folder / name), ParityError)

    def check_all(self) -> list[str]:
        """"name: why" for each listed file that is missing, not a plain file inside the folder, or differs from
        the manifest (streamed: nothing is kept)."""
        failures = []
        for name, expected in self.files.items():
            try:
                fd = open_contained(self.root_fd, name)
            except UsageError as error:
                failures.append(str(error))
                continue
            try:
                size = os.fstat(fd).st_size
                if size != expected["bytes"]:
                    failures.append(f"{name}: {size:,} bytes, the manifest says {expected['bytes']:,}")
                    continue
                digest, left = hashlib.sha256(), size
                while left > 0 and (chunk := os.read(fd, min(left, 16 * _MiB))):
                    digest.update(chunk)
                    left -= len(chunk)
                if left or digest.hexdigest() != expected["sha256"]:
                    failures.append(f"{name}: sha256 differs from the manifest (file changed since export)")
            finally:
                os.close(fd)
        return failures

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
                found.append(relative if stat.S_ISREG(mode) else f"{relative} ({_kind(mode)})")
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


def _read_capped(root_fd: int, name: str, cap: int) -> bytes:
    fd = open_contained(root_fd, name)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise UsageError(f"{name} is {size:,} bytes, over the {cap:,}-byte cap for this kind of file")
        try:
            return _read_fd(fd, size)
        except UsageError as error:
            raise UsageError(f"{name}: {error}") from None
    finally:
        os.close(fd)


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
            and e.get("status") in ("pass", "fail", "skip") and e.get("precision") in ("fp32", "fp16", "int8")
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
    for key in ("int8_min_cosine", "fp16_min_cosine"):
        value = bars.get(key, 0.999 if key == "fp16_min_cosine" else None)
        if not _number(value) or not MIN_COSINE_FLOOR <= value <= 1:
            raise bad(f"{key} {str(value)[:30]} is outside what export writes ([{MIN_COSINE_FLOOR:g}, 1])")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_npz_batches(data: bytes, where: str, limits: Limits) -> list[dict[str, np.ndarray]]:
    """Batches from the bytes of a parity npz, every member checked on its zip header (name, declared size) and
    npy header (dtype, shape) before it is decompressed; pickles and object arrays are refused."""
    def bad(what: str) -> ParityError:
        return ParityError(f"{where}: {what}; the artifact is damaged or was not written by export-model")

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise bad(f"not an npz archive ({error})") from None
    if not members or len(members) > limits.npz_members:
        raise bad(f"{len(members)} members (expected 1-{limits.npz_members})")
    if sum(m.file_size for m in members) > limits.npz_unpacked_bytes:
        raise bad(f"members unpack to more than {limits.npz_unpacked_bytes:,} bytes")
    batches: dict[int, dict[str, np.ndarray]] = {}
    for member in members:
        match = re.fullmatch(r"(\d{1,4})/([a-z_]{1,40})\.npy", member.filename)
        if match is None:
            raise bad(f"member {member.filename[:60]!r} is not '<batch>/<name>.npy'")
        index = int(match.group(1))
        if index >= limits.parity_batches:
            raise bad(f"batch {index}: more than {limits.parity_batches} parity batches")
        try:
            with archive.open(member) as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(handle, max_header_size=10000)
                if dtype not in _NPY_DTYPES or fortran or not 1 <= len(shape) <= 3:
                    raise bad(f"member {member.filename}: {dtype} {shape} is not a parity array")
                size = int(np.prod(shape)) * dtype.itemsize
                if size > member.file_size:
                    raise bad(f"member {member.filename}: its header claims more than the member holds")
                array = np.frombuffer(handle.read(size), dtype=dtype).reshape(shape).copy()
        except ParityError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
            raise bad(f"member {member.filename}: {str(error)[:160]}") from None
        batches.setdefault(index, {})[match.group(2)] = array
    if sorted(batches) != list(range(len(batches))):
        raise bad("batch indexes are not 0..N-1")
    result = [batches[i] for i in range(len(batches))]
    for index, batch in enumerate(result):
        shapes = {a.shape[0] for a in batch.values()}
        if len(shapes) != 1 or next(iter(shapes)) > limits.batch_rows:
            raise bad(f"batch {index}: arrays disagree on the row count or hold more than {limits.batch_rows} rows")
        for name in _BATCH_INPUTS:
            array = batch.get(name)
            if array is not None and (array.ndim != 2 or array.shape[1] > limits.batch_tokens
                                      or array.dtype.kind != "i"):
                raise bad(f"batch {index}: {name} {array.dtype} {array.shape} is not (rows, <= "
                          f"{limits.batch_tokens}) integers")
    return result


# ----- trust: signatures and pinned digests -----

def _check_digest_form(digest: str | None) -> str | None:
    if digest is None:
        return None
    value = digest.removeprefix("sha256:")
    if not _HEX64.fullmatch(value):
        raise UsageError(f"--digest {digest[:80]!r} is not sha256:<64 lowercase hex digits> (the manifest digest "
                         "export-model prints and `verify` reports)")
    return value


def _load_public_keys(paths: tuple[Path, ...], folder: Path) -> list[tuple[str, Any]]:
    """(key id, key) per PEM public key file; a key inside the artifact folder is refused (it would vouch for
    itself)."""
    keys = []
    for path in paths:
        path = Path(path)
        try:
            inside = path.resolve().is_relative_to(folder.resolve())
        except OSError:
            inside = False
        if inside:
            raise UsageError(f"--public-key {path} lies inside the artifact folder; a key must come from outside "
                             "what it checks (your pipeline's own secret store or repository)")
        keys.append(load_public_key(path))
    return keys


def load_public_key(path: Path) -> tuple[str, Any]:
    """(key id, key) of a PEM Ed25519 or ECDSA public key file (an X.509 certificate's key works too)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509 import load_pem_x509_certificate

    try:
        data = Path(path).read_bytes()[: 64 * 1024]
        key = (load_pem_x509_certificate(data).public_key() if b"BEGIN CERTIFICATE" in data
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as error:
        raise UsageError(f"--public-key {path}: not a readable PEM public key ({str(error)[:120]}); export it "
                         "with `openssl pkey -in private.pem -pubout -out public.pem`") from None
    if not isinstance(key, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey)):
        raise UsageError(f"--public-key {path}: a {type(key).__name__}; use an Ed25519 or ECDSA key")
    return key_id(key), key


def key_id(public_key: Any) -> str:
    """sha256 of the key's DER SubjectPublicKeyInfo: how a signature names its key."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + sha256_digest(der)


def signed_message(manifest_bytes: bytes) -> bytes:
    """What a signature covers: a fixed context string, then the manifest's exact bytes."""
    return _SIGNED_PREFIX + manifest_bytes


def verify_signature(key: Any, signature: bytes, manifest_bytes: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed_message(manifest_bytes), ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, signed_message(manifest_bytes))
    except (InvalidSignature, ValueError):
        return False
    return True


def _anchor(root_fd: int, folder: Path, manifest_bytes: bytes, manifest_sha: str, keys: list[tuple[str, Any]],
            digest: str | None, require_signature: bool, limits: Limits) -> str:
    """Check the trust anchors asked for; the line `verify` prints about them."""
    anchors = []
    if digest is not None:
        if manifest_sha != digest:
            raise ParityError(f"{folder / MANIFEST}: sha256:{manifest_sha} is not the pinned --digest sha256:{digest}"
                              "; the artifact is not the one pinned")
        anchors.append(f"pinned digest sha256:{digest[:16]}... matches")
    signature = None
    try:
        signature = parse_json(_read_capped(root_fd, SIGNATURE, 64 * 1024), str(folder / SIGNATURE), ParityError)
    except UsageError as error:
        if "missing" not in str(error) or isinstance(error, ParityError):
            raise ParityError(f"{folder}: {error}") from None
    if keys:
        if signature is None:
            raise ParityError(f"{folder} has no {SIGNATURE}: it is not signed, and --public-key asks for a signature "
                              "(sign it with `export-model sign DIR --key private.pem`)")
        if not (isinstance(signature, dict) and isinstance(signature.get("key_id"), str)
                and isinstance(signature.get("signature"), str)):
            raise ParityError(f"{folder / SIGNATURE}: not an export-model signature ({{key_id, signature}})")
        matching = [(kid, key) for kid, key in keys if kid == signature["key_id"]]
        if not matching:
            raise ParityError(f"{folder / SIGNATURE}: signed by key {signature['key_id'][:80]}, which is none of the "
                              "--public-key keys given")
        try:
            raw = base64.b64decode(signature["signature"], validate=True)
        except ValueError:
            raise ParityError(f"{folder / SIGNATURE}: the signature is not base64") from None
        if not verify_signature(matching[0][1], raw, manifest_bytes):
            raise ParityError(f"{folder / MANIFEST}: the signature does not match (the manifest was changed or "
                              f"re-written after it was signed by {matching[0][0][:23]}...)")
        anchors.insert(0, f"signature by key {matching[0][0][:23]}... verified")
    elif require_signature:
        raise UsageError("--require-signature needs --public-key FILE")
    if anchors:
        return "; ".join(anchors)
    signed = " (it carries a signature, but no --public-key was given to check it)" if signature is not None else ""
    return ("internal consistency only: no signature or pinned digest checked" + signed
            + "; anyone who can write the folder can rewrite it")

"""Read a checkpoint's weight files without trusting them: bounded, confined to the folder, shapes before tensors.

Nothing here goes through transformers' loading code. The headers are read first (safetensors: an 8-byte length
and a JSON table; `.bin`: a zip of tensors opened with `torch.load(weights_only=True, mmap=True)`, so pickled code
is refused, never run), checked against hard limits, and only then are the tensors the model asks for
materialised, one at a time. What a weight file may be:

- a regular file inside the checkpoint folder, or a symlink into that folder, or (for a hub-cache snapshot,
  `.../models--org--name/snapshots/<rev>/`) a symlink into that repository's `blobs/` folder, as
  `huggingface_hub` writes them. An index's `weight_map` names bare file names; an absolute path, a `../` or a
  sub-folder is refused.
- at most `MAX_TENSORS` tensors in all and a safetensors header of at most `MAX_HEADER_BYTES`: a BERT-large
  holds about 400 tensors, so a file of a million is junk, and transformers' per-key bookkeeping on it is
  quadratic (it did not finish in 300 s).
- every tensor's byte range inside its file and matching its dtype and shape.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from graphs.core.errors import CheckpointError

MAX_TENSORS = 100_000
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_JSON_BYTES = 16 * 2**20  # config.json, an index, tokenizer_config.json: kilobytes in practice
SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_json(path: Path, what: str, fix: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file, refused when it is not a regular file, larger than `limit`, or not JSON."""
    regular_file(path, what, fix)
    size = path.stat().st_size
    if size > limit:
        raise CheckpointError(f"{path} is {size:,} bytes, more than the {limit:,} a {what} may hold; {fix}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise CheckpointError(f"{path} is not valid JSON ({detail}); {fix}") from None


def regular_file(path: Path, what: str, fix: str) -> None:
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise CheckpointError(f"cannot read {path} ({error.strerror}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder); a {what} must be a file: {fix}")


def inside(folder: Path, file: Path) -> bool:
    """Whether `file` resolves into `folder`, or into the hub cache's blobs/ of the snapshot `folder` is."""
    target = file.resolve()
    root = folder.resolve()
    if target.parent == root or root in target.parents:
        return True
    # huggingface_hub: <cache>/models--org--name/snapshots/<rev>/<file> -> ../../blobs/<sha>
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return target.parent == folder.parent.parent.resolve() / "blobs"
    return False


class WeightFiles:
    """The tensors a checkpoint's weight files hold (names, shapes, dtypes), read from their headers only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[Path] = []  # every file read, the index included (for the source hash)
        self.tensors: dict[str, TensorInfo] = {}
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        for index, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
            if (folder / single).exists():
                self._add(folder / single)
                break
            if (folder / index).exists():
                for shard in self._index(folder / index):
                    self._add(shard)
                break
        else:
            raise CheckpointError(
                f"{folder} has no weights (model.safetensors or pytorch_model.bin, or their .index.json); "
                "copy the weight file next to config.json"
            )

    @property
    def total_numel(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    def _index(self, path: Path) -> list[Path]:
        fix = "re-save the checkpoint (save_pretrained writes the index with the shards beside it)"
        self.files.append(path)
        data = read_json(path, "weight index", fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{path} has no weight_map of tensor name -> shard file; {fix}")
        if len(weight_map) > MAX_TENSORS:
            raise CheckpointError(f"{path} lists {len(weight_map):,} tensors, more than the {MAX_TENSORS:,} allowed; {fix}")
        shards: list[Path] = []
        for name in sorted(set(weight_map.values()), key=str):
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CheckpointError(
                    f"{path} names shard {name!r}, which is not a file name inside the checkpoint folder; weights "
                    f"outside {self.folder} are refused: put the shards beside the index and name them plainly"
                )
            shards.append(self.folder / name)
        return shards

    def _add(self, file: Path) -> None:
        fix = "copy the weight file again or re-save the checkpoint"
        if not file.exists():
            raise CheckpointError(f"weight file {file} is missing (a broken link or a shard not copied); {fix}")
        if not inside(self.folder, file):
            raise CheckpointError(
                f"weight file {file} resolves to {file.resolve()}, outside the checkpoint folder; weights outside "
                f"{self.folder} are refused: copy the file into the folder"
            )
        regular_file(file, "weight file", fix)
        self.files.append(file)
        found = _safetensors_header(file) if file.suffix == ".safetensors" else self._bin_header(file)
        for name, (shape, dtype) in found.items():
            self.tensors[name] = TensorInfo(shape, dtype, file)
        if len(self.tensors) > MAX_TENSORS:
            raise CheckpointError(
                f"the weights in {self.folder} hold {len(self.tensors):,} tensors, more than the {MAX_TENSORS:,} "
                "allowed (a BERT-large holds about 400): the file carries junk entries; re-save the checkpoint"
            )

    def _bin_header(self, file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
        state = self._load_bin(file)
        return {name: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()}

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file in self._bin_cache:
            return self._bin_cache[file]
        try:
            mmap = zipfile.is_zipfile(file)  # the legacy (pre-1.6) format cannot be memory-mapped
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            detail = " ".join(str(error).split())
            shown = detail[detail.find("Unsupported global"):][:160] if "Unsupported global" in detail else "not plain tensors"
            raise CheckpointError(
                f"the .bin weights in {file.parent} carry pickled code or objects ({shown}); refused without running "
                "it: convert the checkpoint to safetensors where you trust its source, or use its safetensors file"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            raise _damaged(file, " ".join(str(error).split())[:200] or type(error).__name__) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError(f"{file} does not hold a state dict (tensor name -> tensor); re-save the checkpoint")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if len(tensors) > MAX_TENSORS:
            raise CheckpointError(f"{file} holds {len(tensors):,} tensors, more than the {MAX_TENSORS:,} allowed; "
                                  "re-save the checkpoint")
        self._bin_cache[file] = tensors
        return tensors

    def load(self, name: str) -> torch.Tensor:
        """One tensor, materialised on the CPU."""
        info = self.tensors[name]
        if info.file.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(info.file), framework="pt") as handle:
                    return handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as error:
                raise _damaged(info.file, f"tensor {name}: {' '.join(str(error).split())[:160]}") from None
        return self._load_bin(info.file)[name]

    def release(self) -> None:
        self._bin_cache.clear()


def _damaged(file: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"cannot load the weights in {file}: {detail}; the weight file is damaged or incomplete (an interrupted "
        "copy?): copy it again or re-save the checkpoint"
    )


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _damaged(file, f"{size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise _damaged(file, f"it declares a {length:,}-byte header (the file is {size:,} bytes; at most "
                                 f"{MAX_HEADER_BYTES:,} allowed)")
        raw = handle.read(length)
    # Count the entries before parsing: a million junk entries would cost about 1 GB as Python objects.
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise CheckpointError(
            f"{file} holds {entries:,} tensors, more than the {MAX_TENSORS:,} allowed (a BERT-large holds about "
            "400): the file carries junk entries; re-save the checkpoint with only the model's weights"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise _damaged(file, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a table of tensors")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise CheckpointError(
            f"{file} holds {len(header):,} tensors, more than the {MAX_TENSORS:,} allowed (a BERT-large holds about "
            "400): the file carries junk entries; re-save the checkpoint with only the model's weights"
        )
    data_bytes = size - 8 - length
    result: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if ok:
            start, end = offsets
            ok = 0 <= start <= end <= data_bytes and end - start == math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]
        if not ok:
            raise _damaged(file, f"tensor {name[:100]!r} has a malformed or out-of-range header entry")
        result[name] = (tuple(shape), entry["dtype"])
    return result

"""The parity npz files of an artifact, read from their checked bytes within bounds: every member is checked on its
zip header (name, declared size) and npy header (dtype, shape) before it is decompressed; pickles and object
arrays are refused."""

from __future__ import annotations

import io
import re
import zipfile

import numpy as np

from exporter.runtime.files import Limits
from graphs.core.errors import ParityError

_BATCH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_NPY_DTYPES = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.float16))


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

"""Calibration texts: loading them from a file, sampling them reproducibly, and feeding them to onnxruntime.

Reading is bounded (see the limits below): only a regular file is opened (a FIFO, a device or a socket is refused
from its ``stat``, before any open that could block or never end), the file's size, the number of texts and each
line are capped, and every text is cut to ``MAX_TEXT_CHARS`` characters, so no input makes the loader hold more than
about ``MAX_FILE_BYTES`` of text.

The reader never holds more than one tokenized batch: onnxruntime's calibrators pull batches with
``get_next()`` and reduce each one to running ranges (MinMax) or histograms before asking for the next, so the
memory of calibration is bounded by the batch size, not by the number of samples.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import random
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.corpus import builtin_texts, split_texts
from graphs.core.errors import CalibrationDataError

logger = logging.getLogger(__name__)

Text = str | tuple[str, str]
"""One calibration example: a single text, or a (text, text_pair) pair for pair and QA tasks."""

Tokenize = Callable[[list[Text]], dict[str, np.ndarray]]
"""Turns a batch of texts into the graph's inputs (int64 arrays keyed by input name). Supplied by the exporter."""

PAIR_FIELD = "text_pair"

MAX_FILE_BYTES = 256 << 20
"""Largest calibration file (or saved dataset column data) read: 256 MiB. Calibration samples 128 texts by default."""
MAX_TEXTS = 1_000_000
"""Most texts (non-blank lines) a calibration file may hold."""
MAX_TEXT_CHARS = 32_768
"""Each text (and text pair side) is cut to this many characters when read: 64 per position of the longest input
the exporter builds (512), far more than the tokenizer can use, so the cut never changes a tokenized text of
ordinary prose."""
TXT_LINE_BYTES = 4 * MAX_TEXT_CHARS
"""A .txt line is read up to this many bytes (enough for MAX_TEXT_CHARS characters); the rest is skipped unread."""
JSONL_LINE_BYTES = 1 << 20
"""A .jsonl line longer than this (1 MiB) is refused: cutting it would break its JSON."""
_SKIP_CHUNK = 1 << 20


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its ``st_mode``."""
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def load_texts(path: Path | None, field: str = "text") -> list[Text]:
    """Load calibration texts.

    - ``None``: the calibration side of the built-in corpus (:func:`calibration.corpus.builtin_texts` split by
      :func:`calibration.corpus.split_texts` with its default held-out fraction, 0.25).
    - ``*.txt``: one text per line; blank lines are skipped; a line is read up to ``TXT_LINE_BYTES`` and every
      text cut to ``MAX_TEXT_CHARS`` characters.
    - ``*.jsonl``: one JSON object per line, text taken from ``field`` (default ``"text"``); when the object
      also has a string ``"text_pair"``, the example is the tuple ``(text, text_pair)``.
    - a folder written by ``datasets.Dataset.save_to_disk`` (only when ``datasets`` is installed): column
      ``field``, plus ``"text_pair"`` when that column exists.

    Raises:
        CalibrationDataError: missing path, not a regular file (FIFO, device, socket: refused unopened),
            unsupported kind, over ``MAX_FILE_BYTES`` or ``MAX_TEXTS``, a .jsonl line over ``JSONL_LINE_BYTES``,
            undecodable bytes, bad JSON, a line without ``field`` or with a non-string value, or no texts at all.
            The message names the file and line.
    """
    if path is None:
        texts: list[Text] = list(split_texts(builtin_texts())[0])
        logger.info(
            "calibration texts: %d built-in passages (pydoc_data.topics, calibration split)", len(texts)
        )
        return texts
    path = Path(path)
    logger.info("loading calibration texts from %s", path)
    try:
        info = path.stat()  # follows a symlink: what is judged is what would be read
    except FileNotFoundError:
        raise CalibrationDataError(
            f"calibration data {path} does not exist; pass an existing .txt or .jsonl file"
        ) from None
    except OSError as error:
        raise CalibrationDataError(f"calibration data {path} cannot be read ({error.strerror}); pass a readable "
                                   ".txt or .jsonl file") from None
    if stat.S_ISDIR(info.st_mode):
        texts = _load_saved_dataset(path, field)
    elif not stat.S_ISREG(info.st_mode):
        # Never opened: a FIFO without a writer blocks open() forever, /dev/zero never ends.
        raise CalibrationDataError(
            f"calibration data {path} is a {file_kind(info.st_mode)}, not a regular file; pass a .txt or .jsonl file"
        )
    elif path.suffix not in (".txt", ".jsonl"):
        raise CalibrationDataError(
            f"calibration data {path}: expected a .txt file (one text per line), a .jsonl file or a folder "
            f"saved by datasets.save_to_disk; found suffix {path.suffix!r}"
        )
    elif info.st_size > MAX_FILE_BYTES:
        raise CalibrationDataError(
            f"calibration data {path} is {info.st_size / (1 << 20):,.0f} MiB, over the {MAX_FILE_BYTES >> 20} MiB "
            f"limit; calibration uses --calibration-samples texts (128 by default): pass a smaller sample of the file"
        )
    elif path.suffix == ".txt":
        texts = _cap_count(path, (line.strip()[:MAX_TEXT_CHARS] for _, line in _lines(path, TXT_LINE_BYTES)
                                  if line.strip()))
    else:
        texts = _cap_count(path, (_jsonl_example(path, number, line, field)
                                  for number, line in _lines(path, JSONL_LINE_BYTES, cut=False) if line.strip()))
    if not texts:
        raise CalibrationDataError(f"calibration data {path} holds no texts; add at least one non-blank line")
    logger.info("loaded %d calibration texts from %s", len(texts), path)
    return texts


def _cap_count(path: Path, texts: Iterator[Text]) -> list[Text]:
    """The texts, refusing a file that holds more than MAX_TEXTS of them (checked as they are read)."""
    kept: list[Text] = []
    for text in texts:
        if len(kept) == MAX_TEXTS:
            raise CalibrationDataError(
                f"calibration data {path} holds more than {MAX_TEXTS:,} texts, the limit; calibration uses "
                f"--calibration-samples texts (128 by default): pass a smaller sample of the file"
            )
        kept.append(text)
    return kept


def _lines(path: Path, limit: int, cut: bool = True, what: str = "calibration data") -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) of a UTF-8 file, reading at most `limit` bytes of any line.

    A longer line is cut to its first `limit` bytes (at a character boundary; the rest is skipped in bounded
    chunks, never held) when `cut`, else refused naming the line. At most MAX_FILE_BYTES are read in all, even
    from a file that grows while it is read. Names the line of the first undecodable byte.
    """
    total = 0
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(limit + 1)
            if not raw:
                return
            number += 1
            total += len(raw)
            long = len(raw) > limit and not raw.endswith(b"\n")
            if long and not cut:
                raise CalibrationDataError(
                    f"{what} {path} line {number} is longer than {limit >> 20} MiB, the limit for one "
                    f"JSON line; shorten its text (only the first {MAX_TEXT_CHARS:,} characters are used)"
                )
            if long:
                raw = raw[:limit]
                while True:  # skip the rest of the line without holding it
                    rest = handle.readline(_SKIP_CHUNK)
                    total += len(rest)
                    if not rest or rest.endswith(b"\n") or total > MAX_FILE_BYTES:
                        break
            if total > MAX_FILE_BYTES:
                raise CalibrationDataError(
                    f"{what} {path} holds more than {MAX_FILE_BYTES >> 20} MiB (it grew while read); "
                    f"pass a smaller sample of the file"
                )
            try:
                # A cut line may end inside a character: the incremental decoder drops that partial tail.
                text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not long)
            except UnicodeDecodeError as error:
                raise CalibrationDataError(
                    f"{what} {path} line {number}: not UTF-8 ({error.reason} at byte {error.start}); "
                    f"re-encode the file as UTF-8"
                ) from None
            yield number, text


def _jsonl_example(path: Path, number: int, line: str, field: str) -> Text:
    where = f"calibration data {path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CalibrationDataError(
            f"{where}: bad JSON ({error.msg}); write one JSON object per line"
        ) from None
    if not isinstance(record, dict) or field not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise CalibrationDataError(
            f"{where}: expected an object with field {field!r}, found {found}; pass --calibration-field NAME"
        )
    text = record[field]
    if not isinstance(text, str):
        raise CalibrationDataError(f"{where}: field {field!r} must be a string, found {type(text).__name__}")
    pair = record.get(PAIR_FIELD)
    if isinstance(pair, str) and field != PAIR_FIELD:
        return (text[:MAX_TEXT_CHARS], pair[:MAX_TEXT_CHARS])
    return text[:MAX_TEXT_CHARS]


def _load_saved_dataset(path: Path, field: str) -> list[Text]:
    try:
        import datasets  # optional: only for folders written by save_to_disk
    except ImportError:
        raise CalibrationDataError(
            f"calibration data {path} is a folder; reading a saved dataset needs the 'datasets' package "
            f"(pip install datasets), or pass a .txt/.jsonl file"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise CalibrationDataError(
            f"calibration data {path}: not a dataset saved by save_to_disk ({error})"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        split = "train" if "train" in dataset else sorted(dataset)[0]
        dataset = dataset[split]
    if field not in dataset.column_names:
        raise CalibrationDataError(
            f"calibration data {path}: no column {field!r}; columns are {dataset.column_names}"
        )
    if dataset.num_rows > MAX_TEXTS or dataset.data.nbytes > MAX_FILE_BYTES:
        raise CalibrationDataError(
            f"calibration data {path} holds {dataset.num_rows:,} rows ({dataset.data.nbytes / (1 << 20):,.0f} MiB), "
            f"over the limit of {MAX_TEXTS:,} rows or {MAX_FILE_BYTES >> 20} MiB; calibration uses "
            f"--calibration-samples texts (128 by default): save a smaller sample (dataset.select)"
        )
    texts = [str(text)[:MAX_TEXT_CHARS] for text in dataset[field]]
    if PAIR_FIELD in dataset.column_names and field != PAIR_FIELD:
        return list(zip(texts, (str(pair)[:MAX_TEXT_CHARS] for pair in dataset[PAIR_FIELD]), strict=True))
    return list(texts)


def sample_texts(texts: Sequence[Text], n: int, seed: int) -> tuple[list[Text], str]:
    """Pick ``n`` texts reproducibly and return them with the sha256 hex digest of the sample.

    The sample depends only on ``texts``, ``n`` and ``seed`` (``random.Random(seed).sample``); when fewer
    than ``n`` texts exist all are returned in their order and the caller decides whether that is an error.
    The digest covers the sampled texts in order (UTF-8, each pair's parts separated by NUL, texts by a
    0x1e record separator), so a manifest can tell whether two runs calibrated on the same data.
    """
    if n <= 0:
        raise ValueError(f"n must be positive; got {n}")
    if len(texts) <= n:
        sample = list(texts)
    else:
        indices = sorted(random.Random(seed).sample(range(len(texts)), n))
        sample = [texts[i] for i in indices]
    digest = hashlib.sha256()
    for text in sample:
        digest.update(("\0".join(text) if isinstance(text, tuple) else text).encode("utf-8"))
        digest.update(b"\x1e")
    logger.debug("sampled %d of %d texts (seed %d)", len(sample), len(texts), seed)
    return sample, digest.hexdigest()


class TextCalibrationReader(CalibrationDataReader):
    """Feeds texts to an onnxruntime calibrator one tokenized batch at a time.

    ``get_next()`` tokenizes the next ``batch_size`` texts (default 8) only when asked, so at most one batch of
    inputs exists at a time; ``rewind()`` starts over (onnxruntime calls it between calibration passes).
    """

    def __init__(self, texts: Sequence[Text], tokenize: Tokenize, batch_size: int = 8) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        if not texts:
            raise CalibrationDataError("no calibration texts to read; pass a file with at least one text")
        self._texts = texts
        self._tokenize = tokenize
        self._batch_size = batch_size
        self._start, self._end = 0, len(texts)
        self._position = 0
        self.batches_read = 0

    def __len__(self) -> int:
        """Number of batches in one pass (the unit of :meth:`set_range`)."""
        return -(-len(self._texts) // self._batch_size)

    @property
    def texts(self) -> Sequence[Text]:
        return self._texts

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= self._end:
            return None
        end = min(self._position + self._batch_size, self._end)
        batch = list(self._texts[self._position : end])
        self._position = end
        self.batches_read += 1
        feeds = self._tokenize(batch)
        return {name: np.ascontiguousarray(value) for name, value in feeds.items()}

    def rewind(self) -> None:
        self._start, self._end = 0, len(self._texts)
        self._position = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        """Read only batches ``[start_index, end_index)`` until the next :meth:`rewind`.

        onnxruntime 1.31's ``quantize_static`` calls this with ``extra_options["CalibStridedMinMax"]`` to
        calibrate chunk by chunk, which keeps histogram calibrators (entropy, percentile) from holding the
        activations of every batch at once.
        """
        self._start = min(start_index * self._batch_size, len(self._texts))
        self._end = min(end_index * self._batch_size, len(self._texts))
        self._position = self._start


def joined_texts(texts: Sequence[str], words: int) -> list[str]:
    """Consecutive ``texts`` joined (one space) until each holds at least ``words`` words; a last, shorter join is
    dropped unless it is the only one. Calibration rows that reach a long ``--max-length`` from short passages."""
    joined, current = [], []
    for text in texts:
        current += str(text).split()
        if len(current) >= words:
            joined.append(" ".join(current))
            current = []
    if not joined and current:
        joined.append(" ".join(current))
    return joined


class ChainedReader(CalibrationDataReader):
    """The batches of several readers, one after the other (``len`` is their sum; ``rewind`` rewinds all)."""

    def __init__(self, readers: Sequence[TextCalibrationReader]) -> None:
        self._readers = list(readers)
        self._index = 0

    def __len__(self) -> int:
        return sum(len(reader) for reader in self._readers)

    @property
    def texts(self) -> Sequence[Text]:
        return self._readers[0].texts

    def get_next(self) -> dict[str, np.ndarray] | None:
        while self._index < len(self._readers):
            feeds = self._readers[self._index].get_next()
            if feeds is not None:
                return feeds
            self._index += 1
        return None

    def rewind(self) -> None:
        for reader in self._readers:
            reader.rewind()
        self._index = 0

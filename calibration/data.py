"""Calibration texts: loading them from a file, sampling them reproducibly, and feeding them to onnxruntime.

The reader never holds more than one tokenized batch: onnxruntime's calibrators pull batches with
``get_next()`` and reduce each one to running ranges (MinMax) or histograms before asking for the next, so the
memory of calibration is bounded by the batch size, not by the number of samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from calibration.corpus import builtin_texts, split_texts
from exporter.errors import CalibrationDataError

logger = logging.getLogger(__name__)

Text = str | tuple[str, str]
"""One calibration example: a single text, or a (text, text_pair) pair for pair and QA tasks."""

Tokenize = Callable[[list[Text]], dict[str, np.ndarray]]
"""Turns a batch of texts into the graph's inputs (int64 arrays keyed by input name). Supplied by the exporter."""

PAIR_FIELD = "text_pair"


def load_texts(path: Path | None, field: str = "text") -> list[Text]:
    """Load calibration texts.

    - ``None``: the calibration side of the built-in corpus (:func:`calibration.corpus.builtin_texts` split by
      :func:`calibration.corpus.split_texts` with its default held-out fraction, 0.25).
    - ``*.txt``: one text per line; blank lines are skipped.
    - ``*.jsonl``: one JSON object per line, text taken from ``field`` (default ``"text"``); when the object
      also has a string ``"text_pair"``, the example is the tuple ``(text, text_pair)``.
    - a folder written by ``datasets.Dataset.save_to_disk`` (only when ``datasets`` is installed): column
      ``field``, plus ``"text_pair"`` when that column exists.

    Raises:
        CalibrationDataError: missing path, unsupported kind, undecodable bytes, bad JSON, a line without
            ``field`` or with a non-string value, or no texts at all. The message names the file and line.
    """
    if path is None:
        texts: list[Text] = list(split_texts(builtin_texts())[0])
        logger.info(
            "calibration texts: %d built-in passages (pydoc_data.topics, calibration split)", len(texts)
        )
        return texts
    path = Path(path)
    logger.info("loading calibration texts from %s", path)
    if not path.exists():
        raise CalibrationDataError(
            f"calibration data {path} does not exist; pass an existing .txt or .jsonl file"
        )
    if path.is_dir():
        texts = _load_saved_dataset(path, field)
    elif path.suffix == ".txt":
        texts = [line.strip() for _, line in _lines(path) if line.strip()]
    elif path.suffix == ".jsonl":
        texts = [_jsonl_example(path, number, line, field) for number, line in _lines(path) if line.strip()]
    else:
        raise CalibrationDataError(
            f"calibration data {path}: expected a .txt file (one text per line), a .jsonl file or a folder "
            f"saved by datasets.save_to_disk; found suffix {path.suffix!r}"
        )
    if not texts:
        raise CalibrationDataError(f"calibration data {path} holds no texts; add at least one non-blank line")
    logger.info("loaded %d calibration texts from %s", len(texts), path)
    return texts


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line) of a UTF-8 file, naming the line of the first undecodable byte."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CalibrationDataError(
                    f"calibration data {path} line {number}: not UTF-8 ({error.reason} at byte {error.start}); "
                    f"re-encode the file as UTF-8"
                ) from None


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
        return (text, pair)
    return text


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
    texts = [str(text) for text in dataset[field]]
    if PAIR_FIELD in dataset.column_names and field != PAIR_FIELD:
        return list(zip(texts, (str(pair) for pair in dataset[PAIR_FIELD]), strict=True))
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

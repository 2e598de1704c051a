"""Real English text that ships with CPython, and the calibration / held-out split of any text list.

The built-in corpus is the prose of ``pydoc_data.topics`` (the language reference pages that ``help()`` shows,
about 465k characters in 79 documents), cut into paragraphs. It needs no network and no extra package, and it
is real text, which matters: activation ranges calibrated on random token ids do not match those of language.

Calibration and validation must never see the same text, or an accuracy check measures memorisation of the
calibration ranges. :func:`split_texts` assigns each text to a side by a hash of its content, so the split is
deterministic, independent of the order and number of texts, and a duplicated text always lands on one side.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

MIN_PASSAGE_WORDS = 12
"""Paragraphs with fewer words (headings, one-line signatures, rule lines) are dropped."""

MIN_LETTER_FRACTION = 0.6
"""Paragraphs where letters make up less of the characters are mostly code or tables and are dropped."""

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_WHITESPACE = re.compile(r"\s+")


def _is_prose(passage: str) -> bool:
    if len(passage.split(" ")) < MIN_PASSAGE_WORDS:
        return False
    letters = sum(ch.isalpha() for ch in passage)
    return letters >= MIN_LETTER_FRACTION * len(passage)


def builtin_passages() -> list[tuple[str, str]]:
    """The built-in corpus as ``(topic, passage)`` pairs: prose paragraphs of CPython's ``pydoc_data.topics``.

    Paragraphs are split on blank lines and whitespace-normalised (one space); those shorter than
    ``MIN_PASSAGE_WORDS`` words or with less than ``MIN_LETTER_FRACTION`` letters are dropped. The order is
    deterministic: topics sorted by name, paragraphs in document order, exact duplicates kept once (under the
    first topic, by name, that holds them).
    """
    from pydoc_data.topics import topics  # stdlib, but only needed here

    logger.debug("building built-in corpus from pydoc_data.topics (%d documents)", len(topics))
    passages: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in sorted(topics):
        for paragraph in _PARAGRAPH_BREAK.split(topics[name]):
            passage = _WHITESPACE.sub(" ", paragraph).strip()
            if passage in seen or not _is_prose(passage):
                continue
            seen.add(passage)
            passages.append((name, passage))
    logger.debug("built-in corpus: %d passages", len(passages))
    return passages


def builtin_texts() -> list[str]:
    """Return the built-in corpus: the passages of :func:`builtin_passages`, in its order."""
    return [passage for _, passage in builtin_passages()]


def _bucket(text: str) -> float:
    """Map a text to a number in [0, 1) by its content hash (stable across runs and Python versions)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_texts(texts: Sequence[str], heldout_fraction: float = 0.25) -> tuple[list[str], list[str]]:
    """Split ``texts`` into ``(calibration, heldout)`` by a hash of each text's content.

    A text goes to held-out when its hash bucket in [0, 1) is below ``heldout_fraction`` (default 0.25), so
    about that fraction is held out. The two lists are disjoint as sets of strings (equal texts share a bucket)
    and keep the input order. Pair texts (tuples) are hashed on their parts joined by a NUL character.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1); got {heldout_fraction}")
    calibration: list[str] = []
    heldout: list[str] = []
    for text in texts:
        key = "\0".join(text) if isinstance(text, tuple) else text
        (heldout if _bucket(key) < heldout_fraction else calibration).append(text)
    logger.debug("split %d texts: %d calibration, %d held-out", len(texts), len(calibration), len(heldout))
    return calibration, heldout

"""Turning real text into the model's inputs: one place, used by calibration and parity alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from exporter.runtime.text import CHARS_PER_POSITION, cap_chars  # noqa: F401  (one definition, both sides)

Text = str | tuple[str, str]

def as_pair(text: str, question_words: int = 8) -> tuple[str, str]:
    """A (question, context) pair from one passage: the start of its first sentence asks, the passage answers."""
    head = text.partition(". ")[0].split()[:question_words]
    return (" ".join(head) + "?", text)


def make_tokenize(
    tokenizer: Any, input_names: Sequence[str], max_length: int, pairs: bool = False, pad_to_max: bool = True
) -> Callable[..., dict[str, np.ndarray]]:
    """A function mapping texts to int64 feeds holding exactly the graph's `input_names`.

    `pairs`: encode (question, context) pairs (question answering), truncating the longer side first.
    `pad_to_max`: pad every batch to `max_length` (fixed shapes) rather than to its longest text.
    Every text is cut to `max_length * CHARS_PER_POSITION` characters first (`cap_chars`), so tokenization time
    and memory are bounded whatever the texts' length.
    The returned function takes the texts and optionally a shorter `max_length` for that call.
    """

    def tokenize(texts: Sequence[Text], max_length: int = max_length) -> dict[str, np.ndarray]:
        def cap(text: str) -> str:
            return cap_chars(text, max_length)

        if pairs:
            items: list[Any] = [(cap(t[0]), cap(t[1])) if isinstance(t, tuple) else as_pair(cap(t)) for t in texts]
        else:
            items = [cap(t) if isinstance(t, str) else cap(cap(t[0]) + " " + cap(t[1])) for t in texts]
        kwargs: dict[str, Any] = {
            "padding": "max_length" if pad_to_max else "longest",
            # longest_first never fails on short max_length (only_second raises when the question alone is too long).
            "truncation": "longest_first" if pairs else True,
            "max_length": max_length,
            "return_tensors": "np",
        }
        if pairs:
            encoded = tokenizer([q for q, _ in items], [c for _, c in items], **kwargs)
        else:
            encoded = tokenizer(list(items), **kwargs)
        feeds = {}
        for name in input_names:
            if name in encoded:
                feeds[name] = np.asarray(encoded[name], dtype=np.int64)
            elif name == "token_type_ids":
                feeds[name] = np.zeros_like(np.asarray(encoded["input_ids"]), dtype=np.int64)
            else:
                raise KeyError(f"the tokenizer does not produce {name!r}")
        return feeds

    return tokenize

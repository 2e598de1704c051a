"""How much of a text the model can use: the one cut the export and the deployment side both apply."""

from __future__ import annotations

CHARS_PER_POSITION = 64
"""Texts are cut to `max_length * CHARS_PER_POSITION` characters before tokenization: a WordPiece or BPE token
spans a handful of characters (about 4-6 in English prose), so the cut keeps every token that fits in `max_length`
while no tokenizer call ever sees a megabyte-long text."""


def cap_chars(text: str, max_length: int) -> str:
    """`text` cut to what `max_length` positions can use (see CHARS_PER_POSITION)."""
    return text[: max(1, max_length) * CHARS_PER_POSITION]

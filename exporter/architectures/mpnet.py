"""MPNet (all-mpnet-base-v2, the second most used sentence-transformers model): BERT's layer plan with separate
``q/k/v/o`` projections under ``attention.attn``, and one T5-style relative position bias table (32 buckets x
heads) shared by every layer and added to the scores before the mask.

A head owns its q/k/v rows, its o columns and its column of the bias table. After uneven compaction each layer
keeps different heads, so each attention module records which original heads it still holds (``kept_heads``) and
the export forward gathers that layer's columns of the one bias computed per forward. The fused graph carries the
bias as each Attention node's ``attention_bias`` input (graphs/fuse_mpnet_attention.py); the INT8 route keeps such
an Attention in float with its bias and quantizes the projections around it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from exporter.architectures.base import register
from exporter.architectures.bert import BertArchitecture, additive_mask
from exporter.architectures.roberta import padded_position_ids
from exporter.forward_parts import Forward, intermediate, residual_output
from graphs.core.errors import CheckpointError


@register
class MPNetArchitecture(BertArchitecture):
    name = "mpnet"
    model_types = ("mpnet",)
    class_prefix = "MPNet"
    input_names = ("input_ids", "attention_mask")
    layer_paths = {
        "attention": "attention.attn",
        "query": "attention.attn.q",
        "key": "attention.attn.k",
        "value": "attention.attn.v",
        "output": "attention.attn.o",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    }
    layers_path = "encoder.layer"

    def max_positions(self, config: Any) -> int:
        # Positions start after the padding index, as RoBERTa's.
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1

    def set_heads(self, attention: nn.Module, heads: int, kept: Sequence[int] | None = None) -> None:
        previous = list(getattr(attention, "kept_heads", range(attention.num_attention_heads)))
        attention.num_attention_heads = heads
        attention.all_head_size = heads * attention.attention_head_size
        # `kept` indexes the heads the module held before this call; the bias table's columns are original heads.
        attention.kept_heads = [previous[k] for k in kept] if kept is not None else previous[:heads]

    def check_pruned(self, config: Any) -> None:
        if any((getattr(config, "pruned_heads", None) or {}).values()):
            raise CheckpointError(
                "an MPNet checkpoint with config.pruned_heads: transformers' prune_heads removes the heads' "
                "projections but not their columns of the shared relative position bias table, so its own forward "
                "no longer runs; export the unpruned checkpoint with the dead heads' weights zeroed, which "
                "export-model removes exactly (table columns included)")

    # --- export forward -----------------------------------------------------------------------------------
    def export_patches(self, model: nn.Module, heads: tuple[int, ...],
                       own_activation: Callable[[object], None]) -> list[tuple[nn.Module, Forward]]:
        base = model.base_model
        patches: list[tuple[nn.Module, Forward]] = [
            (base, _mpnet_model), (base.embeddings, _mpnet_embeddings(int(model.config.pad_token_id))),
            (base.encoder, _mpnet_encoder)]
        for view, count in zip(self.layers(model), heads, strict=True):
            layer = view.layer
            kept = list(getattr(view.attention, "kept_heads", range(count)))
            patches += [
                (layer, _mpnet_layer),
                (layer.attention, _mpnet_attention),
                (layer.attention.attn, _mpnet_self_attention(count, self.head_size(view.attention), kept)),
                (layer.intermediate, intermediate),
                (layer.output, residual_output),
            ]
            own_activation(layer.intermediate.intermediate_act_fn)
        return patches

    def attention_pass(self, layer_norm: str) -> str | None:
        return "mpnet"

    @contextmanager
    def own_forward(self, model: nn.Module) -> Iterator[None]:
        """transformers' MPNet forward adds the whole table's bias to every layer; on a compacted layer each
        attention module gets that layer's columns first (its own forward otherwise, unchanged)."""
        wrapped = []
        for view in self.layers(model):
            kept = getattr(view.attention, "kept_heads", None)
            if kept is None or len(kept) == model.config.num_attention_heads:
                continue
            module, index = view.attention, torch.tensor(kept, dtype=torch.long)
            original = module.forward
            # 4.57 passes head_mask before position_bias, 5.x does not: find the argument by its name
            signature = inspect.signature(original)

            def forward(*args: Any, _original: Any = original, _index: torch.Tensor = index,
                        _signature: inspect.Signature = signature, **kwargs: Any) -> Any:
                bound = _signature.bind_partial(*args, **kwargs)
                if bound.arguments.get("position_bias") is not None:
                    bound.arguments["position_bias"] = bound.arguments["position_bias"].index_select(1, _index)
                return _original(*bound.args, **bound.kwargs)

            module.forward = forward
            wrapped.append(module)
        try:
            yield
        finally:
            for module in wrapped:
                del module.forward


# --- the forward MPNet's modules run during the trace (transformers' eager computation, op for op) -------------


def _mpnet_model(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    embedding_output = self.embeddings(input_ids)
    sequence_output = self.encoder(embedding_output, additive_mask(attention_mask, embedding_output.dtype))
    pooler = getattr(self, "pooler", None)
    return sequence_output, (pooler(sequence_output) if pooler is not None else None)


def _mpnet_embeddings(padding_idx: int) -> Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = padded_position_ids(input_ids, padding_idx)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        return self.LayerNorm(embeddings)

    return forward


def _bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """MPNetEncoder.relative_position_bucket."""
    ret = 0
    n = -relative_position
    num_buckets //= 2
    ret += (n < 0).to(torch.long) * num_buckets
    n = torch.abs(n)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    val_if_large = torch.min(val_if_large, torch.full_like(val_if_large, num_buckets - 1))
    return ret + torch.where(is_small, n, val_if_large)


def _mpnet_encoder(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One position bias (1, heads, seq, seq) from the shared table, then every layer with it."""
    length = hidden_states.size(1)
    positions = torch.arange(length, dtype=torch.long)
    relative = positions[None, :] - positions[:, None]
    buckets = _bucket(relative, num_buckets=self.relative_attention_bias.num_embeddings)
    position_bias = self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)
    for layer_module in self.layer:
        hidden_states = layer_module(hidden_states, attention_mask, position_bias)
    return hidden_states


def _mpnet_layer(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                 position_bias: torch.Tensor) -> torch.Tensor:
    attention_output = self.attention(hidden_states, attention_mask, position_bias)
    return self.output(self.intermediate(attention_output), attention_output)


def _mpnet_attention(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                     position_bias: torch.Tensor) -> torch.Tensor:
    return self.LayerNorm(self.attn(hidden_states, attention_mask, position_bias) + hidden_states)


def _mpnet_self_attention(heads: int, head_size: int, kept: list[int]) -> Forward:
    width = heads * head_size
    index = torch.tensor(kept, dtype=torch.long)

    def forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                position_bias: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        q = self.q(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        k = self.k(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        v = self.v(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores / math.sqrt(head_size)
        scores = scores + position_bias.index_select(1, index)  # this layer's heads' columns of the table
        scores = scores + attention_mask
        probs = nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return self.o(context.view(context.size()[:-2] + (width,)))

    return forward


"""Forward pieces every family's export forward shares (torch side): module-order loops, residual outputs, the
pooler, buffers. A family's own pieces live in its file under exporter/architectures/; exporter/export_forward.py
explains why the export runs forwards written here rather than the installed transformers' code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Forward = Callable[..., Any]
"""A forward function set on a module for the trace: ``forward(self, ...)``."""


def buffer(module: nn.Module, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else make()


def position_ids(embeddings: nn.Module) -> torch.Tensor:
    return buffer(embeddings, "position_ids",
                   lambda: torch.arange(embeddings.position_embeddings.num_embeddings).expand((1, -1)))


def layers_in_order(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    for layer_module in self.layer:
        hidden_states = layer_module(hidden_states, attention_mask)
    return hidden_states


def residual_output(self: nn.Module, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    hidden_states = self.dense(hidden_states)
    return self.LayerNorm(hidden_states + input_tensor)


def intermediate(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.intermediate_act_fn(self.dense(hidden_states))


def pooler(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    first_token_tensor = hidden_states[:, 0]
    pooled_output = self.dense(first_token_tensor)
    return self.activation(pooled_output)

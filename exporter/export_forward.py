"""The project's own forward of BERT, RoBERTa and DistilBERT, used only while `torch.onnx.export` traces the model.

Why: onnxruntime's transformer optimizer (``graphs.fusion``) reads each layer's head count from the constant in
that layer's Q Reshape, and recognises the attention by the op pattern transformers 4.57's eager attention
exported. transformers 5 reshapes with ``(*input_shape, -1, head_size)`` (no head count in the graph: 0 Attention
fused), builds its masks with other code, and may change again. So the graph must not depend on the installed
transformers' forward code: every module between the inputs and the task outputs gets, for the duration of the
trace, a forward written here that reproduces 4.57's eager computation op for op, reading the weights from the
live modules (``Linear``, ``Embedding``, ``LayerNorm`` or ``NoNorm``, the activation module):

- each layer's head count is ``query.out_features // head_size`` of that layer, a Python int, so it is a
  constant in the Q/K/V Reshapes (uneven heads after pruning or compaction stay per layer);
- BERT/RoBERTa: the additive mask ``(1 - mask[:, None, None, :]) * finfo.min`` built once in the base model,
  ``scores / sqrt(d) + mask``; DistilBERT: ``q / sqrt(d)``, ``masked_fill(mask == 0, finfo.min)``; the patterns
  ``graphs.fusion``, ``graphs.fuse_nonorm_attention`` and ``graphs.fuse_distilbert_attention`` match;
- embeddings as 4.57 wrote them (position ids sliced from a constant; RoBERTa's cumsum position ids), so
  EmbedLayerNormalization fuses as before;
- the feed-forward activation: ``gelu`` (exact, erf) and ``relu`` written here, any other name runs the live
  activation module;
- dropout is left out (export traces eval mode, where it is the identity); feed-forward chunking too (same numbers);
- the task heads (pooler + classifier, RoBERTa's classification head, DistilBERT's pre-classifier + ReLU, the QA
  split) as 4.57 computed them.

The forwards are set as instance attributes (``module.forward``) of the live modules, so TorchScript names every
node after the module that computes it, as before (``/model/bert/encoder/layer.0/attention/self/Reshape``), and
are removed again when the context ends, whatever happens. Before the trace, the patched model is run on the
export's dummy batch next to the model's own forward: a difference beyond float rounding is an ``ExportError``
(a checkpoint this forward does not describe is never exported silently wrong).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from exporter.architectures import TASK_OUTPUTS, Architecture
from exporter.forward_parts import Forward
from exporter.runtime.pooling import Pooling
from exporter.sentence import torch_pool
from graphs.core.errors import ExportError


@contextmanager
def export_forward(model: nn.Module, architecture: Architecture, task: str,
                   pooling: Pooling | None = None) -> Iterator[nn.Module]:
    """Within the context, ``model(input_ids=..., attention_mask=..., [token_type_ids=...])`` runs the project's
    forward and returns the task's outputs as a tuple in ``output_names(task, pooling)`` order (feature
    extraction with `pooling`: ``last_hidden_state`` and the ``sentence_embedding`` it pools to). ``model`` is
    restored on exit (its own forwards back, nothing else changed)."""
    patches = forward_patches(model, architecture, task, pooling)
    missing = object()
    saved = [(module, module.__dict__.get("forward", missing)) for module, _ in patches]
    try:
        for module, function in patches:
            module.forward = types.MethodType(function, module)
        yield model
    finally:
        for module, previous in reversed(saved):
            if previous is missing:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def layer_heads(model: nn.Module, architecture: Architecture) -> tuple[int, ...]:
    """Heads of each encoder layer as the export writes them: Q width // head size, checked against K, V, O."""
    heads = []
    for view in architecture.layers(model):
        size = architecture.head_size(view.attention)
        width = view.query.out_features
        widths = {view.key.out_features, view.value.out_features, view.output.in_features}
        if size <= 0 or width % size or widths != {width}:
            raise ExportError(
                f"layer {view.index}: Q/K/V/O widths {width}, {view.key.out_features}, {view.value.out_features}, "
                f"{view.output.in_features} do not make whole heads of {size}; the compacted attention is inconsistent"
            )
        heads.append(width // size)
    return tuple(heads)


def forward_patches(model: nn.Module, architecture: Architecture, task: str,
                    pooling: Pooling | None = None) -> list[tuple[nn.Module, Forward]]:
    """(module, forward) for every module the export runs, in model order; raises ExportError for a model
    this forward does not describe."""
    if pooling is not None and task != "feature-extraction":
        raise ExportError(f"a sentence embedding is a feature-extraction output, not one of {task}")
    config = model.config
    position = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if position != "absolute":
        raise ExportError(f"position_embedding_type {position!r}: only absolute positions export")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ExportError("decoder or cross-attention layers do not export; only bidirectional encoders")
    base = model.base_model
    heads = layer_heads(model, architecture)
    activation = _ACTIVATIONS.get(architecture.activation_name(config))
    activations: list[tuple[nn.Module, Forward]] = []

    def own_activation(module: object) -> None:
        if activation is not None and isinstance(module, nn.Module):
            activations.append((module, activation))

    patches = architecture.export_patches(model, heads, own_activation) + activations
    if model is base:
        if task != "feature-extraction":
            raise ExportError(f"task {task!r} needs a task head; {type(model).__name__} has none")
        patches[0] = (base, _feature_extraction(patches[0][1], pooling))
    else:
        patches.insert(0, (model, _task_head(model, architecture, task, patches, pooling)))
    return patches


def _gelu(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x)


def _relu(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.relu(x)


#: Activations by config name (``hidden_act``, DistilBERT ``activation``) that the export writes itself.
_ACTIVATIONS: dict[str, Forward] = {"gelu": _gelu, "relu": _relu}


# --- task heads (the top-level model) ------------------------------------------------------------------------


def _feature_extraction(base_forward: Forward, pooling: Pooling | None) -> Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        sequence_output, _ = base_forward(self, input_ids, attention_mask, token_type_ids)
        if pooling is None:
            return (sequence_output,)
        return sequence_output, torch_pool(sequence_output, attention_mask, pooling)

    return forward


def _task_head(model: nn.Module, architecture: Architecture, task: str,
               patches: list[tuple[nn.Module, Forward]], pooling: Pooling | None = None) -> Forward:
    """The top-level forward: base model, then the head 4.57 put on it for ``task``."""
    if (own := architecture.task_head(model, task)) is not None:
        _require(model, own[0], task)
        head = own[1]
    elif task == "feature-extraction":
        head = _last_hidden_state
    elif task == "question-answering":
        _require(model, ("qa_outputs",), task)
        head = _question_answering
    elif task == "token-classification":
        _require(model, ("classifier",), task)
        head = _token_classification
    elif task == "text-classification" and isinstance(getattr(model, "classifier", None), nn.Linear):
        if getattr(model.base_model, "pooler", None) is None:
            raise ExportError(f"{type(model).__name__} classifies the pooled output but has no pooler")
        head = _pooled_classification
    elif task == "text-classification" and all(
        isinstance(getattr(getattr(model, "classifier", None), name, None), nn.Linear) for name in ("dense", "out_proj")
    ):
        patches.append((model.classifier, _dense_classification_head))
        head = _sequence_classification
    else:
        raise ExportError(f"no export forward for the {task} head of {type(model).__name__}")
    base_name = model.base_model_prefix
    if len(TASK_OUTPUTS[task]) != (2 if task == "question-answering" else 1):
        raise ExportError(f"task {task!r} outputs {TASK_OUTPUTS[task]} are not what its head computes")

    def forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        sequence_output, pooled_output = getattr(self, base_name)(input_ids, attention_mask, token_type_ids)
        if pooling is not None:
            return sequence_output, torch_pool(sequence_output, attention_mask, pooling)
        if getattr(head, "needs_mask", False):  # a head that pools over the tokens (ModernBERT's mean)
            return head(self, sequence_output, pooled_output, attention_mask)
        return head(self, sequence_output, pooled_output)

    return forward


def _require(model: nn.Module, names: tuple[str, ...], task: str) -> None:
    for name in names:
        if not isinstance(getattr(model, name, None), nn.Linear):
            raise ExportError(f"{type(model).__name__} has no Linear {name!r}, which the {task} head needs")


def _last_hidden_state(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (sequence,)


def _question_answering(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    logits = self.qa_outputs(sequence)
    start_logits, end_logits = logits.split(1, dim=-1)
    return start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()


def _token_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (self.classifier(sequence),)


def _pooled_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (self.classifier(pooled),)


def _sequence_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (self.classifier(sequence),)


def _dense_classification_head(self: nn.Module, features: torch.Tensor) -> torch.Tensor:
    x = features[:, 0, :]
    x = self.dense(x)
    x = torch.tanh(x)
    return self.out_proj(x)

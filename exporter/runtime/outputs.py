"""Graph output names per task, and which of them are token-level (no torch: the runtime and verify read them)."""

from __future__ import annotations

# Output names as optimum's exporters use them, per task.
TASK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "feature-extraction": ("last_hidden_state",),
    "text-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
    "token-classification": ("logits",),
}

TASKS: tuple[str, ...] = tuple(TASK_OUTPUTS)
"""The four tasks, in one place for the export and the deployment side."""

SENTENCE_OUTPUT = "sentence_embedding"


def output_names(task: str, sentence: bool = False) -> tuple[str, ...]:
    """The graph outputs of `task`; a sentence-transformers feature extractor adds ``sentence_embedding``."""
    return TASK_OUTPUTS[task] + ((SENTENCE_OUTPUT,) if sentence else ())


def token_level(task: str, name: str) -> bool:
    """Whether output `name` of `task` has one row per token (batch, sequence, ...), so padding is masked."""
    return task != "text-classification" and name != SENTENCE_OUTPUT

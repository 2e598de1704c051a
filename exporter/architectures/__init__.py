"""Registry of supported transformer families; importing this package registers every entry."""

from exporter.architectures import (  # noqa: F401  (registration side effect)
    bert,
    distilbert,
    electra,
    modernbert,
    mpnet,
    roberta,
    xlm_roberta,
)
from exporter.architectures.base import (
    TASK_OUTPUTS,
    TASKS,
    Architecture,
    LayerView,
    architecture_for,
    infer_task,
    register,
    supported,
)

__all__ = [
    "TASKS",
    "TASK_OUTPUTS",
    "Architecture",
    "LayerView",
    "architecture_for",
    "infer_task",
    "register",
    "supported",
]

"""What an institution runs in federated rounds: the Flower ClientApp and its task."""

from __future__ import annotations

__all__ = [
    "Task",
    "TaskError",
    "TrainConfig",
    "load_task",
    "make_client_app",
    "make_task",
]

import importlib
from typing import Any

_LAZY = {
    "Task": "fed_clients.task",
    "TaskError": "fed_clients.task",
    "load_task": "fed_clients.task",
    "make_task": "fed_clients.task",
    "TrainConfig": "fed_clients.train",
    "make_client_app": "fed_clients.app",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

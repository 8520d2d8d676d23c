"""Federated rounds with Flower: the server side, committing each round as a version."""

from __future__ import annotations

__all__ = [
    "FederationConfig",
    "LocalDeployment",
    "SparseFedAvg",
    "make_server_app",
    "run_simulation_rounds",
]

import importlib
from typing import Any

_LAZY = {
    "FederationConfig": "param_server.federation.config",
    "make_server_app": "param_server.federation.server",
    "SparseFedAvg": "param_server.federation.strategies",
    "LocalDeployment": "param_server.launch.deploy",
    "run_simulation_rounds": "param_server.launch.simulation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

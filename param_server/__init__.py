"""The MoE parameter server: versioned store, gRPC service, checkpoints and CLI."""

from __future__ import annotations

import importlib
from typing import Any

from param_server.core.errors import (
    AuthenticationError,
    BusyError,
    IntegrityError,
    InvalidInputError,
    ListenError,
    NotFoundError,
    ParamServerError,
    PermissionDeniedError,
    ReadOnlyStoreError,
    RedisMissingError,
    RedisStartError,
    SchemaMismatchError,
    StaleParentError,
    StoreInUseError,
    StoreIOError,
    UnavailableError,
)
from param_server.core.manifest import (
    FileEntry,
    Manifest,
    ShardEntry,
    TensorInfo,
    VersionInfo,
)
from param_server.core.results import CommitResult, GcResult
from param_server.security import Credentials, Role, TokenTable
from param_server.store import Store

# Heavy imports (torch, grpc) load on first use, so the store stays fast to import.
_LAZY = {
    "ServerConfig": "param_server.service",
    "create_server": "param_server.service",
    "serve": "param_server.service",
    "import_checkpoint": "param_server.checkpoints",
    "export_checkpoint": "param_server.checkpoints",
    "Announcement": "param_server.announce",
    "Announcer": "param_server.announce",
    "EmbeddedRedis": "param_server.redis_server",
}

__all__ = [
    "Announcement",
    "Announcer",
    "AuthenticationError",
    "BusyError",
    "CommitResult",
    "Credentials",
    "EmbeddedRedis",
    "FileEntry",
    "GcResult",
    "IntegrityError",
    "InvalidInputError",
    "ListenError",
    "Manifest",
    "NotFoundError",
    "ParamServerError",
    "PermissionDeniedError",
    "ReadOnlyStoreError",
    "RedisMissingError",
    "RedisStartError",
    "Role",
    "SchemaMismatchError",
    "ServerConfig",
    "ShardEntry",
    "StaleParentError",
    "Store",
    "StoreIOError",
    "StoreInUseError",
    "TensorInfo",
    "TokenTable",
    "UnavailableError",
    "VersionInfo",
    "create_server",
    "export_checkpoint",
    "import_checkpoint",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'param_server' has no attribute {name!r}")

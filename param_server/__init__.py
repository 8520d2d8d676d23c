"""The MoE parameter server: versioned store, gRPC service, checkpoints and CLI.

Packages: `core` (the contract every side shares), `store`, `server` (the
daemon), `client`, `federation` (the server side of Flower rounds; its wire
format is importable alone), `launch` and `cli`. Importing this package
loads only the contract; the rest loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from param_server.core.auth import Credentials, Role
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

if TYPE_CHECKING:  # what the lazy names below are, for type checkers
    from param_server.core.announcements import Announcement
    from param_server.server.announce import Announcer
    from param_server.server.config import ServerConfig
    from param_server.server.redis_server import EmbeddedRedis
    from param_server.server.security import TokenTable
    from param_server.server.service import create_server, serve
    from param_server.store import Store
    from param_server.store.checkpoints import export_checkpoint, import_checkpoint

# The sides load on first use, so that importing the contract (or a client)
# never loads the server.
_LAZY = {
    "Store": "param_server.store",
    "TokenTable": "param_server.server.security",
    "ServerConfig": "param_server.server.config",
    "create_server": "param_server.server.service",
    "serve": "param_server.server.service",
    "import_checkpoint": "param_server.store.checkpoints",
    "export_checkpoint": "param_server.store.checkpoints",
    "Announcement": "param_server.core.announcements",
    "Announcer": "param_server.server.announce",
    "EmbeddedRedis": "param_server.server.redis_server",
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

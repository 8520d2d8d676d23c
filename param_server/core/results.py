"""What write operations report, the same whether done on a store or
through a daemon."""

from __future__ import annotations

from dataclasses import dataclass, field

from param_server.core.manifest import Manifest


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What a commit did."""

    manifest: Manifest
    blobs_written: int
    bytes_written: int


@dataclass(slots=True)
class GcResult:
    """What garbage collection dropped (or would drop, in a dry run)."""

    dropped_versions: list[tuple[str, int]] = field(default_factory=list)
    blobs_deleted: int = 0
    bytes_freed: int = 0

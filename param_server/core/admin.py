"""What administration asks of versions, the same of a store opened
directly and of a daemon through its client (both satisfy `VersionAdmin`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from param_server.core.manifest import VersionInfo
from param_server.core.results import GcResult


class VersionAdmin(Protocol):
    """Listing, rollback, pins and garbage collection of versions."""

    def list_versions(self, model: str) -> list[VersionInfo]: ...

    def rollback(
        self, model: str, version: int, *, author: str = "", message: str = ""
    ) -> tuple[int, int]:
        """Moves HEAD to `version`; returns (previous, new) HEAD."""
        ...

    def set_pin(self, model: str, version: int, pinned: bool = True) -> Sequence[int]:
        """Pins (or unpins) `version`; returns the pinned versions."""
        ...

    def collect_garbage(self, keep_last: int = 10, dry_run: bool = False) -> GcResult:
        """Drops old versions and the blobs only they used; returns what went."""
        ...

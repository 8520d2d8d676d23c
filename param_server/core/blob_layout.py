"""Where a store keeps blobs, as far as a client on the same host needs to
know: GetStoreInfo names the blob root and the store's id, and a client
that finds the same id in the store's STORE_ID file maps blob files
directly instead of streaming them."""

from __future__ import annotations

from pathlib import Path

STORE_ID_FILE = "STORE_ID"
"""In the store's root (the blob root's parent): the store's random id."""


def blob_path(blob_root: Path, digest: str) -> Path:
    """The file of blob `digest` under `blob_root` (fanned out by its first
    two hex digits)."""
    return blob_root / digest[:2] / digest


def store_id_path(blob_root: Path) -> Path:
    return blob_root.parent / STORE_ID_FILE

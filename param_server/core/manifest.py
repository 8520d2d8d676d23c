"""Immutable version manifests: shard keys to content digests, with provenance."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """A tensor inside a shard: its checkpoint name, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    stacked: bool = False
    """True when this is one expert's slice of a fused [num_experts, ...] tensor."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One content-addressed safetensors blob of a version."""

    key: str
    digest: str
    size: int
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A model file (config.json and similar) stored as a blob."""

    name: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """An immutable version of a model."""

    model: str
    version: int
    parent: int
    """Version this one was committed on; 0 for the first version."""
    created_at: str
    author: str
    message: str
    metadata: dict[str, Any]
    shards: dict[str, ShardEntry]
    files: dict[str, FileEntry] = field(default_factory=dict)
    changed: tuple[str, ...] = ()
    """Shard keys whose digests differ from the parent's (or new ones)."""

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards.values())

    def digests(self) -> set[str]:
        """Every blob digest this version references (shards and files)."""
        return {s.digest for s in self.shards.values()} | {
            f.digest for f in self.files.values()
        }

    def diff(self, old: Manifest | None) -> tuple[dict[str, str], tuple[str, ...]]:
        """(shard key -> digest of shards that are new or differ from `old`,
        sorted keys of `old` that this version no longer has)."""
        before = old.shards if old is not None else {}
        changed = {
            k: s.digest
            for k, s in sorted(self.shards.items())
            if k not in before or before[k].digest != s.digest
        }
        return changed, tuple(sorted(set(before) - set(self.shards)))

    # --- JSON (on disk) -------------------------------------------------------

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_VERSION,
            "model": self.model,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "author": self.author,
            "message": self.message,
            "metadata": self.metadata,
            "changed": list(self.changed),
            "files": {
                n: {"digest": f.digest, "size": f.size}
                for n, f in sorted(self.files.items())
            },
            "shards": {
                k: {
                    "digest": s.digest,
                    "size": s.size,
                    "tensors": [
                        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                        | ({"stacked": True} if t.stacked else {})
                        for t in s.tensors
                    ],
                }
                for k, s in sorted(self.shards.items())
            },
        }
        # Compact: indent would force the pure-Python encoder (~25x slower on
        # a manifest of thousands of shards).
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        doc = json.loads(data)
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported manifest format {doc.get('format')!r}")
        return cls(
            model=doc["model"],
            version=doc["version"],
            parent=doc["parent"],
            created_at=doc["created_at"],
            author=doc["author"],
            message=doc["message"],
            metadata=doc["metadata"],
            changed=tuple(doc["changed"]),
            files={
                n: FileEntry(n, f["digest"], f["size"]) for n, f in doc["files"].items()
            },
            shards={
                k: ShardEntry(
                    k,
                    s["digest"],
                    s["size"],
                    tuple(
                        TensorInfo(
                            t["name"],
                            t["dtype"],
                            tuple(t["shape"]),
                            t.get("stacked", False),
                        )
                        for t in s["tensors"]
                    ),
                )
                for k, s in doc["shards"].items()
            },
        )


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A live version as listed: its number and provenance summary."""

    version: int
    parent: int
    created_at: str
    author: str
    message: str
    pinned: bool
    head: bool
    num_changed: int

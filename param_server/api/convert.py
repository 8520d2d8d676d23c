"""Between the domain types of `param_server.core` and their protobuf messages."""

from __future__ import annotations

import dataclasses
import json

from param_server.api.v1 import param_server_pb2 as pb
from param_server.core.manifest import (
    FileEntry,
    Manifest,
    ShardEntry,
    TensorInfo,
    VersionInfo,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParamServer"].full_name
# Field numbers of the `bytes data` fields in FetchChunk and CommitRequest
# (see param_server.core.framing).
FETCH_DATA_FIELD = pb.FetchChunk.DESCRIPTOR.fields_by_name["data"].number
COMMIT_DATA_FIELD = pb.CommitRequest.DESCRIPTOR.fields_by_name["data"].number

_VERSION_FIELDS = tuple(f.name for f in dataclasses.fields(VersionInfo))


def shard_to_proto(s: ShardEntry) -> pb.ShardEntry:
    return pb.ShardEntry(
        key=s.key,
        digest=s.digest,
        size=s.size,
        tensors=[
            pb.TensorInfo(
                name=t.name, dtype=t.dtype, shape=list(t.shape), stacked=t.stacked
            )
            for t in s.tensors
        ],
    )


def manifest_to_proto(m: Manifest, *, shards: bool = True) -> pb.Manifest:
    """The wire form; without `shards`, only provenance and files."""
    return pb.Manifest(
        model=m.model,
        version=m.version,
        parent=m.parent,
        created_at=m.created_at,
        author=m.author,
        message=m.message,
        metadata_json=json.dumps(m.metadata),
        changed=list(m.changed) if shards else [],
        files=[
            pb.FileEntry(name=f.name, digest=f.digest, size=f.size)
            for f in m.files.values()
        ],
        shards=[shard_to_proto(s) for s in m.shards.values()] if shards else [],
    )


def manifest_from_proto(m: pb.Manifest) -> Manifest:
    return Manifest(
        model=m.model,
        version=m.version,
        parent=m.parent,
        created_at=m.created_at,
        author=m.author,
        message=m.message,
        metadata=json.loads(m.metadata_json) if m.metadata_json else {},
        changed=tuple(m.changed),
        files={f.name: FileEntry(f.name, f.digest, f.size) for f in m.files},
        shards={
            s.key: ShardEntry(
                s.key,
                s.digest,
                s.size,
                tuple(
                    TensorInfo(t.name, t.dtype, tuple(t.shape), t.stacked)
                    for t in s.tensors
                ),
            )
            for s in m.shards
        },
    )


def version_to_proto(v: VersionInfo) -> pb.VersionInfo:
    return pb.VersionInfo(**{f: getattr(v, f) for f in _VERSION_FIELDS})


def version_from_proto(v: pb.VersionInfo) -> VersionInfo:
    return VersionInfo(*(getattr(v, f) for f in _VERSION_FIELDS))

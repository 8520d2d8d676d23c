"""What travels over Redis, and the names other tools follow.

Channel ``paramserver:versions:<model>`` carries one JSON message per HEAD
move of the model (see `Announcement`). Pub/sub is a hint, never the truth:
a subscriber reconciles against the server's manifest, so a lost, duplicated,
reordered or forged message can at most cause a manifest check. Nodes
publish each version they apply on ``paramserver:applied:<model>`` and keep
their status (`NodeStatus`) under ``paramserver:nodes:<model>:<node>``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from param_server.core.errors import InvalidInputError
from param_server.core.manifest import Manifest
from param_server.core.names import check_model_name, check_shard_key

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "paramserver:versions:"
"""Followed by the model name: where a model's versions are announced."""
NODE_KEY_PREFIX = "paramserver:nodes:"
"""Followed by ``<model>:<node id>``: a node's status, expiring with its heartbeat."""
APPLIED_PREFIX = "paramserver:applied:"
"""Followed by the model name: nodes publish here each version they apply."""
MESSAGE_FORMAT = 1
_KINDS = ("commit", "rollback", "head")
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def channel(model: str) -> str:
    """The pub/sub channel of `model`'s announcements."""
    return CHANNEL_PREFIX + check_model_name(model)


def redact(url: str) -> str:
    """`url` without its password (safe to log or hand to clients)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def redis_client(url: str, *, timeout: float = 2.0) -> redis.Redis:
    """A redis-py client from a redis://, rediss:// or unix:// URL.

    Passwords, ACL users and TLS options travel in the URL as redis-py
    accepts them (``rediss://user:secret@host:6380/0?ssl_cert_reqs=required``).

    Raises:
        InvalidInputError: the URL cannot be parsed.
    """
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=10,
            # Callers have their own reconnect loops; redis-py's default
            # backoff would add seconds before noticing Redis is back.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        )
    except ValueError as e:
        raise InvalidInputError(
            f"cannot use Redis URL {redact(url)!r}: {e}; expected "
            "redis://[user:password@]host:port[/db], rediss://... or unix:///path"
        ) from e


@dataclass(frozen=True, kw_only=True, slots=True)
class Announcement:
    """One HEAD move of a model, as published (JSON, one object per message)."""

    kind: str
    """"commit", "rollback", or "head" (a catch-up after an outage or on start)."""
    model: str
    version: int
    """The model's HEAD after the move."""
    previous: int
    """HEAD before the move (0 when unknown or for a new model)."""
    parent: int
    """The parent version of `version`."""
    changed: dict[str, str] = field(default_factory=dict)
    """Shard key -> digest of shards that differ from `previous`."""
    removed: tuple[str, ...] = ()
    """Shard keys `previous` had and `version` has not."""
    time: str = ""
    """When HEAD moved (RFC 3339, UTC)."""
    seq: int = 0
    """The store's history sequence number of the move."""
    store_id: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Author, message and a summary of the version's metadata."""

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": MESSAGE_FORMAT,
                "kind": self.kind,
                "model": self.model,
                "version": self.version,
                "previous": self.previous,
                "parent": self.parent,
                "changed": self.changed,
                "removed": list(self.removed),
                "time": self.time,
                "seq": self.seq,
                "store_id": self.store_id,
                "provenance": self.provenance,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Announcement:
        """Parses and checks a message.

        Raises:
            InvalidInputError: not an announcement of this format.
        """
        if len(data) > _MAX_MESSAGE_BYTES:
            raise InvalidInputError(f"announcement of {len(data)} bytes is too large")
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"announcement is not JSON: {e}") from e
        if not isinstance(d, dict) or d.get("format") != MESSAGE_FORMAT:
            raise InvalidInputError(
                f"announcement is not a format-{MESSAGE_FORMAT} object"
            )
        ints = ("version", "previous", "parent", "seq")
        if d.get("kind") not in _KINDS or not all(
            type(d.get(k)) is int and d[k] >= 0 for k in ints
        ):
            raise InvalidInputError(
                f"announcement needs kind in {_KINDS} and non-negative integers {ints}"
            )
        changed = d.get("changed", {})
        removed = d.get("removed", [])
        if not isinstance(changed, dict) or not isinstance(removed, list):
            raise InvalidInputError("announcement changed/removed are malformed")
        for key in [*changed, *removed]:
            check_shard_key(key)
        prov = d.get("provenance", {})
        return cls(
            kind=d["kind"],
            model=check_model_name(d.get("model")),
            version=d["version"],
            previous=d["previous"],
            parent=d["parent"],
            changed={str(k): str(v) for k, v in changed.items()},
            removed=tuple(str(k) for k in removed),
            time=str(d.get("time", "")),
            seq=d["seq"],
            store_id=str(d.get("store_id", "")),
            provenance=prov if isinstance(prov, dict) else {},
        )


def provenance_summary(m: Manifest) -> dict[str, Any]:
    """Provenance small enough for a message: scalars only, strings cut."""

    def cut(v: Any) -> Any:
        return v[:200] if isinstance(v, str) else v

    meta = {
        k: cut(v)
        for k, v in list(m.metadata.items())[:16]
        if isinstance(v, str | int | float | bool) or v is None
    }
    return {
        "author": cut(m.author),
        "message": cut(m.message),
        "created_at": m.created_at,
        "metadata": meta,
    }


@dataclass(slots=True)
class NodeStatus:
    """What a node reports about itself (also the JSON of its Redis key)."""

    node: str
    model: str
    host: str
    pid: int
    applied_version: int
    head_version: int
    """The newest version this node has heard of from the server."""
    pinned_version: int | None
    swaps: int
    last_swap: float | None
    """Unix time of the last swap applied."""
    last_swap_ms: float | None
    """From learning of the version to applying it."""
    last_flip_us: float | None
    """How long the pointer flip itself took."""
    pending_version: int | None
    resident_experts: int
    resident_bytes: int
    budget_bytes: int
    hits: int
    misses: int
    hit_rate: float
    errors: int
    last_error: str | None
    redis_connected: bool
    heartbeat_interval: float
    outages: int = 0
    """Checks that failed because the server could not be reached; they are
    retried with backoff and are not counted in `errors`."""
    updated: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str) -> NodeStatus:
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def node_status_key(model: str, node: str) -> str:
    return f"{NODE_KEY_PREFIX}{model}:{node}"


def read_fleet(r: redis.Redis, model: str | None = None) -> list[NodeStatus]:
    """Every live node's status (expired heartbeats are gone), sorted."""
    pattern = f"{NODE_KEY_PREFIX}{model + ':' if model else ''}*"
    keys = sorted(r.scan_iter(match=pattern, count=500))
    out = []
    for data in r.mget(keys) if keys else []:
        if data is None:
            continue  # expired between SCAN and MGET
        try:
            out.append(NodeStatus.from_json(data))
        except (ValueError, TypeError, KeyError) as e:
            logger.warning("ignoring a malformed node status: %s", e)
    return sorted(out, key=lambda s: (s.model, s.node))

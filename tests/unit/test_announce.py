"""Announcement messages and Redis URLs (no Redis needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from param_server.core.announcements import Announcement, NodeStatus, redact
from param_server.core.errors import InvalidInputError


def _message(**kw: Any) -> bytes:
    base: dict[str, Any] = {"format": 1, "kind": "commit", "model": "m"}
    base.update(version=2, previous=1, parent=1, seq=2, changed={}, removed=[])
    base.update(kw)
    return json.dumps(base).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        _message(format=2),
        _message(kind="delete"),
        _message(version=-1),
        _message(version="2"),
        _message(model="../etc"),
        _message(changed={"../x": "00"}),
        _message(changed=["x"]),
    ],
)
def test_malformed_announcements_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInputError):
        Announcement.from_json(data)


def test_announcement_round_trips() -> None:
    a = Announcement(
        kind="rollback",
        model="m",
        version=3,
        previous=5,
        parent=2,
        changed={"layers.0.experts.1": "a" * 64},
        removed=("layers.1.dense",),
        time="2026-01-01T00:00:00Z",
        seq=9,
        store_id="s",
        provenance={"author": "x"},
    )
    assert Announcement.from_json(a.to_json()) == a


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:secret@h:6380/2?x=1", "rediss://user:***@h:6380/2?x=1"),
    ],
)
def test_passwords_never_leave_in_urls(url: str, want: str) -> None:
    assert redact(url) == want


def test_node_status_ignores_unknown_fields() -> None:
    s = NodeStatus(
        node="n", model="m", host="h", pid=1, applied_version=1, head_version=1,
        pinned_version=None, swaps=0, last_swap=None, last_swap_ms=None,
        last_flip_us=None, pending_version=None, resident_experts=0,
        resident_bytes=0, budget_bytes=1, hits=0, misses=0, hit_rate=0.0,
        errors=0, last_error=None, redis_connected=True, heartbeat_interval=1.0,
    )  # fmt: skip
    d = json.loads(s.to_json())
    d["from_a_newer_node"] = 1
    assert NodeStatus.from_json(json.dumps(d)) == s

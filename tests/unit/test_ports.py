"""Ports for servers that are restarted where their clients look."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from param_server.server import redis_server
from param_server.server.redis_server import free_port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_free_ports_lie_outside_the_ephemeral_range() -> None:
    """While a server is down, an outgoing connection (or a client retrying
    against it, connecting to itself) can take an ephemeral port; ours are
    never in that range, so a restart finds its port."""
    eph = redis_server._ephemeral_ports()
    rng = random.Random(3)
    ports = [free_port(rng) for _ in range(200)]
    assert not [p for p in ports if p in eph]
    assert all(p >= 10_000 for p in ports)
    assert len(set(ports)) > 150  # spread, so concurrent callers rarely collide
    assert _bindable(ports[0])


def test_a_port_in_use_is_skipped() -> None:
    first = free_port(random.Random(5))
    with socket.socket() as held:
        held.bind(("127.0.0.1", first))
        held.listen()
        assert free_port(random.Random(5)) != first


def test_with_no_room_outside_the_kernel_chooses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "ip_local_port_range"
    whole.write_text("1024\t65535\n")
    monkeypatch.setattr(redis_server, "_EPHEMERAL_RANGE", whole)
    assert redis_server._ephemeral_ports() == range(1024, 65536)
    assert 1024 <= free_port() <= 65535

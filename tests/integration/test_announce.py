"""Announcements on a real redis-server, and the daemon's private Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from param_server.client import ParamClient
from param_server.core import tensor_codec
from param_server.core.announcements import Announcement, channel, redis_client
from param_server.core.errors import UnavailableError
from param_server.launch.daemon import spawn_daemon
from param_server.server.announce import Announcer
from param_server.server.config import ServerConfig
from param_server.server.redis_server import EmbeddedRedis, free_port
from param_server.server.service import create_server
from param_server.store import Store
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


class Listener:
    """A subscriber that collects the announcements of one model."""

    def __init__(self, url: str, model: str) -> None:
        self.pubsub = redis_client(url).pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.subscribe(channel(model))
        self.pubsub.get_message(timeout=5)  # the subscribe confirmation

    def next(self, timeout: float = 5.0) -> Announcement:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=0.1)
            if msg is not None and msg["type"] == "message":
                return Announcement.from_json(msg["data"])
        raise AssertionError("no announcement")


def shard(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4, 4), value)}


@pytest.fixture
def served(
    tmp_path: Path, redis_srv: EmbeddedRedis
) -> Iterator[tuple[ParamClient, Announcer]]:
    root = tmp_path / "store"
    announcer = Announcer(Store(root), redis_srv.url, poll_interval=0.1)
    srv, port, _ = create_server(
        ServerConfig(store=root, listen="127.0.0.1:0"), announcer=announcer
    )
    srv.start()
    announcer.start()
    with ParamClient(f"127.0.0.1:{port}", same_host=False, retries=1) as c:
        yield c, announcer
    announcer.stop()
    srv.stop(0).wait()


def test_commit_and_rollback_are_announced(
    served: tuple[ParamClient, Announcer], redis_srv: EmbeddedRedis
) -> None:
    client, _ = served
    assert client.announce_url() == redis_srv.url
    sub = Listener(redis_srv.url, "m")
    shards = {"layers.0.experts.0": shard(1), "global": shard(0)}
    v1 = client.commit("m", 0, shards, author="ann", message="first").manifest
    a = sub.next()
    assert (a.kind, a.model, a.version, a.parent, a.previous) == (
        "commit",
        "m",
        1,
        0,
        0,
    )
    assert a.changed == {k: s.digest for k, s in v1.shards.items()}
    assert a.provenance["author"] == "ann" and a.provenance["message"] == "first"
    v2 = client.commit(
        "m", 1, {"layers.0.experts.0": shard(2)}, metadata={"round": 3, "big": [1] * 9}
    ).manifest
    a = sub.next()
    assert (a.kind, a.version, a.previous) == ("commit", 2, 1)
    assert a.changed == {"layers.0.experts.0": v2.shards["layers.0.experts.0"].digest}
    assert a.provenance["metadata"] == {"round": 3}  # scalars only: messages stay small
    client.rollback("m", 1)
    a = sub.next()
    assert (a.kind, a.version, a.previous) == ("rollback", 1, 2)
    assert a.changed == {"layers.0.experts.0": v1.shards["layers.0.experts.0"].digest}


def test_commits_by_other_writers_of_the_store_are_announced(
    served: tuple[ParamClient, Announcer], redis_srv: EmbeddedRedis, tmp_path: Path
) -> None:
    client, announcer = served
    client.commit("m", 0, {"global": shard(0)})
    wait_until(lambda: announcer.published >= 1, 5, "the first announcement")
    sub = Listener(redis_srv.url, "m")
    store = Store(tmp_path / "store")  # like `param-server import` beside the daemon
    with store.staging() as st:
        st.add("global", tensor_codec.encode(shard(5)))
        store.commit("m", 1, st)
    a = sub.next()
    assert (a.kind, a.version) == ("commit", 2)


def test_commits_go_on_while_redis_is_down_then_a_catch_up_is_sent(
    served: tuple[ParamClient, Announcer], redis_srv: EmbeddedRedis
) -> None:
    client, announcer = served
    client.commit("m", 0, {"global": shard(0)})
    wait_until(lambda: announcer.published >= 1, 5, "the first announcement")
    redis_srv.kill()
    for v in range(1, 4):
        client.commit("m", v, {"global": shard(v)})  # never blocked by Redis
    # Had Redis come back before the announcer tried it, there would have been
    # no outage to catch up on, only three late commit messages.
    wait_until(lambda: not announcer.redis_up, 10, "the announcer to miss Redis")
    assert announcer.published == 1
    redis_srv.start()
    wait_until(lambda: announcer.published >= 2, 10, "the catch-up")
    a = announcer.last
    assert a is not None  # one message, not three: nodes reconcile anyway
    assert (a.kind, a.version, a.previous, announcer.published) == ("head", 4, 1, 2)
    assert set(a.changed) == {"global"}


def test_embedded_redis_is_supervised() -> None:
    with EmbeddedRedis(supervise=True).start() as r:
        port = r.port
        r.kill()
        wait_until(lambda: r.restarts == 1, 10, "the restart")
        assert r.port == port
        assert redis_client(r.url).ping()


def test_a_taken_port_is_named_as_the_reason_redis_did_not_start() -> None:
    port = free_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        r = EmbeddedRedis(port=port, supervise=False)
        try:
            with pytest.raises(UnavailableError, match="Address already in use"):
                r.start(timeout=5)
        finally:
            r.stop()


def test_daemon_starts_a_private_redis_that_dies_with_it(tmp_path: Path) -> None:
    d = spawn_daemon(tmp_path / "store")
    with ParamClient(d.target, same_host=False, retries=0) as c:
        url = c.announce_url()
        assert url is not None and url.startswith("redis://127.0.0.1:")
        sub = Listener(url, "m")
        c.commit("m", 0, {"global": shard(1)})
        assert sub.next().version == 1
    d.proc.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
    d.proc.wait()
    r = redis.Redis.from_url(url, socket_connect_timeout=0.2)

    def gone() -> bool:
        try:
            r.ping()
            return False
        except redis.ConnectionError:
            return True

    wait_until(gone, 10, "the private redis-server to exit")
    # A restarted daemon takes the same port again, so nodes find it.
    with spawn_daemon(tmp_path / "store") as d2, ParamClient(d2.target) as c2:
        assert c2.announce_url() == url


def test_serve_without_redis_server_installed_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no redis-server on it
    r = subprocess.run(
        [sys.executable, "-m", "param_server.cli", "serve", "--store",
         str(tmp_path / "s"), "--listen", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 11, r.stderr
    assert "redis-server is not installed" in r.stderr and "--redis" in r.stderr

"""Hot swaps on live models: real redis-server, real gRPC server, real transformers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import torch
from click.testing import CliRunner

from loaders.hotswap import HotSwapper
from loaders.models import LazyModel, load_lazy_model
from param_server.cli import main
from param_server.client import ParamClient
from param_server.core import tensor_codec
from param_server.core.announcements import channel, redis_client
from param_server.core.shards import expert_key
from param_server.launch.daemon import spawn_daemon
from param_server.server.announce import Announcer
from param_server.server.config import ServerConfig
from param_server.server.redis_server import EmbeddedRedis, free_port
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import export_checkpoint, import_checkpoint
from tests.conftest import Checkpoint
from tests.helpers import wait_until
from tests.integration.test_lazy import PROMPT, eager
from tests.tls import make_pki

pytestmark = pytest.mark.integration
MODEL = "mx"


@dataclass
class Live:
    """A store with a model, a gRPC server and an announcer on a real Redis."""

    root: Path
    target: str
    redis: EmbeddedRedis
    client: ParamClient
    refs: dict[tuple[int, str], str] = field(default_factory=dict)
    nodes: list[tuple[LazyModel, HotSwapper]] = field(default_factory=list)

    def node(
        self,
        fraction: float = 0.5,
        implementation: str | None = "eager",
        width: str = "full",
        keep_narrow: bool = False,
        host_budget_bytes: int | None = None,
        **kw: object,
    ) -> tuple[LazyModel, HotSwapper]:
        """A live lazy model on its own connection, with a started swapper."""
        c = ParamClient(self.target, same_host=False, retries=2, backoff=0.05)
        sizes = [
            s.size for k, s in c.get_manifest(MODEL).shards.items() if ".experts." in k
        ]
        lm = load_lazy_model(
            c,
            MODEL,
            budget_bytes=max(max(sizes), int(sum(sizes) * fraction)),
            experts_implementation=implementation,
            width=width,
            keep_narrow=keep_narrow,
            host_budget_bytes=host_budget_bytes,
        )
        kw.setdefault("heartbeat_interval", 0.5)
        kw.setdefault("reconcile_interval", 600.0)  # announcements must do it
        sw = HotSwapper(lm, **kw).start()  # type: ignore[arg-type]
        self.nodes.append((lm, sw))
        wait_until(lambda: sw.status().redis_connected, 10, "the subscription")
        return lm, sw

    def bump(
        self,
        *,
        experts: tuple[tuple[int, int], ...] = (),
        dense: tuple[str, ...] = (),
        seed: int = 0,
    ) -> int:
        """Commits a version whose given shards are perturbed; returns it."""
        m = self.client.get_manifest(MODEL)
        keys = [expert_key(layer, e) for layer, e in experts] + list(dense)
        g = torch.Generator().manual_seed(seed)
        shards = {}
        for key, buf in self.client.fetch_blobs(m, keys).items():
            shards[key] = {
                n: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)
                for n, t in tensor_codec.decode(buf, key).items()
            }
        return self.client.commit(MODEL, m.version, shards).manifest.version

    def ref(self, version: int, tmp: Path, implementation: str = "eager") -> str:
        """SHA-256 of the resident model's logits for PROMPT at `version`
        (transformers' eager experts loop unless another is named)."""
        if (version, implementation) not in self.refs:
            dest = tmp / f"v{version}"
            if not dest.exists():
                export_checkpoint(Store(self.root), MODEL, dest, version=version)
            with torch.no_grad():
                self.refs[(version, implementation)] = digest(
                    eager(dest, implementation)(PROMPT).logits
                )
        return self.refs[(version, implementation)]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def logits(lm: LazyModel) -> str:
    with torch.no_grad():
        return digest(lm.model(PROMPT).logits)


@pytest.fixture
def live(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    checkpoints: dict[str, Checkpoint],
    redis_srv: EmbeddedRedis,
) -> Iterator[Live]:
    """Served as MODEL: mixtral-float32, or the checkpoint named by indirect
    parametrisation."""
    tag = getattr(request, "param", "mixtral-float32")
    root = tmp_path / "store"
    import_checkpoint(Store(root), checkpoints[tag].path, MODEL)
    announcer = Announcer(Store(root), redis_srv.url, poll_interval=0.2)
    srv, port, _ = create_server(
        ServerConfig(store=root, listen="127.0.0.1:0"), announcer=announcer
    )
    srv.start()
    announcer.start()
    client = ParamClient(f"127.0.0.1:{port}", same_host=False, retries=1)
    live = Live(root, f"127.0.0.1:{port}", redis_srv, client)
    try:
        yield live
    finally:
        for lm, sw in live.nodes:
            sw.stop()
            lm.close()
        client.close()
        announcer.stop()
        srv.stop(0).wait()


@pytest.mark.parametrize(
    "live", ["mixtral-float32", "qwen3_moe-bfloat16"], indirect=True
)
def test_serving_thread_sees_exactly_one_version_per_pass(
    live: Live, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    lm, sw = live.node(0.5, on_error=errors.append)
    seen: list[tuple[int | None, str]] = []
    stop = threading.Event()

    def serve() -> None:
        i = 0
        while not stop.is_set():
            if i % 3 == 2:  # a bare pass: the forward hooks keep it whole
                seen.append((None, logits(lm)))
            else:
                with sw.hold() as v:
                    seen.append((v, logits(lm)))
            i += 1

    t = threading.Thread(target=serve)
    t.start()
    versions = [1]
    # Each change spans layers, so a pass that mixed versions would match none.
    plan: list[dict[str, object]] = [
        {"experts": ((0, 0), (0, 1), (1, 2), (1, 3))},
        {"dense": ("layers.0.dense",), "experts": ((1, 0),)},
        {"dense": ("global", "layers.1.dense")},
        {"experts": tuple((layer, e) for layer in range(2) for e in range(4))},
        {"dense": ("layers.0.dense", "layers.1.dense"), "experts": ((0, 2),)},
    ]
    try:
        for n, change in enumerate(plan):
            v = live.bump(seed=n, **change)  # type: ignore[arg-type]
            versions.append(v)
            wait_until(
                lambda v=v: any(s[0] == v for s in seen),  # type: ignore[misc]
                20,
                f"version {v}",
            )
        n_seen = len(seen)
        wait_until(lambda: len(seen) > n_seen + 3, 20, "a few more passes")
    finally:
        stop.set()
        t.join()
    refs = {v: live.ref(v, tmp_path) for v in versions}
    assert len(set(refs.values())) == len(versions)  # every change shows
    held = [v for v, _ in seen if v is not None]
    for v, out in seen:
        if v is not None:
            assert out == refs[v], f"a pass held on version {v} saw another"
        else:
            assert out in refs.values(), "a bare pass mixed versions"
    assert held == sorted(held), "the applied version went backwards"
    assert set(held) == set(versions)
    assert not errors
    st = sw.status()
    assert st.swaps == len(plan) and st.applied_version == versions[-1]
    assert st.last_flip_us is not None and st.last_flip_us < 100_000
    # Replaced experts of old versions do not linger beside the new ones.
    assert lm.loader.stats().resident_bytes <= lm.loader.budget_bytes


@pytest.mark.parametrize("live", ["mixtral-bfloat16"], indirect=True)
@pytest.mark.parametrize("width", ["int8", "fp8"])
def test_a_node_on_8_bit_experts_serves_and_swaps(live: Live, width: str) -> None:
    """Experts fetched as the server's int8 or fp8 variants, dequantized to
    bf16: the node serves logits close to (not equal to) a full-width node's,
    at half the budget and with every expert in its slot, and a hot swap
    reaches it as the variants of the new experts."""
    full, full_sw = live.node(1.0, implementation=None)
    nodes = [live.node(f, implementation=None, width=width) for f in (1.0, 0.5)]

    def close(lm: LazyModel) -> None:
        with torch.no_grad():
            want = full.model(PROMPT).logits.float()
            got = lm.model(PROMPT).logits.float()
        assert not torch.equal(got, want)
        assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())

    before = []
    for lm, _ in nodes:
        close(lm)
        assert lm.loader.width == width
        before.append(logits(lm))
    v2 = live.bump(experts=((0, 0), (1, 2)))
    for _, sw in [(full, full_sw), *nodes]:
        assert sw.wait_for_version(v2, 10)
    for (lm, sw), old in zip(nodes, before, strict=True):
        assert logits(lm) != old  # the new experts' variants arrived
        close(lm)
        assert sw.status().errors == 0
        st = lm.loader.stats()
        assert st.resident_bytes <= lm.loader.budget_bytes


@pytest.mark.parametrize("live", ["mixtral-bfloat16"], indirect=True)
@pytest.mark.parametrize("width", ["int8", "fp8"])
def test_experts_kept_narrow_until_the_device_serve_the_same_numbers(
    live: Live, width: str
) -> None:
    """What a node on CUDA does with 8-bit experts (forced here on the CPU):
    each kept at its variant's width in the host tier and dequantized when
    it fills a slot. The logits are those of a node that dequantizes on
    arrival, with every expert in its slot and with half in a pool, before
    and after a hot swap, while the host tier holds about half the bytes."""
    pairs = []
    for fraction in (1.0, 0.5):
        pair = [
            live.node(
                fraction,
                implementation=None,
                width=width,
                keep_narrow=keep,
                host_budget_bytes=10**9,
            )
            for keep in (False, True)
        ]
        pairs.append(pair)
        (wide, _), (narrow, _) = pair
        assert narrow.loader.keeps_narrow and not wide.loader.keeps_narrow
        assert logits(narrow) == logits(wide)
    (wide, _), (narrow, _) = pairs[1]
    ratio = narrow.loader.stats().host_bytes / wide.loader.stats().host_bytes
    assert 0.45 < ratio < 0.6, ratio
    before = logits(narrow)
    v2 = live.bump(experts=((0, 0), (1, 2)))
    for pair in pairs:
        for _, sw in pair:
            assert sw.wait_for_version(v2, 10)
            assert sw.status().errors == 0
        (wide, _), (narrow, _) = pair
        assert logits(narrow) == logits(wide)
    assert logits(narrow) != before


@pytest.mark.parametrize("live", ["mixtral-bfloat16"], indirect=True)
def test_a_node_with_every_expert_in_its_slot_swaps_exactly(
    live: Live, tmp_path: Path
) -> None:
    """A full budget: the model runs transformers' default experts
    implementation on its own fused parameters; a hot swap copies the new
    experts into their slots at the flip, and a rollback copies the old ones
    back, each version's logits those of the resident model of it."""
    lm, sw = live.node(1.0, implementation=None)
    impl = lm.experts_implementation
    assert impl == "grouped_mm"
    assert logits(lm) == live.ref(1, tmp_path, impl)
    v2 = live.bump(experts=((0, 0), (0, 3), (1, 1)), dense=("layers.1.dense",))
    assert sw.wait_for_version(v2, 10)
    assert logits(lm) == live.ref(v2, tmp_path, impl) != live.ref(1, tmp_path, impl)
    v3 = live.bump(experts=tuple((layer, e) for layer in range(2) for e in range(4)))
    assert sw.wait_for_version(v3, 10)
    assert logits(lm) == live.ref(v3, tmp_path, impl)
    sw.pin(1)
    assert sw.wait_for_version(1, 10)
    assert logits(lm) == live.ref(1, tmp_path, impl)
    st = lm.loader.stats()
    assert st.resident_bytes <= lm.loader.budget_bytes and sw.status().errors == 0


@pytest.mark.parametrize("live", ["mixtral-bfloat16"], indirect=True)
def test_a_node_with_a_pool_swaps_exactly(live: Live, tmp_path: Path) -> None:
    """Half the experts fit: they run in the pool under grouped_mm. A new
    version's experts come in beside the pool and move into the slots the
    flip frees, so every version's logits are the resident model's."""
    lm, sw = live.node(0.5, implementation="grouped_mm")
    assert lm.loader.pools is not None
    assert logits(lm) == live.ref(1, tmp_path, "grouped_mm")
    v2 = live.bump(experts=((0, 0), (0, 3), (1, 1)), dense=("layers.1.dense",))
    assert sw.wait_for_version(v2, 10)
    assert logits(lm) == live.ref(v2, tmp_path, "grouped_mm")
    v3 = live.bump(experts=tuple((layer, e) for layer in range(2) for e in range(4)))
    assert sw.wait_for_version(v3, 10)
    assert logits(lm) == live.ref(v3, tmp_path, "grouped_mm")
    st = lm.loader.stats()
    assert st.resident_bytes <= lm.loader.budget_bytes and sw.status().errors == 0


def test_generation_holds_one_version(live: Live) -> None:
    lm, sw = live.node(1.0)
    args = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    started, ready = threading.Event(), threading.Event()
    out: dict[str, object] = {}

    def generate() -> None:
        with sw.hold() as v, torch.no_grad():
            started.set()
            ready.wait(10)  # a new version is prepared and waiting
            out["v"] = v
            out["tokens"] = lm.model.generate(PROMPT[:1, :8], **args)
            out["after"] = sw.applied_version

    t = threading.Thread(target=generate)
    t.start()
    started.wait(10)
    v2 = live.bump(dense=("layers.0.dense",), experts=((0, 0), (1, 1)))
    wait_until(lambda: sw.status().pending_version == v2, 10, "v2 to be prepared")
    ready.set()
    t.join()
    assert out["v"] == 1 and out["after"] == 1  # no flip inside the request
    assert sw.wait_for_version(v2, 5)  # applied once the request ended
    sw.pin(1)
    assert sw.wait_for_version(1, 5)
    with torch.no_grad():
        want = lm.model.generate(PROMPT[:1, :8], **args)
    assert torch.equal(want, out["tokens"])  # type: ignore[arg-type]


def test_redis_outage_then_every_node_converges_within_2s(live: Live) -> None:
    nodes = [live.node(0.5) for _ in range(2)]
    live.redis.kill()
    v = 1
    for i in range(3):  # commits go on while Redis is down
        v = live.bump(experts=((0, i),), dense=("global",), seed=i)
    wait_until(
        lambda: not any(sw.status().redis_connected for _, sw in nodes),
        5,
        "the nodes to notice the outage",
    )
    assert all(sw.applied_version == 1 for _, sw in nodes)  # nobody could hear
    live.redis.start()
    took = wait_until(
        lambda: all(sw.applied_version == v for _, sw in nodes), 2.0, "convergence"
    )
    assert took < 2.0
    for lm, _ in nodes:
        assert logits(lm) == logits(nodes[0][0])


def test_server_restart_nodes_serve_from_cache_and_converge(
    tmp_path: Path, checkpoints: dict[str, Checkpoint], redis_srv: EmbeddedRedis
) -> None:
    root = tmp_path / "store"
    import_checkpoint(Store(root), checkpoints["mixtral-float32"].path, MODEL)
    port = free_port()
    daemon = spawn_daemon(root, redis_url=redis_srv.url, port=port)
    c = ParamClient(daemon.target, same_host=False, retries=1, backoff=0.05)
    sw = None
    try:
        lm = load_lazy_model(c, MODEL, budget_bytes=10**9)
        everything = [(layer, e) for layer in range(2) for e in range(4)]
        lm.loader.warm(lm.manifest, everything)
        before = logits(lm)
        sw = HotSwapper(lm, max_backoff=0.2, reconcile_interval=600).start()
        wait_until(lambda: sw.status().redis_connected, 10, "the subscription")
        daemon.stop()
        assert logits(lm) == before  # serving goes on from cache
        sw.reconcile_now()  # finds the server gone: an outage, not an error
        wait_until(lambda: sw.status().outages >= 1, 10, "an outage")
        assert sw.status().errors == 0 and sw.status().last_error is None
        # Another writer commits while the daemon is down.
        store = Store(root)
        key = expert_key(1, 2)
        m = store.get_manifest(MODEL)
        t = tensor_codec.decode(store.blob_path(m.shards[key].digest).read_bytes(), key)
        with store.staging() as st:
            st.add(key, tensor_codec.encode({n: x * 1.5 for n, x in t.items()}))
            v2 = store.commit(MODEL, 1, st).manifest.version
        daemon = spawn_daemon(root, redis_url=redis_srv.url, port=port)
        assert sw.wait_for_version(v2, 10)
        assert logits(lm) != before
    finally:
        if sw is not None:
            sw.stop()
            sw.lazy.close()
        c.close()
        daemon.stop()


def test_pinning_and_rollback(live: Live, tmp_path: Path) -> None:
    lm, sw = live.node(1.0)
    v2 = live.bump(dense=("layers.1.dense",), experts=((1, 1),), seed=2)
    assert sw.wait_for_version(v2, 5)
    sw.pin(1)
    assert sw.wait_for_version(1, 5)
    v3 = live.bump(experts=((0, 3),), seed=3)
    wait_until(lambda: sw.status().head_version == v3, 5, "the check for v3")
    assert sw.applied_version == 1 and sw.status().pinned_version == 1
    assert logits(lm) == live.ref(1, tmp_path)
    sw.unpin()
    assert sw.wait_for_version(v3, 5)
    assert logits(lm) == live.ref(v3, tmp_path)
    live.client.rollback(MODEL, v2, message="bad round")
    assert sw.wait_for_version(v2, 5)  # backwards, because the server rolled back
    assert logits(lm) == live.ref(v2, tmp_path)


def test_duplicate_out_of_order_and_forged_messages_are_harmless(
    live: Live, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    lm, sw = live.node(1.0, on_error=errors.append)
    v2 = live.bump(experts=((0, 1),), dense=("global",), seed=5)
    assert sw.wait_for_version(v2, 5)
    r = redis_client(live.redis.url)
    ch = channel(MODEL)

    def msg(**kw: object) -> bytes:
        base = {"format": 1, "kind": "commit", "model": MODEL, "version": v2}
        base.update(previous=1, parent=1, seq=2, changed={}, removed=[])
        base.update(kw)
        return json.dumps(base).encode()

    seen, rejected = sw.announcements, sw.rejected
    bad = "f" * 64
    for data in [
        msg(),  # a duplicate of what it serves
        msg(version=1, previous=0, parent=0),  # an old one, out of order
        msg(version=999, changed={"layers.0.experts.0": bad}),  # forged
        msg(kind="rollback", version=1, previous=v2),  # a forged rollback
        msg(changed={"../../etc/passwd": bad}),  # path tricks
        b"\x00not json",
        json.dumps({"format": 1, "kind": "commit"}).encode(),
    ]:
        r.publish(ch, data)
    wait_until(
        lambda: sw.announcements == seen + 4 and sw.rejected == rejected + 3,
        5,
        "every message",
    )
    checks = sw.checks
    sw.reconcile_now()  # runs after the checks the messages caused
    wait_until(lambda: sw.checks > checks, 5, "a manifest check")
    assert sw.applied_version == v2 and not errors
    assert logits(lm) == live.ref(v2, tmp_path)
    v3 = live.bump(experts=((1, 1),), seed=6)  # and it still follows
    assert sw.wait_for_version(v3, 5)


def test_a_shard_failing_its_digest_keeps_the_old_version(
    live: Live, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    lm, sw = live.node(1.0, on_error=errors.append, max_backoff=0.2)
    sw.pin(1)
    v2 = live.bump(dense=("layers.0.dense",), experts=((0, 0),), seed=7)
    wait_until(lambda: sw.status().head_version == v2, 5, "the check for v2")
    store = Store(live.root)
    path = store.blob_path(
        store.get_manifest(MODEL, v2).shards["layers.0.dense"].digest
    )
    good = path.read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0x01
    path.write_bytes(bytes(bad))
    sw.unpin()
    wait_until(lambda: len(errors) >= 2, 10, "retries that fail")
    assert "DATA_LOSS" in str(errors[0]) or "corrupt" in str(errors[0])
    assert sw.applied_version == 1 and sw.status().last_error is not None
    assert logits(lm) == live.ref(1, tmp_path)  # never half a version
    path.write_bytes(good)  # repaired: the next retry succeeds
    assert sw.wait_for_version(v2, 10)
    assert logits(lm) == live.ref(v2, tmp_path)


def test_status_shows_the_fleet_and_forgets_dead_nodes(live: Live) -> None:
    _, a = live.node(0.5, node_id="node-a", heartbeat_interval=0.3)
    _, b = live.node(0.5, node_id="node-b", heartbeat_interval=0.3)
    b.pin(1)
    v2 = live.bump(experts=((0, 2),), seed=9)
    assert a.wait_for_version(v2, 5)
    runner = CliRunner()

    def fleet() -> dict[str, dict[str, object]]:
        r = runner.invoke(main, ["status", "--server", live.target, "--json"])
        assert r.exit_code == 0, r.output
        return {n["node"]: n for n in json.loads(r.output)["nodes"]}

    def reported() -> bool:
        nodes = fleet()
        return (
            nodes.get("node-a", {}).get("applied_version") == v2
            and nodes.get("node-b", {}).get("pinned_version") == 1
        )

    wait_until(reported, 5, "both nodes' heartbeats")
    assert fleet()["node-b"]["applied_version"] == 1
    table = runner.invoke(main, ["status", "--server", live.target]).output
    row = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "current" in row["node-a"] and f" {v2} " in row["node-a"]
    assert "pinned 1" in row["node-b"]
    b.stop(deregister=False)  # as if it crashed: its key expires on its own
    wait_until(lambda: "node-b" not in fleet(), 5, "node-b's heartbeat to expire")
    assert "node-a" in fleet()
    assert a.status().applied_version == v2  # also readable locally


def test_a_version_the_live_model_cannot_take_is_refused_once(
    live: Live, tmp_path: Path
) -> None:
    errors: list[BaseException] = []
    lm, sw = live.node(1.0, on_error=errors.append, max_backoff=0.1)
    m = live.client.get_manifest(MODEL)
    cfg = json.loads(
        bytes(live.client.fetch_blobs(m, [], files=["config.json"])["config.json"])
    )
    cfg["num_experts_per_tok"] = 1
    v2 = live.client.commit(
        MODEL, 1, {}, files={"config.json": json.dumps(cfg).encode()}
    ).manifest.version
    wait_until(lambda: bool(errors), 5, "the refusal")
    assert "config.json" in str(errors[0]) and "restart" in str(errors[0])
    for _ in range(2):  # later checks (an announcement, the timer) see it again
        checks = sw.checks
        sw.reconcile_now()
        wait_until(lambda: sw.checks > checks, 5, "a later check")  # noqa: B023
    assert len(errors) == 1  # refused once, not retried in a loop
    assert sw.applied_version == 1 and sw.status().head_version == v2
    assert logits(lm) == live.ref(1, tmp_path)


def assert_swaps_over(url: str, c: ParamClient, lm: LazyModel) -> None:
    """A node subscribed on `url` applies a commit of one doubled expert."""
    with HotSwapper(lm, redis_url=url) as sw:
        wait_until(lambda: sw.status().redis_connected, 10, "subscription")
        m = c.get_manifest(MODEL)
        key = expert_key(1, 1)
        t = tensor_codec.decode(c.fetch_blobs(m, [key])[key], key)
        v = c.commit(MODEL, m.version, {key: {n: x * 2 for n, x in t.items()}})
        assert sw.wait_for_version(v.manifest.version, 5)


def test_redis_with_a_password(
    tmp_path: Path, checkpoints: dict[str, Checkpoint]
) -> None:
    root = tmp_path / "store"
    import_checkpoint(Store(root), checkpoints["mixtral-float32"].path, MODEL)
    with EmbeddedRedis(supervise=False, password="s3cret-pw").start() as red:
        assert red.url.startswith("redis://:s3cret-pw@")
        daemon = spawn_daemon(root, redis_url=red.url)
        c = ParamClient(daemon.target, same_host=False, retries=1)
        try:
            shown = c.announce_url()
            assert shown is not None and "s3cret" not in shown  # never handed out
            lm = load_lazy_model(c, MODEL, budget_bytes=10**9)
            errors: list[BaseException] = []
            guessing = HotSwapper(lm, on_error=errors.append).start()
            wait_until(lambda: bool(errors), 10, "the complaint")
            assert "pass redis_url" in str(errors[0])
            guessing.stop()
            wrong = red.url.replace("s3cret-pw", "wrong")
            errors.clear()
            bad = HotSwapper(lm, redis_url=wrong, on_error=errors.append).start()
            wait_until(lambda: bool(errors), 10, "the refusal")
            assert "refused the credentials" in str(errors[0])
            assert "wrong" not in str(errors[0])  # the password is not logged
            assert not bad.status().redis_connected
            bad.stop()
            assert_swaps_over(red.url, c, lm)
            lm.close()
        finally:
            c.close()
            daemon.stop()


def test_redis_acl_users_for_the_daemon_and_the_nodes(
    tmp_path: Path, checkpoints: dict[str, Checkpoint]
) -> None:
    """The daemon announces as one ACL user, nodes subscribe as another that
    may not run admin commands; a wrong user is refused without leaking."""
    root = tmp_path / "store"
    import_checkpoint(Store(root), checkpoints["mixtral-float32"].path, MODEL)
    with EmbeddedRedis(supervise=False, password="admin-pw").start() as red:
        admin = redis_client(red.url)
        admin.execute_command(
            "ACL", "SETUSER", "announcer", "on", ">ann-pw", "~*", "&*", "+@all"
        )
        admin.execute_command(
            "ACL", "SETUSER", "fleet", "on", ">fleet-pw", "~*", "&*",
            "+@all", "-@admin", "-@dangerous",
        )  # fmt: skip
        base = f"127.0.0.1:{red.port}/0"
        daemon = spawn_daemon(root, redis_url=f"redis://announcer:ann-pw@{base}")
        c = ParamClient(daemon.target, same_host=False, retries=1)
        try:
            fleet = redis_client(f"redis://fleet:fleet-pw@{base}")
            with pytest.raises(redis.ResponseError, match="permission"):
                fleet.execute_command("CONFIG", "GET", "dir")
            lm = load_lazy_model(c, MODEL, budget_bytes=10**9)
            errors: list[BaseException] = []
            bad = HotSwapper(
                lm, redis_url=f"redis://fleet:nope@{base}", on_error=errors.append
            ).start()
            wait_until(lambda: bool(errors), 10, "the refusal")
            assert "nope" not in str(errors[0])
            bad.stop()
            assert_swaps_over(f"redis://fleet:fleet-pw@{base}", c, lm)
            lm.close()
        finally:
            c.close()
            daemon.stop()


def test_redis_over_tls(tmp_path: Path, checkpoints: dict[str, Checkpoint]) -> None:
    root = tmp_path / "store"
    import_checkpoint(Store(root), checkpoints["mixtral-float32"].path, MODEL)
    pki = make_pki(tmp_path)
    ca, cert, key = pki.ca, pki.cert, pki.key
    port = free_port()
    red = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
         "--requirepass", "tls-pw", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    try:
        r = redis_client(url)

        def up() -> bool:
            try:
                return bool(r.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, 10, "redis-server over TLS")
        plain = redis_client(f"redis://:tls-pw@127.0.0.1:{port}/0", timeout=0.5)
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # only TLS is spoken there
        with (
            spawn_daemon(root, redis_url=url) as daemon,
            ParamClient(daemon.target, same_host=False) as c,
        ):
            lm = load_lazy_model(c, MODEL, budget_bytes=10**9)
            assert_swaps_over(url, c, lm)
            lm.close()
    finally:
        red.terminate()
        red.wait()

"""The fault suite: a real daemon, Redis and live nodes under kills, restarts,
file-size limits and many concurrent streams.

The tests run each fault a few times; `bench/fault_suite.py` runs them at
full size and writes the figures to RELIABILITY.md.
"""

from __future__ import annotations

import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from param_server.client import ParamClient
from param_server.core import tensor_codec
from param_server.core.errors import ParamServerError, StoreIOError
from param_server.core.shards import is_expert_key
from param_server.launch.daemon import DaemonProcess, spawn_daemon
from param_server.server.redis_server import EmbeddedRedis, free_port
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint

Say = Callable[[str], None]
KEYS = [f"layers.{i // 8}.experts.{i % 8}" for i in range(16)] + ["global"]


def _wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(0.01)


def _quiet(_: str) -> None:
    pass


def _shard(rng: random.Random, size: int) -> bytes:
    data = torch.frombuffer(bytearray(rng.randbytes(size)), dtype=torch.uint8)
    return tensor_codec.encode({"w": data})


# --- SIGKILL during commits ------------------------------------------------------


@dataclass
class KillReport:
    kills: int = 0
    kills_mid_commit: int = 0
    """Kills that landed while a commit was in flight (not yet acknowledged)."""
    in_flight_landed: int = 0
    """Of those, commits that had reached HEAD before the kill (allowed)."""
    acknowledged: int = 0
    restart_seconds: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


def daemon_kills(
    workdir: Path,
    kills: int,
    seed: int = 0,
    shard_bytes: int = 256 * 1024,
    say: Say = _quiet,
) -> KillReport:
    """SIGKILLs a daemon at random moments while a client commits through it.

    After every kill the store is opened and checked before the daemon
    restarts on it: HEAD is the last acknowledged version or the one in
    flight, no acknowledged version is missing, no version exists that was
    neither acknowledged nor in flight, and every live blob matches its digest.
    """
    rng = random.Random(seed)
    store_dir = workdir / "kill-store"
    store = Store(store_dir)
    with store.staging() as s:
        for k in KEYS:
            s.add(k, _shard(rng, shard_bytes))
        store.commit("m", 0, s)
    acked: set[int] = {1}
    report = KillReport()
    for i in range(kills):
        t0 = time.monotonic()
        d = spawn_daemon(store_dir, announce=False)
        report.restart_seconds.append(time.monotonic() - t0)
        state: dict[str, int | None] = {"in_flight": None, "last": None}
        first_ack = threading.Event()

        def commits(
            d: DaemonProcess = d,
            state: dict[str, int | None] = state,
            first_ack: threading.Event = first_ack,
        ) -> None:
            with ParamClient(d.target, same_host=False, retries=0, timeout=5) as c:
                try:
                    head = c.head("m")
                    while True:
                        keys = rng.sample(KEYS, rng.randint(1, 4))
                        shards = {k: _shard(rng, shard_bytes) for k in keys}
                        state["in_flight"] = head + 1
                        head = c.commit("m", head, shards).manifest.version
                        state["last"], state["in_flight"] = head, None
                        acked.add(head)
                        first_ack.set()
                except ParamServerError:
                    return  # the daemon died under us

        t = threading.Thread(target=commits, daemon=True)
        t.start()
        first_ack.wait(30)
        time.sleep(rng.uniform(0.0, 0.3))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        t.join(30)
        report.kills += 1
        in_flight = state["in_flight"]
        fresh = Store(store_dir)
        st = fresh.state("m")
        versions = set(st.versions)
        allowed = acked | ({in_flight} if in_flight is not None else set())
        if in_flight is not None:
            report.kills_mid_commit += 1
            if st.head == in_flight:
                report.in_flight_landed += 1
                acked.add(in_flight)  # acknowledged by the store, if not to us
        problems = []
        if st.head not in (state["last"] or max(acked), in_flight):
            problems.append(
                f"HEAD {st.head}: neither the last acknowledged version "
                f"({max(acked - {in_flight})}) nor the one in flight ({in_flight})"
            )
        if lost := acked - versions:
            problems.append(f"acknowledged versions lost: {sorted(lost)}")
        if extra := versions - allowed:
            problems.append(f"unacknowledged versions visible: {sorted(extra)}")
        problems += fresh.fsck()
        if (i + 1) % 10 == 0:
            # Keep the store (and so fsck) small over hundreds of kills.
            fresh.gc(keep_last=5)
            acked.intersection_update(fresh.state("m").versions)
        fresh.close()
        report.violations += [f"kill {i + 1}: {p}" for p in problems]
        if (i + 1) % 10 == 0 or problems:
            say(
                f"kill {i + 1}/{kills}: HEAD {st.head}, in flight {in_flight}, "
                f"{len(problems)} problems"
            )
    report.acknowledged = len(acked)
    return report


# --- file-size limit -------------------------------------------------------------


def file_size_limit(workdir: Path, limit: int = 1 << 20) -> dict[str, object]:
    """A daemon under `ulimit -f` gets a commit larger than the limit: the
    client gets a clear error, the daemon keeps serving, the previous
    version is intact, and a small commit still lands."""
    store_dir = workdir / "fsize-store"
    store = Store(store_dir)
    rng = random.Random(1)
    with store.staging() as s:
        s.add("global", _shard(rng, 4096))
        store.commit("m", 0, s)
    store.close()

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "param_server.cli", "--log-level", "warning", "serve"]
    port_file = workdir / "fsize-port"
    cmd += ["--store", str(store_dir), "--listen", "127.0.0.1:0", "--no-announce"]
    cmd += ["--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, preexec_fn=limit_files, stderr=subprocess.PIPE)
    try:
        _wait_until(port_file.exists, 60, "the daemon to start")
        target = f"127.0.0.1:{port_file.read_text()}"
        with ParamClient(target, same_host=False, retries=0) as c:
            try:
                c.commit(
                    "m", 1, {"global": _shard(rng, 2 * limit)}, allow_schema_change=True
                )
                error = None
            except StoreIOError as e:
                error = str(e)
            alive = proc.poll() is None
            head_after = c.head("m")
            small = c.commit(
                "m", 1, {"global": _shard(rng, 1024)}, allow_schema_change=True
            )
        fresh = Store(store_dir)
        return {
            "error": error,
            "daemon_alive": alive,
            "head_after_failure": head_after,
            "next_commit": small.manifest.version,
            "fsck": fresh.fsck(),
            "staging_left": [p.name for p in (store_dir / "tmp").iterdir()],
        }
    finally:
        proc.terminate()
        proc.wait(30)


# --- soak: commits, live nodes, Redis and daemon restarts ------------------------


@dataclass
class SoakReport:
    commits: int = 0
    commit_failures: int = 0
    """Commits cut by the daemon's restart (retried against the new HEAD)."""
    final_version: int = 0
    nodes_on_final: int = 0
    nodes: int = 0
    lost_acknowledged: list[int] = field(default_factory=list)
    faults: list[tuple[str, float]] = field(default_factory=list)
    """(fault, seconds until every node served the HEAD of when it recovered)."""
    logits_match: bool = False
    node_errors: int = 0
    seconds: float = 0.0


def soak(
    workdir: Path,
    checkpoint: Path,
    *,
    commits: int = 500,
    nodes: int = 4,
    redis_restarts: int = 3,
    daemon_restarts: int = 1,
    say: Say = _quiet,
) -> SoakReport:
    """Commits `commits` versions while `nodes` live nodes follow them; Redis
    is killed and restarted `redis_restarts` times and the daemon
    `daemon_restarts` times (SIGKILL, same port) along the way."""
    from transformers import AutoModelForCausalLM

    from loaders.hotswap import HotSwapper
    from loaders.models import load_lazy_model

    prompt = torch.arange(3, 3 + 2 * 48).remainder(128).view(2, 48)

    model = "soak"
    store_dir = workdir / "soak-store"
    import_checkpoint(Store(store_dir), checkpoint, model)
    redis = EmbeddedRedis(supervise=False).start()
    port = free_port()  # outside the ephemeral range: it is restarted on it
    daemon = spawn_daemon(store_dir, redis_url=redis.url, port=port)
    report = SoakReport(nodes=nodes)
    live = []
    t_start = time.monotonic()
    rng = random.Random(7)
    try:
        writer = ParamClient(daemon.target, same_host=False, retries=6)
        m = writer.get_manifest(model)
        experts = [k for k in m.shards if is_expert_key(k)]
        base = writer.fetch_shards(model, experts, manifest=m)
        for i in range(nodes):
            c = ParamClient(daemon.target, same_host=False, retries=6, backoff=0.05)
            lm = load_lazy_model(c, model, budget_bytes=10**9)
            sw = HotSwapper(
                lm, redis_url=redis.url, heartbeat_interval=1.0, reconcile_interval=600
            ).start()
            live.append((lm, sw))
            _wait_until(lambda sw=sw: sw.status().redis_connected, 15, f"node {i}")
        step = commits // (redis_restarts + daemon_restarts + 1)
        fault_at = {step * (j + 1): "redis" for j in range(redis_restarts)}
        fault_at |= {
            step * (redis_restarts + j + 1): "daemon" for j in range(daemon_restarts)
        }
        acked: list[int] = []
        pending: list[tuple[str, float, int]] = []  # (fault, recovered at, head)

        def converge_check() -> None:
            for f in list(pending):
                name, t_rec, head = f
                if all(sw.applied_version >= head for _, sw in live):
                    report.faults.append((name, time.monotonic() - t_rec))
                    pending.remove(f)

        head = m.version
        while report.commits < commits:
            if report.commits in fault_at and not any(
                p[0].startswith(fault_at[report.commits]) for p in pending
            ):
                kind = fault_at.pop(report.commits)
                if kind == "redis":
                    redis.kill()
                    for _ in range(5):  # commits go on while Redis is down
                        head = _soak_commit(writer, model, head, experts, base, rng)
                        acked.append(head)
                        report.commits += 1
                    redis.start()
                else:
                    daemon.proc.send_signal(signal.SIGKILL)
                    daemon.proc.wait()
                    writer.close()
                    daemon = spawn_daemon(store_dir, redis_url=redis.url, port=port)
                    writer = ParamClient(daemon.target, same_host=False, retries=6)
                    head = writer.head(model)
                pending.append((kind, time.monotonic(), head))
                say(f"{kind} restarted at commit {report.commits}, HEAD {head}")
            try:
                head = _soak_commit(writer, model, head, experts, base, rng)
                acked.append(head)
                report.commits += 1
            except ParamServerError:
                report.commit_failures += 1
                head = writer.head(model)
            converge_check()
            if report.commits % 100 == 0:
                say(f"{report.commits} commits, HEAD {head}")
        final = writer.head(model)
        report.final_version = final
        for _, sw in live:
            sw.wait_for_version(final, 60)
        _wait_until(lambda: (converge_check(), not pending)[1], 60, "convergence")
        report.nodes_on_final = sum(sw.applied_version == final for _, sw in live)
        versions = {v.version for v in writer.list_versions(model)}
        report.lost_acknowledged = [v for v in acked if v not in versions]
        report.node_errors = sum(sw.status().errors for _, sw in live)
        dest = workdir / "soak-final"
        from param_server.store.checkpoints import export_checkpoint

        export_checkpoint(Store(store_dir), model, dest, version=final)
        with torch.no_grad():
            ref = (
                AutoModelForCausalLM.from_pretrained(
                    dest, dtype="auto", experts_implementation="eager"
                )
                .eval()(prompt)
                .logits
            )
            report.logits_match = all(
                torch.equal(lm.model(prompt).logits, ref) for lm, _ in live
            )
        writer.close()
    finally:
        for lm, sw in live:
            sw.stop()
            lm.close()
        daemon.stop()
        redis.stop()
    report.seconds = time.monotonic() - t_start
    return report


def _soak_commit(
    writer: ParamClient,
    model: str,
    head: int,
    experts: list[str],
    base: dict[str, dict[str, torch.Tensor]],
    rng: random.Random,
) -> int:
    keys = rng.sample(experts, rng.randint(1, 3))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    shards = {
        k: {
            n: t + 0.01 * torch.randn(t.shape, generator=g, dtype=t.dtype)
            for n, t in base[k].items()
        }
        for k in keys
    }
    return writer.commit(model, head, shards).manifest.version


# --- many concurrent fetch streams -----------------------------------------------


@dataclass
class StreamsRow:
    streams: int
    fetches: int
    errors: int
    busy_retries: int
    commits_landed: int
    peak_rss_mib: float
    idle_rss_mib: float
    seconds: float


def _rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def concurrent_fetches(
    workdir: Path,
    stream_counts: tuple[int, ...] = (1, 4, 16, 32),
    *,
    shards: int = 32,
    shard_mib: int = 4,
    rounds: int = 2,
    say: Say = _quiet,
) -> list[StreamsRow]:
    """For each N, N clients (one stream each) fetch every shard of a model
    `rounds` times while a writer commits; the daemon's RSS is sampled every
    10 ms. Returns a row per N."""
    store_dir = workdir / "streams-store"
    store = Store(store_dir)
    rng = random.Random(3)
    keys = [f"layers.{i // 8}.experts.{i % 8}" for i in range(shards)]
    with store.staging() as s:
        for k in keys:
            s.add(k, _shard(rng, shard_mib << 20))
        store.commit("m", 0, s)
    store.close()
    with spawn_daemon(store_dir, announce=False) as d:
        rows = [_fetch_round(d, n, keys, shard_mib, rounds, say) for n in stream_counts]
    return rows


def _fetch_round(
    d: DaemonProcess, n: int, keys: list[str], shard_mib: int, rounds: int, say: Say
) -> StreamsRow:
    pid = d.proc.pid
    idle = _rss_mib(pid)
    peak = idle
    stop = threading.Event()
    errors: list[str] = []
    counts = {"busy": 0, "fetched": 0, "landed": 0}
    lock = threading.Lock()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_mib(pid))
            stop.wait(0.01)

    def fetcher() -> None:
        with ParamClient(d.target, same_host=False, streams=1) as c:
            try:
                for _ in range(rounds):
                    m = c.get_manifest("m")
                    c.fetch_blobs(m, list(m.shards))
                    with lock:
                        counts["fetched"] += 1
            except ParamServerError as e:
                errors.append(str(e))
            with lock:
                counts["busy"] += c.stats.busy_waits

    def committer() -> None:
        r = random.Random(n)
        with ParamClient(d.target, same_host=False, streams=1) as c:
            head = c.head("m")
            while not stop.is_set():
                shard = {r.choice(keys): _shard(r, shard_mib << 20)}
                head = c.commit("m", head, shard).manifest.version
                counts["landed"] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    writer = threading.Thread(target=committer, daemon=True)
    sampler.start()
    writer.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=fetcher) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    stop.set()
    sampler.join()
    writer.join(60)
    say(f"{n} streams: peak RSS {peak:.0f} MiB (idle {idle:.0f}), {len(errors)} errors")
    return StreamsRow(
        streams=n,
        fetches=counts["fetched"],
        errors=len(errors),
        busy_retries=counts["busy"],
        commits_landed=counts["landed"],
        peak_rss_mib=peak,
        idle_rss_mib=idle,
        seconds=took,
    )

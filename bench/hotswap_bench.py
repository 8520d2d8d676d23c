"""Time from a commit to its swap on every live node, and serving latency with swaps.

    python bench/hotswap_bench.py [--nodes 1 4 8 --commits 50 --rate 10]

A Mixtral-style model (fp32, 2 layers of 16 experts of about 33 MiB each by
default) is imported into a store served by a real daemon, which announces on
its private Redis. N node processes each load it lazily (a quarter of the
experts fit), pin two experts per layer, attach a HotSwapper, and run a
serving loop of decode-sized forward passes at a fixed rate (`--rate` is the
fleet's total, so the machine carries the same serving load at every N).
Then, in one run per N:

- a quiet phase with no commits (forward-pass latency baseline);
- `--commits` commits that each change one resident expert: the time from
  the commit call returning to the swap being applied on every node (each
  node publishes the wall time of its flip on paramserver:applied:<model>);
- `--commits` commits that each change 10 % of the experts, chosen at
  random (those resident on a node are fetched before its flip, the others
  are only re-pointed).

Forward-pass latency p50/p99 during the swap phases is compared with the
quiet phase, and every figure is printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# --- one node process ------------------------------------------------------------


def node_main(args: argparse.Namespace) -> None:
    from loaders.hotswap import HotSwapper
    from loaders.models import load_lazy_model
    from param_server.client import ParamClient

    torch.set_num_threads(1)
    client = ParamClient(args.target)
    lm = load_lazy_model(client, args.model, budget_bytes=args.budget, width=args.width)
    for layer in range(args.layers):
        lm.loader.pin(layer, [0, 1])
    sw = HotSwapper(
        lm,
        node_id=args.node_id,
        heartbeat_interval=1.0,
        background_nice=args.nice,
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    ids = torch.tensor([[7]])
    passes: list[tuple[float, float, int]] = []  # (wall time, seconds, version)
    period = 1.0 / args.rate
    nxt = time.monotonic()
    with torch.no_grad():
        while not stop.is_set():
            t0 = time.perf_counter()
            lm.model(ids)
            passes.append((time.time(), time.perf_counter() - t0, sw.applied_version))
            nxt += period
            time.sleep(max(0.0, nxt - time.monotonic()))
    sw.stop()
    Path(args.out).write_text(
        json.dumps({"passes": passes, "status": sw.status().to_json()})
    )


# --- the controller ----------------------------------------------------------------


def build_model(path: Path, args: argparse.Namespace) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).eval().save_pretrained(path)


def run_fleet(
    n: int, target: str, url: str, args: argparse.Namespace, tmp: Path, width: str
) -> dict[str, object]:
    from param_server.client import ParamClient
    from param_server.core import tensor_codec
    from param_server.core.announcements import (
        APPLIED_PREFIX,
        read_fleet,
        redis_client,
    )
    from param_server.core.shards import expert_key

    client = ParamClient(target)
    m = client.get_manifest(args.model)
    expert_bytes = m.shards[expert_key(0, 0)].size
    budget = int(expert_bytes * args.layers * args.experts * 0.25)
    procs = []
    for i in range(n):
        cmd = [sys.executable, __file__, "node", "--target", target]
        cmd += ["--model", args.model, "--budget", str(budget)]
        cmd += ["--layers", str(args.layers), "--rate", str(args.rate / n)]
        cmd += ["--node-id", f"node-{i}", "--out", str(tmp / f"node-{i}.json")]
        cmd += ["--nice", str(args.nice), "--width", width]
        procs.append(subprocess.Popen(cmd))
    r = redis_client(url)
    deadline = time.monotonic() + 300
    while len(read_fleet(r, args.model)) < n:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise SystemExit("nodes did not come up")
        time.sleep(0.2)
    applied = r.pubsub()  # type: ignore[no-untyped-call]
    applied.subscribe(APPLIED_PREFIX + args.model)
    time.sleep(2.0)  # every node warmed up and serving

    flips: list[float] = []

    def wait_all(version: int, t_commit: float) -> float:
        seen: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"version {version} did not reach every node")
            msg = applied.get_message(timeout=1.0)
            if msg and msg["type"] == "message":
                d = json.loads(msg["data"])
                if d["version"] == version:
                    seen[d["node"]] = d["time"]
                    flips.append(d["flip_us"])
        return max(seen.values()) - t_commit

    rng = random.Random(0)
    windows: dict[str, tuple[float, float]] = {}
    t_quiet = time.time()
    time.sleep(args.quiet)
    windows["none"] = (t_quiet, time.time())
    lat: dict[str, list[float]] = {"one": [], "ten": []}
    everything = [(la, e) for la in range(args.layers) for e in range(args.experts)]
    k_ten = max(1, round(0.1 * len(everything)))
    typical = {"one": 0.2, "ten": 0.2}
    # Each swap phase follows a phase of the same commits to a model nobody
    # serves: the machine does the committing and the daemon's writing (on
    # other hosts in a deployment), the nodes do no swap. Comparing the two
    # isolates what swapping costs serving.
    for phase in ("decoy-one", "one", "decoy-ten", "ten"):
        kind = phase.removeprefix("decoy-")
        model = args.decoy if phase.startswith("decoy") else args.model
        t_phase = time.time()
        for c in range(args.commits):
            head = client.get_manifest(model)
            if kind == "one":
                picks = [(c % args.layers, c % 2)]  # a pinned, resident expert
            else:
                picks = rng.sample(everything, k_ten)
            keys = [expert_key(la, e) for la, e in picks]
            shards = {}
            for key, buf in client.fetch_blobs(head, keys).items():
                ts = tensor_codec.decode(buf, key)
                scale = 1.0 + 1e-4 * (c + 1)
                shards[key] = {name: t * scale for name, t in ts.items()}
            res = client.commit(model, head.version, shards)
            t_commit = time.time()
            if model == args.model:
                lat[kind].append(wait_all(res.manifest.version, t_commit))
            else:
                time.sleep(typical[kind])  # the same pace as with swaps
            if c % 10 == 9:
                client.collect_garbage(keep_last=3)
            time.sleep(args.gap)
        if lat[kind]:
            typical[kind] = statistics.median(lat[kind])
        windows[phase] = (t_phase, time.time())
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=120)
    fwd: dict[str, list[float]] = {k: [] for k in windows}
    for i in range(n):
        d = json.loads((tmp / f"node-{i}.json").read_text())
        for wall, secs, _ in d["passes"]:
            for k, (a, b) in windows.items():
                if a <= wall <= b:
                    fwd[k].append(secs)
    client.close()
    applied.close()
    r.close()
    return {
        "nodes": n,
        "expert_mib": expert_bytes / 2**20,
        "k_ten": k_ten,
        "lat": lat,
        "fwd": fwd,
        "flips": flips,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    nd = sub.add_parser("node", help="(internal) one serving node")
    nd.add_argument("--target", required=True)
    nd.add_argument("--model", required=True)
    nd.add_argument("--budget", type=int, required=True)
    nd.add_argument("--layers", type=int, required=True)
    nd.add_argument("--rate", type=float, required=True)
    nd.add_argument("--node-id", required=True)
    nd.add_argument("--out", required=True)
    nd.add_argument("--nice", type=int, required=True)
    nd.add_argument("--width", default="full")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument(
        "--widths",
        nargs="+",
        default=["full"],
        choices=["full", "int8", "fp8"],
        help="what the nodes fetch experts as (one fleet run per width and N)",
    )
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument(
        "--nice", type=int, default=0, help="HotSwapper background_nice of the nodes"
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="forward passes/s of the whole fleet, split evenly over its nodes",
    )
    ap.add_argument("--quiet", type=float, default=10.0, help="seconds, no swaps")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between commits")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--model", default="bench-moe")
    ap.add_argument("--decoy", default="bench-decoy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cmd == "node":
        node_main(args)
        return

    from param_server.client import ParamClient
    from param_server.launch.daemon import spawn_daemon
    from param_server.store import Store
    from param_server.store.checkpoints import import_checkpoint

    with tempfile.TemporaryDirectory(prefix="hotswap-bench-") as d:
        tmp = Path(d)
        build_model(tmp / "ckpt", args)
        import_checkpoint(Store(tmp / "store"), tmp / "ckpt", args.model)
        import_checkpoint(Store(tmp / "store"), tmp / "ckpt", args.decoy)
        results = []
        with spawn_daemon(tmp / "store") as daemon:
            with ParamClient(daemon.target) as c:
                url = c.announce_url()
            assert url is not None
            for width in args.widths:
                for n in args.nodes:
                    print(f"--- {n} node(s), {width} experts", flush=True)
                    res = run_fleet(n, daemon.target, url, args, tmp, width)
                    results.append({**res, "width": width})
    print()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"{args.layers} layers x {args.experts} experts of "
        f"{results[0]['expert_mib']:.1f} MiB (fp32); the fleet serves "
        f"{args.rate:g} passes/s split over its nodes, {args.commits} commits "
        "per phase"
    )
    print()
    print(
        "| nodes | experts as | change | commit -> applied on every node p50 "
        "| p99 | max "
        "| forward p50 / p99: idle | same commits, no swaps | with swaps "
        "| p99 ratio to no swaps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        fwd = res["fwd"]
        lat = res["lat"]
        assert isinstance(fwd, dict) and isinstance(lat, dict)
        base = fwd["none"]
        for phase, label in (
            ("one", "1 expert"),
            ("ten", f"10 % ({res['k_ten']} experts)"),
        ):
            xs = lat[phase]
            swaps = fwd[phase]
            decoy = fwd["decoy-" + phase]

            def ms(v: list[float]) -> str:
                return f"{1000 * pct(v, 0.5):.1f} / {1000 * pct(v, 0.99):.1f} ms"

            print(
                f"| {res['nodes']} | {res['width']} | {label} "
                f"| {1000 * statistics.median(xs):.0f} ms "
                f"| {1000 * pct(xs, 0.99):.0f} ms | {1000 * max(xs):.0f} ms "
                f"| {ms(base)} | {ms(decoy)} | {ms(swaps)} "
                f"| {pct(swaps, 0.99) / pct(decoy, 0.99):.2f}x |"
            )
    print()
    for res in results:
        fl = res["flips"]
        assert isinstance(fl, list)
        print(
            f"{res['nodes']} node(s), {res['width']}: pointer flip p50 "
            f"{pct(fl, 0.5):.0f} us, "
            f"p99 {pct(fl, 0.99):.0f} us, max {max(fl):.0f} us over {len(fl)} flips"
        )


if __name__ == "__main__":
    main()

"""Hit rates of the expert cache's eviction policies on decode-loop routing.

    python bench/eviction_bench.py [--layers 8 --experts 128 --top-k 8]

A real LazyExpertLoader fetches experts from a real daemon (in this process,
on loopback) holding a synthetic model of `--layers` MoE layers with
`--experts` experts each (small blobs: hit rates depend on counts, not
sizes, since every expert has the same size). Each decode step, for each
layer in turn, the batch's tokens each pick `--top-k` distinct experts and
the loader brings that layer's experts in, as the lazy forward does
(`iter_experts`). Routing is either uniform (what random-init routers give)
or skewed and temporally local: per layer a Zipf popularity over a random
ranking whose exponent is calibrated so that the top quarter of experts
takes about 70 % of routings, with two ranks swapped every few steps
(drift). Prints the hit rate after a warm-up for each policy, budget and
batch size; --markdown prints rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loaders.cache import LazyExpertLoader  # noqa: E402
from loaders.eviction import EvictionPolicy, FrequencyPolicy, LRUPolicy  # noqa: E402
from param_server.client import ParamClient  # noqa: E402
from param_server.core import tensor_codec  # noqa: E402
from param_server.core.shards import expert_key  # noqa: E402
from param_server.server.config import ServerConfig  # noqa: E402
from param_server.server.service import create_server  # noqa: E402
from param_server.store import Store  # noqa: E402

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "frequency": FrequencyPolicy,
}


def zipf_weights(n: int, s: float) -> list[float]:
    return [1 / (i + 1) ** s for i in range(n)]


def top_quarter_share(n: int, k: int, s: float, rng: random.Random) -> float:
    """Share of routings the most popular quarter of experts takes, when
    each token picks k distinct experts by Zipf(s) popularity."""
    w = zipf_weights(n, s)
    top = n // 4
    hits = total = 0
    for _ in range(2000):
        for e in pick(w, k, rng):
            hits += e < top
            total += 1
    return hits / total


def pick(weights: list[float], k: int, rng: random.Random) -> set[int]:
    """k distinct indices, drawn by weight without replacement."""
    chosen: set[int] = set()
    idx = list(range(len(weights)))
    while len(chosen) < k:
        chosen.update(rng.choices(idx, weights, k=k - len(chosen)))
    return chosen


def calibrate(n: int, k: int, target: float, rng: random.Random) -> float:
    """The Zipf exponent giving the top quarter `target` of routings."""
    lo, hi = 0.0, 4.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if top_quarter_share(n, k, mid, rng) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class Router:
    """Per layer, the experts a step's tokens pick."""

    def __init__(
        self, layers: int, experts: int, k: int, s: float | None, seed: int
    ) -> None:
        self.rng = random.Random(seed)
        self.experts, self.k, self.s = experts, k, s
        self.ranking = [self.rng.sample(range(experts), experts) for _ in range(layers)]
        self.weights = zipf_weights(experts, s) if s is not None else None
        self.step = 0

    def experts_for(self, layer: int, batch: int) -> list[int]:
        if self.weights is None:
            picks = [self.rng.sample(range(self.experts), self.k) for _ in range(batch)]
            return sorted({e for p in picks for e in p})
        ranking = self.ranking[layer]
        out: set[int] = set()
        for _ in range(batch):
            out.update(ranking[r] for r in pick(self.weights, self.k, self.rng))
        return sorted(out)

    def next_step(self) -> None:
        self.step += 1
        if self.weights is not None and self.step % 4 == 0:  # drift
            for ranking in self.ranking:
                i, j = self.rng.sample(range(self.experts), 2)
                ranking[i], ranking[j] = ranking[j], ranking[i]


def build_store(root: Path, layers: int, experts: int) -> Store:
    store = Store(root)
    with store.staging() as staging:
        for layer in range(layers):
            for e in range(experts):
                w = torch.full((64,), float(layer * experts + e))
                staging.add(expert_key(layer, e), tensor_codec.encode({"w": w}))
        store.commit("synthetic", 0, staging, message="eviction bench")
    return store


def run(
    client: ParamClient,
    policy: str,
    budget: float,
    batch: int,
    args: argparse.Namespace,
    s: float | None,
) -> tuple[float, float]:
    manifest = client.get_manifest("synthetic")
    size = next(iter(manifest.shards.values())).size
    total = size * args.layers * args.experts
    loader = LazyExpertLoader(
        client,
        manifest,
        budget_bytes=max(size, int(total * budget)),
        policy=POLICIES[policy](),
    )
    router = Router(args.layers, args.experts, args.top_k, s, seed=args.seed)
    t0 = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            loader.reset_stats()
        for layer in range(args.layers):
            for _ in loader.iter_experts(layer, router.experts_for(layer, batch)):
                pass
        router.next_step()
    loader.close()
    return loader.stats().hit_rate, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--budgets", default="0.5,0.25,0.125")
    ap.add_argument("--warmup", type=int, default=30, help="decode steps not counted")
    ap.add_argument("--steps", type=int, default=60, help="decode steps counted")
    ap.add_argument("--skew", type=float, default=0.7, help="top-quarter share")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    s = calibrate(args.experts, args.top_k, args.skew, random.Random(args.seed))
    share = top_quarter_share(args.experts, args.top_k, s, random.Random(1))
    print(
        f"{args.layers} layers x {args.experts} experts, top-{args.top_k}; skewed "
        f"routing: Zipf({s:.2f}), top quarter takes {share:.0%} of routings; "
        f"{args.warmup} warm-up + {args.steps} measured decode steps; "
        f"{platform.node() or 'host'}, Python {platform.python_version()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as d:
        build_store(Path(d) / "store", args.layers, args.experts)
        server, port, _ = create_server(
            ServerConfig(store=Path(d) / "store", listen="127.0.0.1:0", announce=False)
        )
        server.start()
        try:
            with ParamClient(f"127.0.0.1:{port}", streams=1) as client:
                for routing, skew in (("uniform", None), ("skewed", s)):
                    for batch in (int(b) for b in args.batches.split(",")):
                        for budget in (float(b) for b in args.budgets.split(",")):
                            rates = {
                                p: run(client, p, budget, batch, args, skew)[0]
                                for p in POLICIES
                            }
                            rows.append((routing, batch, budget, rates))
                            print(
                                f"{routing:8} batch {batch:3} budget {budget:6.1%}  "
                                + "  ".join(f"{p} {r:6.1%}" for p, r in rates.items()),
                                flush=True,
                            )
        finally:
            server.stop(0)
    if args.markdown:
        print("\n| routing | batch | budget | LRU hit rate | frequency hit rate |")
        print("|---|---|---|---|---|")
        for routing, batch, budget, rates in rows:
            print(
                f"| {routing} | {batch} | {budget:.1%} | {rates['lru']:.1%} | "
                f"{rates['frequency']:.1%} |"
            )


if __name__ == "__main__":
    main()

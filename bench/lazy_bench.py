"""Lazy expert loading against the fully resident eager model, in one run.

    python bench/lazy_bench.py [--layers 8 --experts 32 --hidden 512 --inter 1024]

A Mixtral-style model (fp32; defaults give 1.5 GiB of experts) is imported
into a store served by a real daemon. For routing as the model gives it and
with a skewed, Zipf-like expert popularity (a fixed log-prior added to every
router's logits, the same in both models), and for experts coming over gRPC
and over the same-host path, it measures the eager model and lazy loading at
several budgets: decode tokens/s (greedy, after a warm-up generation), the
ratio to eager, prefill time, hit rate, peak resident expert bytes against
the budget, and miss latency p50/p99.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from loaders.eviction import FrequencyPolicy, LRUPolicy
from loaders.models import load_lazy_model
from param_server.client import ParamClient
from param_server.core.shards import is_expert_key
from param_server.launch.daemon import spawn_daemon
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint

POLICY = {"frequency": FrequencyPolicy, "lru": LRUPolicy}


def skew_routers(model: nn.Module, bias_per_layer: list[torch.Tensor]) -> None:
    """Adds a fixed log-prior to each router's logits (Zipf-like popularity)."""

    def forward(self, hidden_states):  # type: ignore[no-untyped-def]
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(hidden_states, self.weight) + self._skew
        probs = torch.softmax(logits.float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        top /= top.sum(dim=-1, keepdim=True)
        return logits, top, idx

    for layer, bias in zip(model.model.layers, bias_per_layer, strict=True):
        router = layer.mlp.gate
        router._skew = bias.to(router.weight.dtype)
        router.forward = types.MethodType(forward, router)


def zipf_biases(
    layers: int, experts: int, s: float, scale: float, seed: int
) -> list[torch.Tensor]:
    """Per layer, `scale` x log of Zipf(s) probabilities over a random ranking.

    `scale` tempers the prior against the router's own logits: 1 lets the
    top experts win almost every token; smaller keeps the model's routing in
    play with a skewed popularity on top.
    """
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, experts + 1, dtype=torch.float32)
    logp = -s * torch.log(ranks)
    return [scale * logp[torch.randperm(experts, generator=g)] for _ in range(layers)]


def decode_tps(
    model: nn.Module, prompt: torch.Tensor, new: int, repeat: int = 1
) -> float:
    """Median tokens/s (all sequences of the batch) of `repeat` generations."""
    args = {
        "max_new_tokens": new,
        "min_new_tokens": new,
        "do_sample": False,
        "pad_token_id": 0,
    }
    runs = []
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            model.generate(prompt, **args)
            runs.append(new * prompt.shape[0] / (time.perf_counter() - t))
    return statistics.median(runs)


def prefill_s(model: nn.Module, prompt: torch.Tensor) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model(prompt)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    ap.add_argument("--budgets", default="1.0,0.5,0.25,0.125")
    ap.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the skew")
    ap.add_argument(
        "--skew-scale",
        type=float,
        default=0.3,
        help="weight of the Zipf log-prior against the router's logits",
    )
    ap.add_argument("--repeat", type=int, default=3, help="decode runs (median)")
    ap.add_argument(
        "--policies", default="frequency", help="eviction policies: frequency, lru"
    )
    ap.add_argument("--transports", default="grpc,same-host")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    budgets = [float(b) for b in args.budgets.split(",")]

    with tempfile.TemporaryDirectory(prefix="lazy-bench-") as tmp:
        work = Path(tmp)
        cfg = MixtralConfig(
            vocab_size=1024,
            hidden_size=args.hidden,
            intermediate_size=args.inter,
            num_hidden_layers=args.layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_local_experts=args.experts,
            num_experts_per_tok=2,
            max_position_embeddings=1024,
        )
        MixtralForCausalLM(cfg).save_pretrained(work / "ckpt")
        r = import_checkpoint(Store(work / "store"), work / "ckpt", "bench")
        sizes = [s.size for k, s in r.manifest.shards.items() if is_expert_key(k)]
        total = sum(sizes)
        prompt = torch.randint(0, 1024, (args.batch, 8))
        long_prompt = torch.randint(0, 1024, (1, args.prefill))
        rows = []
        with spawn_daemon(work / "store") as daemon:
            for routing in ("model", "zipf"):
                biases = zipf_biases(
                    args.layers, args.experts, args.zipf, args.skew_scale, 1
                )
                eager = AutoModelForCausalLM.from_pretrained(
                    work / "ckpt", experts_implementation="eager"
                ).eval()
                # Fully resident: own memory, not pages of the mapped checkpoint.
                with torch.no_grad():
                    for p in eager.parameters():
                        p.data = p.data.clone()
                if routing == "zipf":
                    skew_routers(eager, biases)
                decode_tps(eager, prompt, args.new_tokens)  # warm-up
                e_tps = decode_tps(eager, prompt, args.new_tokens, args.repeat)
                e_pre = prefill_s(eager, long_prompt)
                rows.append(
                    (
                        routing,
                        "-",
                        "eager",
                        e_tps,
                        1.0,
                        e_pre,
                        None,
                        total,
                        total,
                        None,
                        None,
                    )
                )
                del eager
                for transport, policy in itertools.product(
                    args.transports.split(","), args.policies.split(",")
                ):
                    same_host = transport == "same-host"
                    for frac in budgets:
                        budget = max(max(sizes), int(total * frac))
                        with ParamClient(daemon.target, same_host=same_host) as c:
                            lm = load_lazy_model(
                                c, "bench", budget_bytes=budget, policy=POLICY[policy]()
                            )
                            if routing == "zipf":
                                skew_routers(lm.model, biases)
                            decode_tps(lm.model, prompt, args.new_tokens)  # warm-up
                            lm.loader.reset_stats()
                            tps = decode_tps(
                                lm.model, prompt, args.new_tokens, args.repeat
                            )
                            st = lm.loader.stats()
                            pre = prefill_s(lm.model, long_prompt)
                            rows.append(
                                (
                                    routing,
                                    f"{transport}, {policy}",
                                    f"{frac:.1%}",
                                    tps,
                                    tps / e_tps,
                                    pre,
                                    st.hit_rate,
                                    st.peak_resident_bytes,
                                    budget,
                                    st.miss_latency_ms.get("p50"),
                                    st.miss_latency_ms.get("p99"),
                                )
                            )
                            lm.close()
                            print(
                                f"{routing:>5} {transport:>9} {policy:>9} "
                                f"{frac:>6.1%}: "
                                f"{tps:7.1f} tok/s ({tps / e_tps:.2f} x eager), "
                                f"hit {st.hit_rate:.1%}",
                                flush=True,
                            )

    print(
        f"\nMixtral-style {args.layers} layers x {args.experts} experts, hidden "
        f"{args.hidden}, intermediate {args.inter}, fp32: {total / 2**30:.2f} GiB of "
        f"experts; decode {args.new_tokens} tokens after a warm-up generation; prefill "
        f"{args.prefill} tokens; {platform.node()}, {os.cpu_count()} cores\n"
    )
    head = (
        "| routing | experts via, eviction | budget | decode tok/s | ÷ eager | "
        "prefill s | hit rate | peak resident / budget | miss p50 ms | miss p99 ms |"
    )
    print(head)
    print("|" + "---|" * 10)
    for routing, transport, budget, tps, ratio, pre, hit, peak, limit, p50, p99 in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(
            f"| {routing} | {transport} | {budget} | {tps:.1f} | {ratio:.2f} | "
            f"{pre:.3f} | {fmt(hit, '.1%')} | {peak / 2**20:.0f} / "
            f"{limit / 2**20:.0f} MiB | {fmt(p50, '.1f')} | {fmt(p99, '.1f')} |"
        )


if __name__ == "__main__":
    main()

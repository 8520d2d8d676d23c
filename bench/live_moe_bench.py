"""A live MoE served through the param-server against the same model resident.

    python bench/live_moe_bench.py                      # CPU, small
    python bench/live_moe_bench.py --device cuda --hidden 2048 --inter 768 \\
        --experts 128 --top-k 8 --layers 8 --dtype bfloat16   # the realistic one

Builds a Qwen3-MoE-shaped (or, with --family mixtral, a Mixtral-shaped)
model from a config (random weights, nothing downloaded), imports it into a
store served by a real daemon, and measures greedy decode (batch 1 and 16)
and prefill for: the resident model loaded with transformers' default
experts implementation (`grouped_mm` where it runs), and `load_lazy_model`
at each budget. At 100 % every expert sits in its slot of the model's own
parameters and the same implementation runs; below, experts come on demand
into a pool, in each of the --variants: `default` (same-host path, host
tier, no layer-ahead prefetch), `prefetch` and `no-prefetch`
(forced on or off), `no-host-tier`, `grpc` (experts over gRPC instead of
the same-host path) and `grpc-no-host-tier`. Tokens/s,
the ratio to resident, device and host-tier hit rates, prefetch recall and
precision, miss latency, and device and host memory against the budget.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig
from transformers.initialization import no_init_weights

from loaders.models import LazyModel, load_lazy_model
from param_server.client import ParamClient
from param_server.core.shards import is_expert_key
from param_server.launch.daemon import spawn_daemon
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_runs(model: nn.Module, prompt: torch.Tensor, new: int) -> float:
    """Tokens/s (all sequences of the batch) of one greedy generation."""
    args = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False}
    with torch.no_grad():
        sync(str(prompt.device))
        t = time.perf_counter()
        model.generate(prompt, **args, pad_token_id=0)
        sync(str(prompt.device))
    return new * prompt.shape[0] / (time.perf_counter() - t)


def decode_tps(model: nn.Module, prompt: torch.Tensor, new: int, repeat: int) -> float:
    decode_runs(model, prompt, new)  # warm-up
    return statistics.median(decode_runs(model, prompt, new) for _ in range(repeat))


def interleaved(
    a: nn.Module, b: nn.Module, prompt: torch.Tensor, new: int, repeat: int
) -> tuple[float, float]:
    """Median tokens/s of `a` and of `b`, their runs alternating (so that a
    drift of the machine's speed hits both alike)."""
    decode_runs(a, prompt, new)
    decode_runs(b, prompt, new)
    ra, rb = [], []
    for _ in range(repeat):
        ra.append(decode_runs(a, prompt, new))
        rb.append(decode_runs(b, prompt, new))
    return statistics.median(ra), statistics.median(rb)


def prefill_s(model: nn.Module, prompt: torch.Tensor, repeat: int) -> float:
    runs = []
    with torch.no_grad():
        model(prompt)
        for _ in range(repeat):
            sync(str(prompt.device))
            t = time.perf_counter()
            model(prompt)
            sync(str(prompt.device))
            runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def skew_routers(model: nn.Module, biases: list[torch.Tensor]) -> None:
    """Adds a fixed per-expert log-prior to every router's logits (the same in
    every model compared), so that some experts are routed to much more than
    others, as trained routers do."""

    def forward(self, hidden_states):  # type: ignore[no-untyped-def]
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = nn.functional.linear(hidden_states, self.weight) + self._skew
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):  # Mixtral always normalises
            top /= top.sum(dim=-1, keepdim=True)
        return logits, top.to(logits.dtype), idx

    for layer, bias in zip(model.model.layers, biases, strict=True):
        gate = layer.mlp.gate
        gate._skew = bias.to(gate.weight.device, gate.weight.dtype)
        gate.forward = types.MethodType(forward, gate)


def zipf_biases(layers: int, experts: int, scale: float) -> list[torch.Tensor]:
    """Per layer, `scale` x log Zipf(1) over a random ranking of the experts."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(layers):
        rank = torch.randperm(experts, generator=g).float() + 1
        out.append(-scale * torch.log(rank))
    return out


def top_quarter_share(model: nn.Module, prompt: torch.Tensor, experts: int) -> float:
    """Share of routings the top quarter of each layer's experts takes."""
    counts: list[torch.Tensor] = []

    def hook(module, args, out):  # type: ignore[no-untyped-def]
        counts.append(torch.bincount(out[2].flatten().cpu(), minlength=experts))

    hooks = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(prompt)
    for h in hooks:
        h.remove()
    shares = [
        c.sort(descending=True).values[: experts // 4].sum() / c.sum() for c in counts
    ]
    return float(sum(shares) / len(shares))


VARIANTS: dict[str, tuple[bool, bool, bool | None]] = {
    # name: (same-host path, host tier on, layer-ahead prefetch; None: the
    # library's default, off)
    "default": (True, True, None),
    "prefetch": (True, True, True),
    "no-prefetch": (True, True, False),
    "no-host-tier": (True, False, None),
    "grpc": (False, True, None),
    "grpc-no-host-tier": (False, False, None),
}


def build_config(args: argparse.Namespace, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    common = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 16 if args.hidden <= 2048 else 32,
        "num_key_value_heads": 4 if args.hidden <= 2048 else 8,
        "head_dim": 128,
        "num_experts_per_tok": args.top_k,
        "max_position_embeddings": 4096,
        "dtype": dtype,
    }
    if args.family == "mixtral":
        return "Mixtral", MixtralConfig(
            **common, intermediate_size=args.inter, num_local_experts=args.experts
        )
    return "Qwen3-MoE", Qwen3MoeConfig(
        **common,
        intermediate_size=args.inter * 4,
        moe_intermediate_size=args.inter,
        num_experts=args.experts,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--family", choices=["qwen3_moe", "mixtral"], default="qwen3_moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument(
        "--inter",
        type=int,
        default=256,
        help="an expert's intermediate size (moe_intermediate_size)",
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument(
        "--small-budget-batches",
        default="1",
        help="batches run below a 100%% budget",
    )
    ap.add_argument(
        "--variants",
        default="default,prefetch",
        help=f"what runs below a 100%% budget, of: {', '.join(VARIANTS)}",
    )
    ap.add_argument(
        "--variant-budgets",
        default="",
        help="budgets the variants other than 'default' run at (default: all)",
    )
    ap.add_argument(
        "--no-host-tier-batches",
        default="1",
        help="batches the variants without a host tier run (each miss then "
        "verifies and prepares the expert again)",
    )
    ap.add_argument(
        "--widths",
        default="full",
        help="widths experts cross the network in below a 100%% budget, of: "
        "full, int8, fp8 (8-bit ones are dequantized when they arrive; "
        "int8:narrow or fp8:narrow keeps them 8-bit until the device)",
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="route skewed: the top quarter of experts takes this share (0: off)",
    )
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    device = args.device
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    shape, cfg = build_config(args, dtype)
    with tempfile.TemporaryDirectory(prefix="live-moe-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        with torch.no_grad():  # as transformers initialises: norms at 1
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
                else:
                    p.fill_(1.0)
        model.save_pretrained(work / "ckpt")
        del model
        r = import_checkpoint(Store(work / "store"), work / "ckpt", "live")
        sizes = [s.size for k, s in r.manifest.shards.items() if is_expert_key(k)]
        total = sum(sizes)
        print(
            f"{shape} shape: {args.layers} layers x {args.experts} experts "
            f"(top-{args.top_k}), hidden {args.hidden}, expert intermediate "
            f"{args.inter}, {args.dtype}: {total / 2**30:.2f} GiB of experts, "
            f"{sizes[0] / 2**20:.1f} MiB each; built and imported in "
            f"{time.perf_counter() - t0:.0f} s; device {device}"
            + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
            + f"; {platform.node()}; torch {torch.__version__}",
            flush=True,
        )
        batches = [int(b) for b in args.batches.split(",")]
        small = {int(b) for b in args.small_budget_batches.split(",")}
        no_host = {int(b) for b in args.no_host_tier_batches.split(",")}
        gen = torch.Generator().manual_seed(1)
        prompts = {
            b: torch.randint(0, args.vocab, (b, 16), generator=gen).to(device)
            for b in batches
        }
        long = torch.randint(0, args.vocab, (1, args.prefill), generator=gen)
        long = long.to(device)
        rows: list[tuple[str, int, float, float, str, str, str, str, str]] = []
        resident = AutoModelForCausalLM.from_pretrained(work / "ckpt", dtype=dtype)
        resident = resident.to(device).eval()
        impl = resident.config._experts_implementation
        biases: list[torch.Tensor] | None = None
        if args.skew:
            lo, hi = 0.0, 8.0
            probe = prompts[max(batches)]
            for _ in range(12):
                mid = (lo + hi) / 2
                skew_routers(resident, zipf_biases(args.layers, args.experts, mid))
                if top_quarter_share(resident, probe, args.experts) < args.skew:
                    lo = mid
                else:
                    hi = mid
            biases = zipf_biases(args.layers, args.experts, hi)
            skew_routers(resident, biases)
            print(
                f"skewed routing: Zipf(1) log-prior x {hi:.2f} on every router; "
                f"top quarter of experts takes "
                f"{top_quarter_share(resident, probe, args.experts):.0%} of routings",
                flush=True,
            )
        base: dict[int, float] = {}
        base_pre = prefill_s(resident, long, args.repeat)
        dash = ("-", "-", "-", "-", "-")
        rows.append((f"resident ({impl}), prefill", args.prefill, base_pre, 1.0, *dash))
        plan: list[tuple[float, str, str]] = []
        others = (
            {float(f) for f in args.variant_budgets.split(",")}
            if args.variant_budgets
            else None
        )
        widths = args.widths.split(",")
        for frac in (float(f) for f in args.budgets.split(",")):
            if frac >= 1.0:
                plan.append((frac, "default", "full"))
                continue
            for v in variants:
                if v == "default" or others is None or frac in others:
                    plan.extend((frac, v, w) for w in widths)
        with spawn_daemon(work / "store", announce=False) as daemon:
            # The daemon makes a variant on its first request: made here, so
            # that no row's misses wait for it.
            made = {w.partition(":")[0] for w in widths} - {"full"}
            with ParamClient(daemon.target, same_host=False) as c:
                m = c.get_manifest("live")
                experts = [k for k in m.shards if is_expert_key(k)]
                for w in sorted(made):
                    t = time.perf_counter()
                    for i in range(0, len(experts), 32):  # each call in time
                        c.variants(m, experts[i : i + 32], w)
                    print(
                        f"{w} variants of {len(experts)} experts made in "
                        f"{time.perf_counter() - t:.1f} s",
                        flush=True,
                    )
            for frac, variant, width in plan:
                budget = max(max(sizes), int(total * frac))
                same_host, host_on, prefetch = VARIANTS[variant]
                with ParamClient(daemon.target, same_host=same_host) as c:
                    w, _, when = width.partition(":")
                    lm = load_lazy_model(
                        c,
                        "live",
                        budget_bytes=budget,
                        device=device,
                        prefetch=prefetch,
                        host_budget_bytes=None if host_on else 0,
                        width=w,
                        keep_narrow=when == "narrow",
                    )
                    if biases is not None:
                        skew_routers(lm.model, biases)
                    label = f"lazy {frac:.1%} ({lm.experts_implementation})"
                    if frac < 1.0:
                        label += f", {variant}"
                    if w != "full":
                        label += f", {w} experts"
                        if lm.loader.keeps_narrow:
                            label += " kept narrow"
                    for b in batches:
                        if frac < 1.0 and b not in small:
                            continue
                        if not host_on and b not in no_host:
                            continue
                        # Every row's runs alternate with the resident model's,
                        # so that a drift of the machine's speed hits both alike.
                        decode_runs(lm.model, prompts[b], args.new_tokens)
                        lm.loader.settle()
                        lm.loader.reset_stats()  # counters of the timed runs
                        ref, tps = interleaved(
                            resident, lm.model, prompts[b], args.new_tokens, args.repeat
                        )
                        if b not in base:
                            rows.append((f"resident ({impl})", b, ref, 1.0, *dash))
                        base[b] = ref
                        lm.loader.settle()
                        rows.append(
                            (label, b, tps, tps / base[b], *describe(lm, budget))
                        )
                        print(rows[-1], flush=True)
                    if frac == 1.0:
                        pre = prefill_s(lm.model, long, args.repeat)
                        again = prefill_s(resident, long, args.repeat)
                        base_pre = min(base_pre, again)  # the better of two
                        pre = min(pre, prefill_s(lm.model, long, args.repeat))
                        rows[0] = (rows[0][0], args.prefill, base_pre, 1.0, *dash)
                        rows.append(
                            (
                                label + ", prefill",
                                args.prefill,
                                pre,
                                base_pre / pre,
                                *dash,
                            )
                        )
                        print(rows[-1], flush=True)
                    lm.close()
                    del lm
                    if device == "cuda":
                        torch.cuda.empty_cache()
    print(
        "\n| configuration | batch (prefill: tokens) | tok/s (prefill: s) | "
        "÷ resident | hits (device / host tier) | prefetch: recall / precision "
        "| miss p50 / p99 | experts on device (peak / budget), host tier "
        "| layer steps: on the map / redone |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, b, v, ratio, hit, pred, miss, mem, *steps in rows:
        cells = [label, str(b), f"{v:.3f}", f"{ratio:.2f}", hit, pred, miss, mem]
        cells.append(steps[0] if steps else "-")
        print("| " + " | ".join(cells) + " |")


def describe(lm: LazyModel, budget: int) -> tuple[str, str, str, str, str]:
    """Hit rates, prefetch accuracy, miss latency, memory, and layer steps
    that ran on the map (no lookup) or were launched and run again."""
    st = lm.loader.stats()
    looked = st.hits + st.misses
    host = st.host_hits / looked if looked else 0.0
    pred = (
        f"{st.prediction_recall:.0%} / {st.prediction_precision:.0%} "
        f"({st.prefetched} in)"
        if st.predicted
        else "-"
    )
    lat = st.miss_latency_ms
    miss = f"{lat['p50']:.2f} / {lat['p99']:.2f} ms" if lat else "-"
    mem = (
        f"{st.peak_resident_bytes / 2**30:.2f} / {budget / 2**30:.2f} GiB, "
        f"{st.host_bytes / 2**30:.2f} GiB"
    )
    steps = st.steps_on_map + st.steps_looked_up
    ran = (
        f"{st.steps_on_map / steps:.1%} / {st.steps_redone / steps:.1%}"
        if steps
        else "-"
    )
    return f"{st.hit_rate:.1%} / {host:.1%}", pred, miss, mem, ran


if __name__ == "__main__":
    main()

"""Bytes an institution sends per round: LoRA adapters against whole experts.

    python bench/lora_bytes_bench.py                 # Qwen3-MoE expert sizes, 1 layer
    python bench/lora_bytes_bench.py --layers 2 --ranks 8,16,32
    python bench/lora_bytes_bench.py --device cuda --batch 16 --seq-len 512  # a GPU

Builds a Qwen3-MoE-shaped model with realistic expert dimensions (hidden
2048, moe_intermediate_size 768, 128 experts, top-8; few layers so it fits
in a CPU's memory), bf16 as stored, and runs one institution's real local
training (`fed_clients.train.train_local`, one step on random token
sequences) in each mode: whole experts (sparse mode: every expert tensor
the step changed, in bf16) and LoRA at each rank (adapters of the experts
the step reached, in bf16). The bytes are those of the reply's arrays, as
the institution's ClientApp builds them. Also the wall time of that
`train_local` call (building the model, the step, collecting the update) on
this machine (on CUDA, `--device cuda`: bf16 mixed precision, as an
institution with a GPU trains a bf16 model by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fed_clients.lora import LoRAConfig
from fed_clients.train import TrainConfig, train_local

try:  # the bytes of an array in a Flower message
    from param_server.federation import wire

    def sent_bytes(t: torch.Tensor) -> int:
        return len(wire.to_array(t).data)

except ImportError:  # no Flower here (a GPU machine): the same raw bytes

    def sent_bytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--timed-steps",
        type=int,
        default=0,
        help="also time this many more local steps per update mode (each run "
        "again with 1 + N steps; the difference over N is one step's time)",
    )
    args = ap.parse_args()
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter * 4,
        moe_intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=512,
        router_aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="lora-bytes-") as tmp:
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(tmp)
        del model
        received: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            received.update(load_file(f))
        config_json = (Path(tmp) / "config.json").read_text()
    expert_keys = [k for k in received if ".experts." in k]
    per_expert = sum(
        received[k].numel() * received[k].element_size() for k in expert_keys
    ) // (args.experts * args.layers)
    train = TrainConfig(
        steps=1, batch_size=args.batch, lr=1e-3, seed=1, device=args.device
    )
    print(
        f"Qwen3-MoE shape: {args.layers} layer(s) x {args.experts} experts "
        f"(top-{args.top_k}), hidden {args.hidden}, moe_intermediate {args.inter}, "
        f"bf16: {per_expert / 2**20:.2f} MiB per expert; one local step on "
        f"{args.batch} x {args.seq_len} tokens on {args.device}; {platform.node()}, "
        f"torch {torch.__version__}",
        flush=True,
    )
    data = torch.randint(
        0, args.vocab, (args.batch * (2 + args.timed_steps), args.seq_len)
    )
    longer = dataclasses.replace(train, steps=1 + args.timed_steps)

    def step_s(lora: LoRAConfig | None) -> float:
        """Seconds of one local step: 1 + N steps less 1 step, over N."""
        if not args.timed_steps:
            return float("nan")
        t = time.perf_counter()
        train_local(config_json, received, data, train, lora=lora)
        one = time.perf_counter() - t
        t = time.perf_counter()
        train_local(config_json, received, data, longer, lora=lora)
        return float((time.perf_counter() - t - one) / args.timed_steps)

    rows = []
    steps = []
    t = time.perf_counter()
    full = train_local(config_json, received, data, train)
    full_s = time.perf_counter() - t
    sent = [k for k in received if not torch.equal(full.tensors[k], received[k])]
    full_bytes = sum(sent_bytes(full.tensors[k]) for k in sent)
    touched = sum(1 for k in sent if ".experts." in k) // 3
    rows.append(("whole experts (sparse)", touched, full_bytes, full_s))
    del full
    steps.append(step_s(None))
    for rank in [int(r) for r in args.ranks.split(",")]:
        t = time.perf_counter()
        out = train_local(
            config_json,
            received,
            data,
            train,
            lora=LoRAConfig(rank=rank, alpha=2.0 * rank),
        )
        dt = time.perf_counter() - t
        nbytes = sum(
            sent_bytes(x.to(received[k].dtype))
            for k, (a, b) in out.adapters.items()
            for x in (a, b)
        )
        rows.append((f"LoRA rank {rank}", len(out.adapters) // 3, nbytes, dt))
        del out
        steps.append(step_s(LoRAConfig(rank=rank, alpha=2.0 * rank)))
    print(
        "| update | experts sent | bytes sent | ÷ whole experts | "
        "train_local s (build, 1 step, update) | one step s | ÷ whole |"
    )
    print("|---|---|---|---|---|---|---|")
    for (name, n, nbytes, dt), step in zip(rows, steps, strict=True):
        print(
            f"| {name} | {n} | {nbytes / 2**20:.2f} MiB | "
            f"{nbytes / full_bytes:.2%} | {dt:.1f} | {step:.3f} | "
            f"{step / steps[0]:.2f} |"
        )
    print(json.dumps({"rows": rows, "step_s": steps}))


if __name__ == "__main__":
    main()

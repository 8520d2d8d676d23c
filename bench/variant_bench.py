"""8-bit expert variants: bytes, fetch time and quality against full width.

    python bench/variant_bench.py                  # bytes and fetch time
    apt-get install -y fortunes                    # for the quality part
    python bench/variant_bench.py --quality

Bytes and time: a Qwen3-MoE-shaped model with realistic expert dimensions
(hidden 2048, moe_intermediate_size 768; 2 layers x 16 experts so it stays
quick), bf16, imported into a store served by a real daemon in this
process. Per width: the bytes of one expert as it crosses the wire, the
daemon's one-time cost of making every variant (first GetVariants), and
fetching every expert over gRPC (one stream, warm), dequantizing included.

Quality (`--quality`): a tiny Mixtral pre-trained here on Debian's
`fortunes` quotations (a byte-level BPE tokenizer, 600 steps), imported with
its tokenizer; `loaders.quality.variant_quality` (what `param-server
check-variant` runs) serves it at full width and as each variant and
compares next-token predictions on held-out quotations it never saw.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from param_server.client import ParamClient
from param_server.core.shards import is_expert_key
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint

WIDTHS = ("full", "int8", "fp8")


def serve(store: Path) -> tuple[object, str]:
    srv, port, _ = create_server(
        ServerConfig(store=store, listen="127.0.0.1:0", announce=False)
    )
    srv.start()
    return srv, f"127.0.0.1:{port}"


def bytes_and_time(work: Path, layers: int, experts: int) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=2048,
        intermediate_size=3072,
        moe_intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "ckpt")
    import_checkpoint(Store(work / "store"), work / "ckpt", "m")
    srv, target = serve(work / "store")
    try:
        with ParamClient(target, same_host=False) as c:
            m = c.get_manifest("m")
            keys = [k for k in m.shards if is_expert_key(k)]
            full = m.shards[keys[0]].size
            print(
                f"Qwen3-MoE expert shape (hidden 2048, moe_intermediate 768), bf16, "
                f"{len(keys)} experts of {full / 2**20:.2f} MiB; daemon in this "
                f"process, gRPC on loopback; {platform.node()}, torch "
                f"{torch.__version__}",
                flush=True,
            )
            print(
                "| width | bytes per expert | ÷ bf16 | make all (first request) s "
                "| fetch all s | MB/s on the wire |"
            )
            print("|---|---|---|---|---|---|")
            for width in WIDTHS:
                made = 0.0
                size = full
                if width != "full":
                    t = time.perf_counter()
                    sizes = c.variants(m, keys, width)
                    made = time.perf_counter() - t
                    size = sizes[keys[0]][1]
                    c.variants(m, keys, width)  # recorded now: a lookup
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    c.fetch_shards("m", keys, manifest=m, width=width)
                    times.append(time.perf_counter() - t)
                best = min(times)
                print(
                    f"| {width} | {size / 2**20:.2f} MiB | {size / full:.3f} | "
                    f"{made:.2f} | {best:.2f} | {size * len(keys) / best / 1e6:.0f} |",
                    flush=True,
                )
    finally:
        srv.stop(0)  # type: ignore[attr-defined]


def quality(work: Path, args: argparse.Namespace) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import json

    from fed_text_bench import GENERAL, TOPICS, fortunes
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from fed_clients.data import pack
    from fed_clients.train import TrainConfig, build_model, train_local
    from loaders.quality import variant_quality

    if args.corpus == "fortunes":
        docs = [d for f in (*GENERAL, *TOPICS.values()) for d in fortunes(f)]
        what = "fortunes"
    else:  # the interpreter's own standard library: low-entropy text
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        docs, size = [], 0
        for f in sorted(root.rglob("*.py")):
            if "test" in f.relative_to(root).parts[0] or size >= args.max_chars:
                continue
            docs.append(f.read_text(encoding="utf-8", errors="replace"))
            size += len(docs[-1])
        what = f"Python {sys.version_info.major}.{sys.version_info.minor} stdlib files"
    held, train = docs[::20], [d for i, d in enumerate(docs) if i % 20]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        train,
        trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<unk>", "<eos>"]),
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    )
    cfg = {
        "model_type": "mixtral",
        "vocab_size": len(tokenizer),
        "hidden_size": args.q_hidden,
        "intermediate_size": args.q_inter,
        "num_hidden_layers": args.q_layers,
        "num_attention_heads": max(4, args.q_hidden // 64),
        "num_key_value_heads": 2,
        "num_local_experts": args.q_experts,
        "num_experts_per_tok": 2,
        "max_position_embeddings": args.seq_len,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    init = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    init.save_pretrained(work / "init")
    from safetensors.torch import load_file

    start = load_file(str(work / "init" / "model.safetensors"))
    data = pack(train, tokenizer, args.seq_len, "train")
    t = time.perf_counter()
    trained = train_local(
        json.dumps(cfg),
        start,
        data,
        TrainConfig(
            steps=args.steps,
            batch_size=16,
            lr=args.lr,
            trainable="all",
            device=args.device,
        ),
    ).tensors
    model = build_model(json.dumps(cfg), trained, torch.bfloat16)
    model.save_pretrained(work / "trained")
    tokenizer.save_pretrained(work / "trained")
    import_checkpoint(Store(work / "qstore"), work / "trained", "fortunes")
    ids = pack(held, tokenizer, args.seq_len, "held-out")
    ids = ids[: max(1, args.held_tokens // args.seq_len)]
    print(
        f"\nMixtral ({args.q_layers} layers, {args.q_experts} experts of "
        f"{args.q_hidden} x {args.q_inter}, top-2, hidden {args.q_hidden}) "
        f"pre-trained {args.steps} steps on {len(train)} {what} in "
        f"{time.perf_counter() - t:.0f} s on {args.device}, stored bf16; measured "
        f"on {ids.numel()} tokens of {len(held)} held-out {what}",
        flush=True,
    )
    srv, target = serve(work / "qstore")
    try:
        with ParamClient(target, same_host=False) as c:
            print(
                "| width | KL nats/token | top-1 agreement | held-out loss full "
                "-> variant | expert bytes ÷ bf16 |"
            )
            print("|---|---|---|---|---|")
            for width in ("int8", "fp8"):
                q = variant_quality(c, "fortunes", width, ids, device=args.device)
                print(
                    f"| {width} | {q.kl:.5f} | {q.top1:.2%} | {q.loss_full:.4f} -> "
                    f"{q.loss_variant:.4f} | "
                    f"{q.expert_bytes_variant / q.expert_bytes_full:.3f} |",
                    flush=True,
                )
    finally:
        srv.stop(0)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--steps", type=int, default=600, help="pre-training steps")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--device", default="cpu", help="where the quality part runs")
    ap.add_argument("--q-hidden", type=int, default=128, help="quality model's hidden")
    ap.add_argument(
        "--q-inter", type=int, default=256, help="its experts' intermediate size"
    )
    ap.add_argument("--q-layers", type=int, default=2)
    ap.add_argument("--q-experts", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument(
        "--corpus",
        choices=["fortunes", "python"],
        default="fortunes",
        help="text to train and measure on: Debian's fortunes, or the "
        "interpreter's standard library sources",
    )
    ap.add_argument(
        "--max-chars", type=int, default=20_000_000, help="cap on the python corpus"
    )
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    ap.add_argument(
        "--held-tokens", type=int, default=4096, help="held-out tokens measured"
    )
    ap.add_argument("--skip-bytes", action="store_true", help="only the quality part")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="variants-") as tmp:
        if not args.skip_bytes:
            bytes_and_time(Path(tmp), args.layers, args.experts)
        if args.quality:
            quality(Path(tmp), args)


if __name__ == "__main__":
    main()

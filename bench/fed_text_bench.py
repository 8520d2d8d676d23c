"""Does federated fine-tuning learn on real text? Federated against
centralized and local-only training, whole tensors and LoRA.

    apt-get install -y fortunes        # the corpus: Debian's fortune files
    python bench/fed_learning_bench.py

Real text that no one here wrote, available offline: the quotations of
Debian's `fortunes` package, one document per fortune. A word-piece (BPE)
tokenizer and a tiny Mixtral are first pre-trained on the general files
(`fortunes`, `wisdom`, `people`, `miscellaneous`); then three institutions
hold one topic each, non-IID by construction: `computers`, `songs-poems`
and `science`, each with its own held-out 10 % of documents.

From the pre-trained model, with the same total number of optimizer steps
in every regime (rounds x local steps x institutions):
- federated: each round every institution runs `fed_clients.train.
  train_local` on its own split from the global weights, and the server's
  `sparse_average` (the aggregation the ServerApp runs) forms the next
  global weights; whole tensors (`trainable=all`), and LoRA (rank 8 on the
  experts and attention, nothing else trained);
- centralized: one model trained on the union of the institutions' data;
- local only: each institution alone on its own data.
Reported: held-out loss (nats per token) on each institution's split and on
their union.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(os.environ.get("FORTUNES_DIR", "/usr/share/games/fortunes"))
GENERAL = ("fortunes", "wisdom", "people", "miscellaneous")
TOPICS = {
    "inst-computers": "computers",
    "inst-poems": "songs-poems",
    "inst-science": "science",
}


def fortunes(name: str) -> list[str]:
    text = (CORPUS / name).read_text(encoding="utf-8", errors="replace")
    docs = [" ".join(d.split()) for d in text.split("\n%\n")]
    return [d for d in docs if len(d.split()) >= 4]


class Regime:
    """Local training as an institution runs it, in one mode."""

    def __init__(self, config_json: str, one: Any, lora: Any) -> None:
        self.config_json, self.one, self.lora = config_json, one, lora

    def train(
        self, start: dict[str, torch.Tensor], data: torch.Tensor, steps: int, seed: int
    ) -> Any:
        from fed_clients.train import TrainConfig, train_local

        fields = {f: getattr(self.one, f) for f in self.one.__dataclass_fields__}
        cfg = TrainConfig(**{**fields, "steps": steps, "seed": seed, "device": "cpu"})
        return train_local(self.config_json, start, data, cfg, lora=self.lora)

    def merged(
        self, start: dict[str, torch.Tensor], out: Any
    ) -> dict[str, torch.Tensor]:
        """The weights a training result stands for (adapters merged in)."""
        new: dict[str, torch.Tensor] = dict(out.tensors)
        if self.lora is not None:
            for k, (a, b) in out.adapters.items():
                low = (b @ a).reshape(start[k].shape)
                new[k] = start[k] + self.lora.scale * low
        return new


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=15)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=96)
    args = ap.parse_args()
    if not CORPUS.is_dir():
        ap.error(f"no corpus at {CORPUS}: apt-get install -y fortunes")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from fed_clients.data import pack
    from fed_clients.lora import LoRAConfig
    from fed_clients.train import (
        TrainConfig,
        build_model,
        evaluate,
        train_local,
    )
    from param_server.core.shards import classify, parse_expert_key
    from param_server.federation.aggregate import (
        ClientUpdate,
        Layout,
        WireTensor,
        sparse_average,
    )

    t_start = time.perf_counter()
    general = [d for f in GENERAL for d in fortunes(f)]
    own = {inst: fortunes(topic) for inst, topic in TOPICS.items()}
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        general + [d for docs in own.values() for d in docs],
        trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=["<unk>", "<eos>"]),
    )
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    )
    rng = random.Random(0)
    train: dict[str, torch.Tensor] = {}
    held: dict[str, torch.Tensor] = {}
    for inst, docs in own.items():
        docs = docs[:]
        rng.shuffle(docs)
        n = len(docs) // 10
        held[inst] = pack(docs[:n], tokenizer, args.seq_len, inst)
        train[inst] = pack(docs[n:], tokenizer, args.seq_len, inst)
    pre = pack(general, tokenizer, args.seq_len, "general")
    union_held = torch.cat(list(held.values()))
    union_train = torch.cat(list(train.values()))
    print(
        f"fortunes corpus: general {len(general)} documents ({len(pre)} sequences of "
        f"{args.seq_len}); "
        + ", ".join(
            f"{i} ({TOPICS[i]}): {len(train[i])} train / {len(held[i])} held-out "
            "sequences"
            for i in own
        )
        + f"; BPE vocabulary {len(tokenizer)}; {platform.node()}, torch "
        f"{torch.__version__}",
        flush=True,
    )

    cfg = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": len(tokenizer),
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 2,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "max_position_embeddings": args.seq_len,
        "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.0,
    }
    config_json = json.dumps(cfg)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="fed-learning-") as tmp:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
        model.save_pretrained(tmp)
        from safetensors.torch import load_file

        init = load_file(str(Path(tmp) / "model.safetensors"))
    base = train_local(
        config_json,
        init,
        pre,
        TrainConfig(steps=args.pretrain_steps, batch_size=16, lr=3e-3, trainable="all"),
    ).tensors
    specs = {}
    for key, t in base.items():
        shard, _ = classify(key)
        specs[key] = WireTensor(
            key, shard, key, "F32", tuple(t.shape), parse_expert_key(shard)
        )
    layout = Layout(specs)

    def losses(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        m = build_model(config_json, tensors)
        out = {i: evaluate(m, held[i]) for i in own}
        out["union"] = evaluate(m, union_held)
        return out

    total = args.rounds * args.local_steps * len(own)
    whole = TrainConfig(steps=1, batch_size=16, lr=1e-3, trainable="all")
    adapters = TrainConfig(steps=1, batch_size=16, lr=3e-3, trainable="experts")
    modes = {
        "whole tensors": (whole, None),
        "LoRA rank 8": (adapters, LoRAConfig(8, 16.0, "experts+attention")),
    }
    rows: list[tuple[str, dict[str, float]]] = [("pre-trained start", losses(base))]
    for mode, (one, lora) in modes.items():
        t0 = time.perf_counter()
        run = Regime(config_json, one, lora)
        glob = dict(base)
        for rnd in range(args.rounds):
            updates = []
            for n, inst in enumerate(own):
                out = run.train(glob, train[inst], args.local_steps, rnd * 7 + n)
                changed = {
                    k: t for k, t in out.tensors.items() if not torch.equal(t, glob[k])
                }
                tokens = {
                    (layer, e): float(c)
                    for layer, counts in out.expert_tokens.items()
                    for e, c in enumerate(counts)
                }
                updates.append(
                    ClientUpdate(
                        n,
                        inst,
                        len(train[inst]),
                        changed,
                        tokens,
                        adapters=out.adapters,
                    )
                )
            scale = lora.scale if lora is not None else 0.0
            glob.update(dict(sparse_average(updates, layout, glob, scale)))
        rows.append((f"federated, {mode}", losses(glob)))
        central = run.train(base, union_train, total, 1)
        rows.append((f"centralized, {mode}", losses(run.merged(base, central))))
        for inst in own:
            alone = run.train(base, train[inst], total, 2)
            rows.append((f"{inst} alone, {mode}", losses(run.merged(base, alone))))
        print(f"{mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(
        f"{args.rounds} rounds x {args.local_steps} local steps x {len(own)} "
        f"institutions = {total} optimizer steps in every regime (batch 16); "
        f"{time.perf_counter() - t_start:.0f} s in all"
    )
    names = [*own, "union"]
    print("| model | " + " | ".join(f"held-out {n}" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for name, loss in rows:
        print(f"| {name} | " + " | ".join(f"{loss[n]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()

"""Tiny transformers MoE models built from configs (nothing downloaded),
for the demo, the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM


def tiny_mixtral(
    *,
    layers: int = 2,
    experts: int = 4,
    hidden: int = 32,
    vocab: int = 128,
    max_positions: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> MixtralForCausalLM:
    """A randomly initialised Mixtral (2 experts per token, 4 attention heads,
    2 key-value heads, expert width twice `hidden`), in eval mode."""
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=max_positions,
        dtype=dtype,
    )
    model = MixtralForCausalLM(cfg)
    nn.Module.to(model, dtype)  # in place
    nn.Module.eval(model)
    return model

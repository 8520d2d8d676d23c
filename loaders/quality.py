"""How much an 8-bit variant of a model's experts changes what it computes:
measured on text, against the full-width model, before a fleet uses it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loaders.models import LazyModel, load_lazy_model
from param_server.client import ParamClient
from param_server.core.shards import is_expert_key


@dataclass(frozen=True, slots=True)
class VariantQuality:
    width: str
    kl: float
    """Mean KL divergence (nats per token) of the variant's next-token
    distribution from the full-width model's."""
    top1: float
    """Share of positions where both predict the same next token."""
    loss_full: float
    loss_variant: float
    """Mean next-token cross-entropy (nats) of each model on the text."""
    tokens: int
    expert_bytes_full: int
    expert_bytes_variant: int
    """Bytes of every expert as stored, and as the variant crosses the wire."""


def _all_experts(client: ParamClient, model: str, version: int | None) -> int:
    m = client.get_manifest(model, version)
    return sum(s.size for k, s in m.shards.items() if is_expert_key(k))


@torch.no_grad()
def _logits(lm: LazyModel, ids: torch.Tensor, batch: int) -> torch.Tensor:
    out = [
        lm.model(input_ids=ids[i : i + batch]).logits.float()
        for i in range(0, len(ids), batch)
    ]
    return torch.cat(out)


def variant_quality(
    client: ParamClient,
    model: str,
    width: str,
    ids: torch.Tensor,
    *,
    version: int | None = None,
    device: str = "cpu",
    batch: int = 8,
) -> VariantQuality:
    """Serves `model` twice from `client`, every expert in its slot: at full
    width and as the `width` variants; compares their next-token
    predictions on `ids` (int64 [sequences, length])."""
    budget = _all_experts(client, model, version)
    full = load_lazy_model(
        client, model, budget_bytes=budget, version=version, device=device
    )
    try:
        ref = _logits(full, ids.to(device), batch)
    finally:
        full.close()
    var = load_lazy_model(
        client, model, budget_bytes=budget, version=version, device=device, width=width
    )
    try:
        got = _logits(var, ids.to(device), batch)
    finally:
        var.close()
    m = client.get_manifest(model, version)
    experts = [k for k in m.shards if is_expert_key(k)]
    sizes = client.variants(m, experts, width)
    p = ref[:, :-1].log_softmax(-1)
    q = got[:, :-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    target = ids[:, 1:].to(device)

    def loss(logp: torch.Tensor) -> float:
        return float(
            nn.functional.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1))
        )

    return VariantQuality(
        width=width,
        kl=float(kl.mean()),
        top1=float((p.argmax(-1) == q.argmax(-1)).float().mean()),
        loss_full=loss(p),
        loss_variant=loss(q),
        tokens=int(target.numel()),
        expert_bytes_full=budget,
        expert_bytes_variant=sum(size for _, size in sizes.values()),
    )

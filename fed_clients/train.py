"""Local training and evaluation of the served MoE model on an institution's data.

Tensors arrive and leave in checkpoint naming (what the store holds); the
model is built from them through transformers' own loading, so any family
the store imports works here without a name table of our own.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fed_clients.lora import Adapters, LoRAConfig
from param_server.core.shards import parse_wire_key

logger = logging.getLogger(__name__)

TRAINABLE_PRESETS: dict[str, str] = {
    "experts": r"\.experts\.",
    "experts+router": r"\.experts\.|\.(?:mlp|block_sparse_moe)\.gate\.",
    "all": r".",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """One round of local training."""

    steps: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    trainable: str = "experts"
    """A preset (experts, experts+router, all) or a regex over parameter names."""
    proximal_mu: float = 0.0
    """FedProx: weight of ||w - w_global||^2 / 2 in the loss."""
    seed: int = 0
    micro_batch_size: int | None = None
    """Sequences per forward pass; a step accumulates gradients over
    `batch_size` of them (None: the whole batch at once). What a small GPU or
    a CPU sets to reach the configured batch."""
    device: str | None = None
    """Where to train; None: CUDA when there is one, else the CPU."""
    precision: str = "auto"
    """`fp32`; `bf16` (bf16 autocast over fp32 weights: mixed precision);
    `auto`: bf16 on CUDA when the model is stored in bf16, else fp32."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(
                f"micro-batch size must be >= 1, got {self.micro_batch_size}"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(
                f"precision must be auto, fp32 or bf16, got {self.precision!r}"
            )
        try:
            re.compile(TRAINABLE_PRESETS.get(self.trainable, self.trainable))
        except re.error as e:
            raise ValueError(f"trainable {self.trainable!r} is not a regex: {e}") from e


@dataclass(slots=True)
class TrainResult:
    tensors: dict[str, torch.Tensor]
    """Checkpoint name (wire key) -> value after training, stored dtype."""
    num_examples: int
    train_loss: float
    expert_tokens: dict[int, list[int]] = field(default_factory=dict)
    """Layer -> tokens routed to each expert during training."""
    held_out_loss: float | None = None
    """Loss of the received model on the institution's held-out split."""
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """LoRA mode: wire key -> (A, B) of every adapter that learned something
    (the tensor's update is `scale * B @ A`); `tensors` then differ from the
    received ones only where a tensor was trained in full."""


def _to_checkpoint_layout(
    tensors: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Restacks `name@E` expert slices into fused checkpoint tensors."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, expert = parse_wire_key(key)
        if expert is not None:
            stacks.setdefault(name, {})[expert] = t
        else:
            out[key] = t
    for name, parts in stacks.items():
        order = [parts[e] for e in sorted(parts)]
        out[name] = (
            torch.cat(order)
            if order[0].dim() and order[0].shape[0] == 1
            else torch.stack(order)
        )
    return out


def _from_checkpoint_layout(
    state: Mapping[str, torch.Tensor], keys: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors back into the wire keys (and shapes) of `keys`."""
    out: dict[str, torch.Tensor] = {}
    for key, like in keys.items():
        name, expert = parse_wire_key(key)
        if expert is not None:
            part = state[name][expert]
            out[key] = part.reshape(like.shape)
        else:
            out[key] = state[key]
    return out


def build_model(
    config_json: str,
    tensors: Mapping[str, torch.Tensor],
    train_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """The model with these weights (bf16 weights are widened for training)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="fed-model-") as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(config_json)
        # Flower's transport deduplicates equal arrays, so two names may view
        # the same bytes; safetensors refuses shared storage: copy.
        state = {k: v.clone() for k, v in _to_checkpoint_layout(tensors).items()}
        save_file(state, d / "model.safetensors")
        config = AutoConfig.from_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(
            d, config=config, dtype=train_dtype or "auto"
        )
    return model


def checkpoint_state(
    model: nn.Module, like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's weights in checkpoint naming, cast to the dtypes of `like`."""
    with tempfile.TemporaryDirectory(prefix="fed-model-") as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(f))
    out = _from_checkpoint_layout(state, like)
    return {k: t.to(like[k].dtype) for k, t in out.items()}


def _batches(n: int, steps: int, batch: int, g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, n, (min(batch, n),), generator=g) for _ in range(steps)]


def train_local(
    config_json: str,
    received: Mapping[str, torch.Tensor],
    data: torch.Tensor,
    cfg: TrainConfig,
    held_out: torch.Tensor | None = None,
    lora: LoRAConfig | None = None,
) -> TrainResult:
    """Trains the selected parameters for `cfg.steps` steps on `data`; with
    `held_out`, first measures the received model's loss on it. With `lora`,
    the routed experts (and the modules `lora.targets` names) learn through
    low-rank adapters instead, and parameters `cfg.trainable` selects beyond
    those are trained in full."""
    torch.manual_seed(cfg.seed)
    device = torch.device(
        cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = build_model(config_json, received).to(device)
    stored = {t.dtype for t in received.values() if t.is_floating_point()}
    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and stored == {torch.bfloat16}
    )
    held_out = held_out.to(device) if held_out is not None else None
    before = None
    if held_out is not None and len(held_out):
        with torch.no_grad():
            before = evaluate(model, held_out)
    model.train()
    pattern = re.compile(TRAINABLE_PRESETS.get(cfg.trainable, cfg.trainable))
    adapters = Adapters(model, received, lora) if lora is not None else None
    adapted = adapters.base_parameters() if adapters is not None else set()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name)) and id(p) not in adapted)
        if p.requires_grad:
            params.append(p)
    full = bool(params)  # tensors trained in full (all of them, without LoRA)
    if adapters is not None:
        params.extend(adapters.parameters())
    if not params:
        raise ValueError(
            f"trainable={cfg.trainable!r} selects no parameter of the model"
        )
    anchors = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else []
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    tokens: dict[int, torch.Tensor] = {}
    losses: list[float] = []
    micro = cfg.micro_batch_size or cfg.batch_size
    for idx in _batches(len(data), cfg.steps, cfg.batch_size, g):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for n, part in enumerate(torch.split(idx, micro)):
            ids = data[part].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=ids, labels=ids, output_router_logits=k > 0)
            # Sequences are packed to one length: the batch's mean loss is
            # the micro-batches' means weighted by their sizes.
            loss = out.loss * (len(part) / len(idx))
            if anchors and n == 0:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True)
                )
                loss = loss + cfg.proximal_mu / 2 * prox
            loss.backward()
            step_loss += float(loss.detach())
            for layer, logits in enumerate(getattr(out, "router_logits", None) or ()):
                chosen = logits.detach().topk(k, dim=-1).indices.flatten()
                counts = torch.bincount(chosen, minlength=logits.shape[-1]).cpu()
                tokens[layer] = tokens.get(layer, 0) + counts
        opt.step()
        losses.append(step_loss)
    model.eval()
    # Without tensors trained in full nothing but the adapters changed: skip
    # writing the model out to read its tensors back.
    state = checkpoint_state(model, received) if full else dict(received)
    if not all(math.isfinite(x) for x in losses):
        logger.warning("local training diverged (non-finite loss)")
    return TrainResult(
        tensors=state,
        num_examples=len(data),
        train_loss=sum(losses) / len(losses),
        expert_tokens={layer: [int(c) for c in t] for layer, t in tokens.items()},
        held_out_loss=before,
        adapters=adapters.trained() if adapters is not None else {},
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of `data`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids = data[i : i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        target = ids[:, 1:]
        total += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                reduction="sum",
            )
        )
        count += target.numel()
    return total / count

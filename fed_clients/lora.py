"""Expert-wise low-rank adapters (LoRA) for local training.

Each checkpoint tensor an adapter targets, `W` (out x in), learns
`W + scale * B @ A` with `A` (rank x in) and `B` (out x rank), `B` starting at
zero. For routed experts the checkpoint keeps one tensor per expert and
projection (`w1`, `w3`; `gate_proj`, `up_proj`), which transformers fuses
into one 3-D parameter per layer; each of those checkpoint tensors gets its
own adapter, so what an institution sends is in the store's own naming and
the server can form each tensor's update `scale * B @ A` exactly.

The adapted experts run the eager experts loop of transformers with the
low-rank terms added before the activation and after the down projection:
only the experts a batch routes to are computed, and the fused weights are
never copied. An expert no token reached keeps `B == 0` and is not sent.
Attention projections (optional) get the same adapter through a forward
hook on their `nn.Linear`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from param_server.core.errors import InvalidInputError
from param_server.core.shards import (
    ModelFamily,
    by_expert_suffix,
    classify,
    lazy_family,
    parse_expert_key,
    parse_wire_key,
)

IMPLEMENTATION = "param_server_lora"
"""The experts implementation name the adapted model runs."""

TARGET_PRESETS: dict[str, str] = {
    "experts": r"$^",  # experts always; nothing else
    "experts+attention": r"self_attn\.(?:q|k|v|o)_proj$",
}
"""`lora-targets`: routed experts, plus the `nn.Linear` modules whose name
matches this regex (a preset, or a regex of your own)."""


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Adapters of one round (what the server's train config asks for)."""

    rank: int
    alpha: float
    targets: str = "experts"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora-rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"lora-alpha must be > 0, got {self.alpha}")
        try:
            re.compile(TARGET_PRESETS.get(self.targets, self.targets))
        except re.error as e:
            raise ValueError(
                f"lora-targets {self.targets!r} is not a regex: {e}"
            ) from e

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(slots=True)
class _Part:
    """One checkpoint tensor inside a fused expert parameter."""

    keys: list[str | None]
    """Wire key of each expert's tensor (None: the layer lacks that expert)."""
    a: nn.Parameter
    """(experts, rank, in)"""
    b: nn.Parameter
    """(experts, out, rank)"""


class _ExpertAdapters(nn.Module):
    """Adapters of one layer's experts, by fused parameter."""

    def __init__(self, parts: dict[str, list[_Part]], scale: float) -> None:
        super().__init__()
        self.parts = parts
        self.scale = scale
        self.params = nn.ParameterList(
            [p for ps in parts.values() for part in ps for p in (part.a, part.b)]
        )

    def delta(self, param: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """scale * x @ (B A)^T for expert `expert`'s rows of `param`, fused."""
        outs = [
            nn.functional.linear(nn.functional.linear(x, p.a[expert]), p.b[expert])
            for p in self.parts[param]
        ]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out * self.scale


def lora_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' eager experts loop, each projection with its adapter."""
    lora: _ExpertAdapters = self.__dict__["_fed_lora"]
    gate_up_proj, down_proj = _weight(self, "gate_up_proj"), _weight(self, "down_proj")
    num_experts = int(gate_up_proj.shape[0])
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1)
        mask = mask.permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in [i for i in hit[:, 0].tolist() if i != num_experts]:
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]
        h = nn.functional.linear(x, gate_up_proj[e])
        h = h + lora.delta("gate_up_proj", e, x)
        gate, up = h.chunk(2, dim=-1)
        current = self.act_fn(gate) * up  # type: ignore[operator]
        out = nn.functional.linear(current, down_proj[e])
        out = out + lora.delta("down_proj", e, current)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _weight(module: nn.Module, name: str) -> torch.Tensor:
    t = getattr(module, name)
    assert isinstance(t, torch.Tensor)
    return t


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, lora_experts_forward)


def _init_a(a: torch.Tensor) -> None:
    # PEFT's default for A (Kaiming-uniform with a = sqrt(5)): U(-1/sqrt(in), ..).
    bound = 1.0 / math.sqrt(a.shape[-1])
    with torch.no_grad():
        a.uniform_(-bound, bound)


def _expert_keys(
    received: Mapping[str, torch.Tensor],
) -> dict[int, dict[int, dict[str, str]]]:
    """layer -> expert -> checkpoint suffix (`w1.weight`, or `gate_up_proj`
    for a fused checkpoint) -> wire key, for every routed expert's tensor."""
    out: dict[int, dict[int, dict[str, str]]] = {}
    for key in received:
        name, slice_of = parse_wire_key(key)
        shard, fused = classify(name)
        if fused and slice_of is not None:
            layer = int(shard.split(".")[1])
            expert = slice_of
        else:
            le = parse_expert_key(shard)
            if le is None:
                continue
            layer, expert = le
        suffix = next(iter(by_expert_suffix({name: 0})))
        out.setdefault(layer, {}).setdefault(expert, {})[suffix] = key
    return out


def _matrix_shape(t: torch.Tensor, key: str) -> tuple[int, int]:
    if t.dim() < 2 or math.prod(t.shape[:-2]) != 1:
        raise InvalidInputError(
            f"{key}: shape {list(t.shape)} is not a matrix; low-rank adapters "
            "need 2-D weights"
        )
    return int(t.shape[-2]), int(t.shape[-1])


class Adapters:
    """The adapters attached to one model for one round of training."""

    def __init__(
        self,
        model: nn.Module,
        received: Mapping[str, torch.Tensor],
        cfg: LoRAConfig,
    ) -> None:
        """Attaches adapters to `model`'s routed experts (and the `nn.Linear`
        modules `cfg.targets` names), in place, and switches its experts to
        the adapted loop.

        Raises:
            InvalidInputError: a family without known expert layout, or
                checkpoint tensors that do not make up the model's experts.
        """
        self.cfg = cfg
        self.scale = cfg.scale
        model_type = str(getattr(model.config, "model_type", ""))
        family = lazy_family(model_type)
        device = next(model.parameters()).device
        keys = _expert_keys(received)
        self.experts: dict[int, _ExpertAdapters] = {}
        self._modules: list[nn.Module] = []
        self._weights: list[torch.Tensor] = []
        for layer, module in _experts_modules(model, family).items():
            self._modules.append(module)
            by_expert = keys.get(layer)
            if not by_expert:
                raise InvalidInputError(
                    f"layer {layer} has experts but the checkpoint names none"
                )
            parts = self._layer_parts(module, layer, by_expert, family, received)
            adapters = _ExpertAdapters(parts, self.scale)
            module.__dict__["_fed_lora"] = adapters
            self.experts[layer] = adapters
        if not self.experts:
            raise InvalidInputError(f"{model_type} has no routed experts to adapt")
        self.linear: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        pattern = re.compile(TARGET_PRESETS.get(cfg.targets, cfg.targets))
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or not pattern.search(name):
                continue
            key = f"{name}.weight"
            if key not in received:
                raise InvalidInputError(
                    f"lora-targets names {name!r}, which has no checkpoint "
                    f"tensor {key!r}"
                )
            out_f, in_f = module.out_features, module.in_features
            a = nn.Parameter(torch.empty(cfg.rank, in_f, device=device))
            _init_a(a)
            b = nn.Parameter(torch.zeros(out_f, cfg.rank, device=device))
            module.register_forward_hook(_linear_hook(a, b, self.scale))
            self.linear[key] = (a, b)
            self._weights.append(module.weight)
        _register()
        for module in [model, *model.modules()]:
            cfg_of = getattr(module, "config", None)
            if cfg_of is not None and hasattr(cfg_of, "_experts_implementation"):
                cfg_of._experts_implementation = IMPLEMENTATION

    def _layer_parts(
        self,
        module: nn.Module,
        layer: int,
        by_expert: dict[int, dict[str, str]],
        family: ModelFamily,
        received: Mapping[str, torch.Tensor],
    ) -> dict[str, list[_Part]]:
        parts: dict[str, list[_Part]] = {}
        num_experts = int(_weight(module, "gate_up_proj").shape[0])
        first = by_expert[min(by_expert)]
        device = _weight(module, "gate_up_proj").device
        for param, suffixes in family.params:
            fused = _weight(module, param)
            names = [param] if param in first else list(suffixes)
            start = 0
            parts[param] = []
            for suffix in names:
                if suffix not in first:
                    raise InvalidInputError(
                        f"layer {layer}: no expert tensor ending in {suffix!r} "
                        f"(have {sorted(first)})"
                    )
                rows, cols = _matrix_shape(received[first[suffix]], first[suffix])
                if cols != fused.shape[-1]:
                    raise InvalidInputError(
                        f"layer {layer} {suffix}: {cols} columns, but the "
                        f"model's {param} has {fused.shape[-1]}"
                    )
                a = nn.Parameter(
                    torch.empty(num_experts, self.cfg.rank, cols, device=device)
                )
                _init_a(a)
                b = nn.Parameter(
                    torch.zeros(num_experts, rows, self.cfg.rank, device=device)
                )
                parts[param].append(
                    _Part(
                        [by_expert.get(e, {}).get(suffix) for e in range(num_experts)],
                        a,
                        b,
                    )
                )
                start += rows
            if start != fused.shape[-2]:
                raise InvalidInputError(
                    f"layer {layer}: {' + '.join(names)} make {start} rows, but "
                    f"the model's {param} has {fused.shape[-2]}"
                )
        return parts

    def base_parameters(self) -> set[int]:
        """ids of the model parameters the adapters stand in for (frozen)."""
        out = {
            id(getattr(m, param))
            for m in self._modules
            for param in ("gate_up_proj", "down_proj")
        }
        out.update(id(w) for w in self._weights)
        return out

    def parameters(self) -> list[nn.Parameter]:
        out = [p for a in self.experts.values() for p in a.params]
        out.extend(p for ab in self.linear.values() for p in ab)
        return out

    def trained(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Wire key -> (A, B), detached on the CPU, for every adapter that
        learned something (`B != 0`): an expert no token reached is left out."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for adapters in self.experts.values():
            for ps in adapters.parts.values():
                for part in ps:
                    moved = part.b.detach().flatten(1).ne(0).any(dim=1).tolist()
                    for e, key in enumerate(part.keys):
                        if key is not None and moved[e]:
                            out[key] = (
                                part.a[e].detach().cpu(),
                                part.b[e].detach().cpu(),
                            )
        for key, (a, b) in self.linear.items():
            if bool(b.detach().ne(0).any()):
                out[key] = (a.detach().cpu(), b.detach().cpu())
        return out


def _experts_modules(model: nn.Module, family: ModelFamily) -> dict[int, nn.Module]:
    layers = model.model.layers  # type: ignore[union-attr]
    out: dict[int, nn.Module] = {}
    for i, layer in enumerate(layers):  # type: ignore[arg-type]
        found: nn.Module | None = layer
        for attr in family.experts_path.split("."):
            found = getattr(found, attr, None)
        if found is not None and hasattr(found, "gate_up_proj"):
            out[i] = found
    return out


def _linear_hook(a: nn.Parameter, b: nn.Parameter, scale: float):  # type: ignore[no-untyped-def]
    def hook(
        module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> torch.Tensor:
        low = nn.functional.linear(nn.functional.linear(args[0], a), b)
        return out + low * scale

    return hook

"""Shard keys and model families: the one place that knows how a model's
tensors are named, how they group into shards and how a live model's experts
module is laid out.

Shard keys:
    layers.{L}.experts.{E}   every tensor of expert E of layer L
    layers.{L}.dense         the rest of layer L: attention, norms, router,
                             shared experts, a dense MLP
    global                   everything else: embeddings, final norm, head

A federated round's wire key is a checkpoint tensor name, or `name@E` for
expert E's slice of a fused `[num_experts, ...]` tensor.

Model families are the rows of FAMILIES. Adding a family whose experts are
named differently means adding a row there, nothing else; a row with
`params` can also be loaded lazily on inference nodes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from param_server.core.errors import InvalidInputError

GLOBAL_KEY = "global"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ModelFamily:
    """How one family of checkpoints names its routed-expert tensors, and
    (when `params` is set) how its transformers experts module holds them."""

    scheme: str
    """A name for the naming scheme, shown in logs and errors."""
    model_types: tuple[str, ...]
    """`model_type` values of config.json known to use it."""
    pattern: str
    """Regex over the full tensor name with groups `layer` and, unless
    `fused`, `expert`."""
    fused: bool = False
    """All experts of the layer in one tensor, split along dim 0 on import."""
    params: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Lazy loading: the experts module's fused parameter -> the per-expert
    checkpoint suffixes concatenated on dim 0 to make it. Empty: this family
    imports and exports, but is not loaded lazily."""
    renames: tuple[tuple[str, str], ...] = ()
    """Lazy loading: substring renames from checkpoint to module names
    (dense tensors)."""
    experts_path: str = "mlp.experts"
    """Lazy loading: attribute path of the experts module in a decoder layer."""
    router_path: str = "mlp.gate"
    """Lazy loading: attribute path of the router in a decoder layer (its
    forward returns logits, or a tuple ending in the routed expert ids)."""

    @property
    def lazy(self) -> bool:
        return bool(self.params)


# A weight, or a companion of it in a checkpoint that arrives quantized
# (see param_server.core.prequant): its scales, zero point, activation scale.
_WEIGHT = (
    r"\.(?:weight(?:_scale_inv|_scale|_zero_point|_g_idx|_packed|_shape)?"
    r"|input_scale|input_zero_point)"
)
_GATE_UP_DOWN = (
    r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)"
    r"\.(?:gate|up|down)_proj" + _WEIGHT
)
_GATE_UP_DOWN_PARAMS = (
    ("gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
    ("down_proj", ("down_proj.weight",)),
)

FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "mixtral",
        ("mixtral",),
        r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)"
        r"\.w[123]" + _WEIGHT,
        params=(
            ("gate_up_proj", ("w1.weight", "w3.weight")),
            ("down_proj", ("w2.weight",)),
        ),
        renames=((".block_sparse_moe.", ".mlp."),),
    ),
    # Shared experts (Qwen2-MoE, DeepSeek-V3) are dense tensors of the layer.
    ModelFamily(
        "gate-up-down",
        ("qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3"),
        _GATE_UP_DOWN,
        params=_GATE_UP_DOWN_PARAMS,
    ),
    ModelFamily("gate-up-down", ("deepseek_v2",), _GATE_UP_DOWN),
    ModelFamily(
        "fused",
        ("transformers-5-state-dict", "gpt_oss"),
        r"model\.layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe)\.experts"
        r"\.(?P<param>[A-Za-z0-9_]+)(?:\.weight)?",
        fused=True,
    ),
)
_LAYER = re.compile(r"model\.layers\.(?P<layer>\d+)\..+")
_COMPILED = tuple((row, re.compile(row.pattern)) for row in FAMILIES)
_EXPERT_KEY = re.compile(r"layers\.(\d+)\.experts\.(\d+)")
_EXPERT_NAME = re.compile(r".*\.experts\.(?:\d+\.)?(?P<suffix>[A-Za-z0-9_.]+)")


def expert_key(layer: int, expert: int) -> str:
    return f"layers.{layer}.experts.{expert}"


def dense_key(layer: int) -> str:
    return f"layers.{layer}.dense"


def parse_expert_key(key: str) -> tuple[int, int] | None:
    """(layer, expert) of an expert shard key, else None."""
    m = _EXPERT_KEY.fullmatch(key)
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_expert_key(key: str) -> bool:
    """True for the shard key of one routed expert (`layers.L.experts.E`)."""
    return _EXPERT_KEY.fullmatch(key) is not None


def classify(name: str) -> tuple[str, bool]:
    """Maps a checkpoint tensor name to (shard key, fused).

    For a fused tensor the key is that of expert 0's layer with "*" as the
    expert; the caller splits it along dim 0.
    """
    for row, rx in _COMPILED:
        m = rx.fullmatch(name)
        if m:
            layer = int(m.group("layer"))
            if row.fused:
                return f"layers.{layer}.experts.*", True
            return expert_key(layer, int(m.group("expert"))), False
    m = _LAYER.fullmatch(name)
    if m:
        return dense_key(int(m.group("layer"))), False
    return GLOBAL_KEY, False


def lazy_family(model_type: str) -> ModelFamily:
    """The row that loads `model_type` lazily."""
    for f in FAMILIES:
        if f.lazy and model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES if f.lazy for t in f.model_types)
    raise InvalidInputError(
        f"no lazy-expert support for model_type {model_type!r}; supported: {known}"
    )


def by_expert_suffix(named: Mapping[str, T]) -> dict[str, T]:
    """Re-keys an expert shard's entries by what follows `.experts.{E}.`
    (`w1.weight`, `gate_proj.weight`) or `.experts.` (fused: `gate_up_proj`)."""
    out = {}
    for name, value in named.items():
        m = _EXPERT_NAME.fullmatch(name)
        out[m.group("suffix") if m else name] = value
    return out


# --- wire keys of federated rounds ---------------------------------------------


def wire_key(name: str, expert: int | None = None) -> str:
    """The wire key of tensor `name`, or of expert `expert`'s slice of it."""
    return name if expert is None else f"{name}@{expert}"


def parse_wire_key(key: str) -> tuple[str, int | None]:
    """(tensor name, expert or None) of a wire key."""
    name, sep, expert = key.rpartition("@")
    if sep and expert.isdigit():
        return name, int(expert)
    return key, None

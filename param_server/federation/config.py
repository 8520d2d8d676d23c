"""The federation's settings, parsed once from Flower's run config."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from param_server.core.errors import InvalidInputError

SPARSE_FEDAVG = "sparse-fedavg"
CLIENT_KEYS = ("data-root",)
"""Run config keys the institutions' ClientApp reads (the same run config)."""
STRATEGIES = (SPARSE_FEDAVG, "fedavg", "fedprox", "fedadam", "fedtrimmedavg")


@dataclass(frozen=True, kw_only=True, slots=True)
class FederationConfig:
    """The server side's settings; `from_run_config` reads Flower's run config."""

    model: str
    """Model name in the store; its HEAD is where every round starts."""
    param_server: str = "127.0.0.1:50051"
    """Where the param-server daemon listens (host:port or grpc://host:port)."""
    num_rounds: int = 3
    strategy: str = SPARSE_FEDAVG
    """sparse-fedavg (ours), fedavg, fedprox, fedadam or fedtrimmedavg."""
    min_clients: int = 2
    """Valid updates a round needs to commit; fewer and it commits nothing."""
    min_available: int = 2
    """Connected institutions to wait for before a round starts."""
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    """Seconds to wait for replies; an institution that dies mid-round is left out."""
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    trainable: str = "experts"
    """What institutions train: experts, experts+router, all, or a regex."""
    weight_by_tokens: bool = True
    max_update_norm: float = 0.0
    """Reject an update whose L2 distance from the global model exceeds this;
    0 for no bound."""
    proximal_mu: float = 0.01
    trim_beta: float = 0.2
    server_lr: float = 0.01
    dp_clipping_norm: float = 0.0
    """> 0 turns on client-side fixed-clipping DP (dense strategies only)."""
    dp_noise_multiplier: float = 0.0
    seed: int = 0
    lora_rank: int = 0
    """> 0: institutions train low-rank adapters of this rank (LoRA) and send
    only those; the server adds each tensor's weighted mean update
    (alpha / rank) * B @ A to the stored weights. 0: whole tensors."""
    lora_alpha: float = 16.0
    lora_targets: str = "experts"
    """LoRA mode: experts, experts+attention, or a regex over the names of
    further nn.Linear modules to adapt."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidInputError(
                f"unknown strategy {self.strategy!r}; choose one of "
                f"{', '.join(STRATEGIES)}"
            )
        if self.num_rounds < 1 or self.min_clients < 1 or self.local_steps < 1:
            raise InvalidInputError(
                "num-rounds, min-clients and local-steps must be at least 1"
            )
        if not 0 < self.fraction_train <= 1:
            raise InvalidInputError("fraction-train must be in (0, 1]")
        if self.max_update_norm < 0 or self.round_timeout <= 0:
            raise InvalidInputError("max-update-norm >= 0 and round-timeout > 0")
        if self.dp_clipping_norm > 0 and self.sparse:
            raise InvalidInputError(
                "differential privacy (dp-clipping-norm > 0) needs dense updates: "
                "Flower's clipping compares every tensor; use strategy='fedavg' or "
                "another dense strategy"
            )
        if self.lora_rank < 0 or not self.lora_alpha > 0:
            raise InvalidInputError("lora-rank must be >= 0 and lora-alpha > 0")
        if self.lora_rank and not self.sparse:
            raise InvalidInputError(
                f"LoRA updates (lora-rank {self.lora_rank}) are aggregated by "
                f"{SPARSE_FEDAVG} only; set strategy='{SPARSE_FEDAVG}' or "
                "lora-rank=0"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Reads kebab-case keys (`num-rounds`, `param-server`, ...); unknown
        keys are an error so a typo does not silently fall back to a default."""
        names = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            f = names.get(key)
            if f is None:
                if key in CLIENT_KEYS:
                    continue  # the ClientApp's, in the same run config
                close = difflib.get_close_matches(key, [*names, *CLIENT_KEYS], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise InvalidInputError(
                    f"unknown run config key {key!r}; {hint}known keys: "
                    f"{', '.join(sorted([*names, *CLIENT_KEYS]))}"
                )
            kwargs[f.name] = _typed(key, f.type, value)
        if "model" not in kwargs:
            raise InvalidInputError("run config needs model='<name in the store>'")
        return cls(**kwargs)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case run config `from_run_config` reads back."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def sparse(self) -> bool:
        return self.strategy == SPARSE_FEDAVG

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0


def _typed(key: str, kind: Any, value: Any) -> Any:
    """`value` as the field's type (`kind`: its annotation, a string here)."""
    want = {"int": int, "float": float, "bool": bool, "str": str}.get(str(kind))
    if want is None:
        return value
    if (want is bool) != isinstance(value, bool):  # True is an int, too
        raise InvalidInputError(
            f"run config key {key!r} needs {want.__name__}, got {value!r}"
        )
    if want is bool:
        return value
    if want is str:
        if not isinstance(value, str):
            raise InvalidInputError(f"run config key {key!r} needs a string")
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"run config key {key!r} needs a number, got {value!r}"
        ) from None
    if not math.isfinite(number) or (want is int and number != int(number)):
        raise InvalidInputError(
            f"run config key {key!r} needs a finite {want.__name__}, got {value!r}"
        )
    return want(number)

"""The strategies a federation can run: our sparse FedAvg and Flower's own.

`SparseFedAvg` is a Flower `Strategy` (it samples and configures like FedAvg)
whose aggregation is expert-wise and sparse (see `aggregate`). Flower's
FedAvg, FedProx, FedAdam and FedTrimmedAvg run on dense updates, and any of
them can be wrapped in Flower's client-side fixed-clipping DP.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Strategy,
)

from param_server.core.errors import InvalidInputError
from param_server.federation import protocol
from param_server.federation.aggregate import (
    ClientUpdate,
    Layout,
    Rejection,
    UpdateRejectedError,
    institution_of,
    merge_into_record,
    parse_reply,
    sparse_average,
)
from param_server.federation.config import SPARSE_FEDAVG, FederationConfig

logger = logging.getLogger(__name__)


class SparseFedAvg(FedAvg):
    """FedAvg over key subsets: each tensor averaged over the clients that sent it.

    Call `set_model` with the round's layout and global arrays before
    `configure_train`; `aggregate_updates` takes already validated updates,
    `aggregate_train` (Flower's entry point) parses replies itself.
    """

    def __init__(
        self,
        *,
        weight_by_tokens: bool = True,
        lora_rank: int = 0,
        lora_scale: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.weight_by_tokens = weight_by_tokens
        self.lora_rank = lora_rank
        """> 0: replies may carry low-rank adapters of this rank."""
        self.lora_scale = lora_scale
        self._layout: Layout | None = None
        self._current: ArrayRecord | None = None
        self._current_tensors: dict[str, torch.Tensor] = {}
        self.last_changed: list[str] = []
        self.last_rejected: list[Rejection] = []

    def set_model(
        self, layout: Layout, arrays: ArrayRecord, tensors: dict[str, torch.Tensor]
    ) -> None:
        self._layout, self._current, self._current_tensors = layout, arrays, tensors

    def summary(self) -> None:
        super().summary()
        logger.info(
            "sparse expert-wise averaging, weight by tokens: %s", self.weight_by_tokens
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._current is not arrays:
            raise InvalidInputError(
                "SparseFedAvg.configure_train: call set_model() with these arrays "
                "first (the strategy needs the model's layout)"
            )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_updates(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not updates:
            return None, None
        if self._layout is None or self._current is None:
            raise InvalidInputError("SparseFedAvg: set_model() was never called")
        if not self.weight_by_tokens:
            for u in updates:
                u.expert_tokens = {}
        averaged = sparse_average(
            updates, self._layout, self._current_tensors, self.lora_scale
        )
        arrays, self.last_changed = merge_into_record(self._current, averaged)
        metrics = MetricRecord(
            {protocol.NUM_EXAMPLES: sum(u.num_examples for u in updates)}
        )
        losses = [
            (u.train_loss, u.num_examples) for u in updates if u.train_loss is not None
        ]
        if losses:
            total = sum(n for _, n in losses)
            metrics[protocol.TRAIN_LOSS] = sum(x * n for x, n in losses) / total
        return arrays, metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry point: validates each reply as the project's own
        round does (a client error, NaN/Inf, unknown tensors, wrong shapes or
        dtypes), leaves the bad ones out (listed in `last_rejected`) and
        averages the rest; nothing when fewer than `min_train_nodes` remain.
        """
        if self._layout is None:
            raise InvalidInputError("SparseFedAvg: set_model() was never called")
        layout = self._layout
        updates: list[ClientUpdate] = []
        self.last_rejected = []
        for msg in replies:
            try:
                updates.append(
                    parse_reply(
                        msg,
                        layout,
                        self._current_tensors,
                        sent_dtypes={k: s.dtype for k, s in layout.specs.items()},
                        lora_rank=self.lora_rank,
                        lora_scale=self.lora_scale,
                    )
                )
            except UpdateRejectedError as e:
                r = Rejection(msg.metadata.src_node_id, institution_of(msg), str(e))
                logger.warning(
                    "round %d: rejected the update of %s (node %d): %s",
                    server_round,
                    r.institution,
                    r.node_id,
                    r.reason,
                )
                self.last_rejected.append(r)
        if len(updates) < self.min_train_nodes:
            logger.warning(
                "round %d: only %d valid update(s), %d needed; no aggregate",
                server_round,
                len(updates),
                self.min_train_nodes,
            )
            return None, None
        return self.aggregate_updates(updates)


def build_strategy(config: FederationConfig) -> tuple[Strategy, dict[str, Any]]:
    """The strategy `config` names, and its settings for provenance.

    DP with the sparse strategy is refused by FederationConfig itself:
    Flower's clipping needs every tensor in every update.
    """
    c = config
    common: dict[str, Any] = {
        "fraction_train": c.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": c.min_clients,
        "min_available_nodes": max(c.min_available, c.min_clients),
        "arrayrecord_key": protocol.ARRAYS,
        "configrecord_key": protocol.CONFIG,
    }
    settings: dict[str, Any] = {
        "name": c.strategy,
        "fraction_train": c.fraction_train,
        "min_clients": c.min_clients,
    }
    strategy: Strategy
    if c.strategy == SPARSE_FEDAVG:
        strategy = SparseFedAvg(
            weight_by_tokens=c.weight_by_tokens,
            lora_rank=c.lora_rank,
            lora_scale=c.lora_scale,
            **common,
        )
        settings["weight_by_tokens"] = c.weight_by_tokens
    elif c.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif c.strategy == "fedprox":
        strategy = FedProx(proximal_mu=c.proximal_mu, **common)
        settings["proximal_mu"] = c.proximal_mu
    elif c.strategy == "fedadam":
        strategy = FedAdam(eta=c.server_lr, **common)
        settings["eta"] = c.server_lr
    else:  # FederationConfig admits only STRATEGIES
        strategy = FedTrimmedAvg(beta=c.trim_beta, **common)
        settings["beta"] = c.trim_beta
    if c.dp_clipping_norm > 0:
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=c.dp_noise_multiplier,
            clipping_norm=c.dp_clipping_norm,
            num_sampled_clients=c.min_clients,
        )
        settings["dp"] = {
            "kind": "client-side fixed clipping",
            "clipping_norm": c.dp_clipping_norm,
            "noise_multiplier": c.dp_noise_multiplier,
        }
    return strategy, settings

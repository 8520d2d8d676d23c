"""The reconciler: asks the server which version to serve (HEAD, or the
pinned one), fetches and prepares what changed off the serving path, and
hands a complete version to the gate. On failure the old version keeps
serving and it retries with backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from loaders.cache import ExpertFetchError
from loaders.gate import Prepared, SwapError, SwapGate
from loaders.models import LazyModel, check_dense, check_expert_shapes, dense_state
from param_server.core.backoff import Backoff
from param_server.core.errors import InvalidInputError, ParamServerError
from param_server.core.manifest import Manifest
from param_server.core.shards import is_expert_key, parse_expert_key

logger = logging.getLogger(__name__)


class Reconciler:
    """Moves `gate`'s model to the version the server says, when woken (or
    every `interval` seconds)."""

    def __init__(
        self,
        lazy: LazyModel,
        gate: SwapGate,
        *,
        interval: float,
        max_backoff: float,
        report: Callable[[BaseException], None],
        stop: threading.Event,
    ) -> None:
        self.lazy = lazy
        self.client = lazy.loader.client
        self.model = lazy.manifest.model
        self.gate = gate
        self.interval = interval
        self.max_backoff = max_backoff
        self._report = report
        self._stop = stop
        self._device = next(iter(lazy.model.parameters())).device
        self.wake = threading.Event()
        """Set it to check with the server now."""
        self.pin: int | None = None
        self.head = lazy.manifest.version
        """The newest version heard of from the server."""
        self._refused: int | None = None  # a version this model cannot take
        self.checks = 0
        """Completed checks with the server."""

    def run(self) -> None:
        backoff = Backoff(min(0.1, self.max_backoff), self.max_backoff)
        delay = 0.0
        while not self._stop.is_set():
            woke = self.wake.wait(delay or self.interval)
            self.wake.clear()
            if self._stop.is_set():
                return
            learned = time.monotonic()
            try:
                self.reconcile(learned)
                delay = 0.0
                backoff.reset()
            except (ParamServerError, OSError, RuntimeError, ValueError) as e:
                self._report(e)
                delay = backoff.next()
                logger.info(
                    "%s: retrying in %.1fs (%s)",
                    self.model,
                    delay,
                    "woken" if woke else "timer",
                )

    def reconcile(self, learned: float) -> None:
        pin = self.pin
        target = self.client.get_manifest(self.model, pin)
        self.head = target.version if pin is None else self.client.head(self.model)
        if self.gate.has(target.version) or target.version == self._refused:
            self.checks += 1
            return
        while True:
            try:
                prepared = self.prepare(target, learned)
            except (SwapError, InvalidInputError):
                # Retrying cannot help: wait for another version (or a pin).
                self._refused = target.version
                self.checks += 1
                raise
            # False: an older pending version was applied meanwhile, and
            # what changed must be counted from it, so prepare again.
            if self.gate.offer(prepared):
                self.checks += 1
                return

    def prepare(self, target: Manifest, learned: float) -> Prepared:
        """Fetches and checks everything `target` changes; touches nothing live."""
        current = self.lazy.manifest
        where = f"{target.model}@{target.version}"
        if target.files.get("config.json") != current.files.get("config.json"):
            raise SwapError(
                f"{where} changes config.json; a live model cannot take a new "
                "architecture: restart the node to load it"
            )
        changed, removed = target.diff(current)
        added = [k for k in changed if k not in current.shards]
        if removed or added:
            raise SwapError(
                f"{where} adds or removes shards ({(added + list(removed))[:3]}); "
                "restart the node to load it"
            )
        check_expert_shapes(target, self.lazy.family, self.lazy.expert_shapes)
        dense_keys = [k for k in changed if not is_expert_key(k)]
        dense = dense_state(
            self.client,
            target,
            dense_keys,
            self.lazy.family,
            self.lazy.scheme,
            getattr(self.lazy.model, "dtype", None),
        )
        check_dense(self.lazy.model, dense, target, complete=False)
        if self._device.type == "cuda":
            side = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
            with torch.cuda.stream(side):
                dense = {
                    n: t.to(self._device, non_blocking=True) for n, t in dense.items()
                }
            side.synchronize()
        # Resident and pinned experts are brought in now so that serving never
        # waits for them; the rest are fetched on their next miss (by digest).
        resident, pinned = self.lazy.loader.residency()
        warm = set(pinned)
        for key in changed:
            expert = parse_expert_key(key)
            if expert is not None and current.shards[key].digest in resident:
                warm.add(expert)
        # Replacements sit beside the experts they replace until the flip
        # drops those: evicting for them would cost serving its working set.
        self.lazy.loader.warm(target, warm, evict=False)
        # With every expert in its slot, the flip copies each new expert from
        # its cache entry: all of them must be there (they are pinned).
        missing = self.lazy.loader.missing_slots(target)
        if missing:
            raise ExpertFetchError(
                f"{where}: experts {missing[:3]} were not brought in "
                f"({len(missing)} missing); retrying"
            )
        logger.info(
            "%s prepared: %d dense shards, %d resident experts refreshed, %d "
            "other experts marked",
            where,
            len(dense_keys),
            len(warm),
            len(changed) - len(dense_keys) - len(warm),
        )
        return Prepared(target, current, dense, learned)

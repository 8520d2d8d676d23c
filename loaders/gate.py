"""The gate of a live model: a prepared version is applied only when no
forward pass is in flight.

Forward hooks on the model (and `hold()` for a whole request) count passes in
flight. A pending version is applied (parameters and the loader's manifest
re-pointed: read-copy-update) by whichever thread finds none in flight;
nothing is written in place, so a forward pass sees exactly one version.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loaders.models import LazyModel
from param_server.core.errors import ParamServerError
from param_server.core.manifest import Manifest

logger = logging.getLogger(__name__)


class SwapError(ParamServerError):
    """A version cannot be applied to this live model (the old one keeps serving)."""


@dataclass(slots=True)
class Prepared:
    """A version ready to apply: its manifest and its new dense tensors."""

    manifest: Manifest
    base: Manifest
    """The version it was prepared against (what it changes from)."""
    dense: dict[str, torch.Tensor]
    learned_at: float
    """When the node learned of it (time.monotonic)."""


class SwapGate:
    """Applies prepared versions to `lazy` between forward passes.

    Args:
        lazy: the live model.
        on_swap: called with (old version, new version) after each swap, on
            the thread that applied it and under the gate.
    """

    def __init__(
        self, lazy: LazyModel, on_swap: Callable[[int, int], None] | None = None
    ) -> None:
        self.lazy = lazy
        self._net: nn.Module = lazy.model
        self._on_swap = on_swap
        self._lock = threading.Lock()
        self._active = 0
        self._pending: Prepared | None = None
        self._applied = lazy.manifest.version
        self._applied_changed = threading.Condition()
        self._hooks: list[Any] = []
        self.swaps = 0
        self.last_swap: float | None = None
        """Unix time of the last swap."""
        self.last_swap_ms: float | None = None
        """From learning of the last version to applying it."""
        self.last_flip_us: float | None = None
        """How long the last flip itself took."""
        self.swapped = threading.Event()
        """Set after each swap (the heartbeat reports at once)."""
        self.applied_log: deque[tuple[int, float, float]] = deque(maxlen=256)
        """(version, unix time, flip µs) of swaps not yet published."""

    def attach(self) -> None:
        """Hooks the model's forward passes."""
        self._hooks = [
            self._net.register_forward_pre_hook(lambda m, a: self.enter()),
            self._net.register_forward_hook(
                lambda m, a, o: self.exit(), always_call=True
            ),
        ]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def applied(self) -> int:
        """The version forward passes starting now use."""
        return self._applied

    @property
    def pending_version(self) -> int | None:
        pending = self._pending
        return pending.manifest.version if pending else None

    def enter(self) -> None:
        with self._lock:
            if self._active == 0 and self._pending is not None:
                self._flip()
            self._active += 1

    def exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._pending is not None:
                self._flip()

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Keeps one version across the block; yields that version."""
        self.enter()
        try:
            yield self._applied
        finally:
            self.exit()

    def has(self, version: int) -> bool:
        """True when `version` is applied with nothing pending, or is pending."""
        with self._lock:
            pending = self._pending
            return (version == self._applied and pending is None) or (
                pending is not None and pending.manifest.version == version
            )

    def offer(self, prepared: Prepared) -> bool:
        """Makes `prepared` the pending version (applied at once on an idle
        model). False when it was prepared against a version that is no
        longer the live one: prepare it again."""
        with self._lock:
            if prepared.base is not self.lazy.manifest:
                return False
            self._pending = prepared
            if self._active == 0:
                self._flip()
            return True

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Blocks until `version` is applied (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._applied_changed:
            while self._applied != version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._applied_changed.wait(left)
        return True

    def _flip(self) -> None:
        """Applies the pending version. Needs the gate, with no pass in flight."""
        p = self._pending
        assert p is not None
        t0 = time.perf_counter()
        old = self._applied
        for name, t in p.dense.items():
            prefix, _, attr = name.rpartition(".")
            module = self._net.get_submodule(prefix)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[attr] = t
        if p.dense and getattr(self._net.config, "tie_word_embeddings", False):
            out = self._net.get_output_embeddings()  # type: ignore[operator]
            out.weight = self._net.get_input_embeddings().weight  # type: ignore[operator]
        self.lazy.loader.switch(p.manifest)
        self.lazy.manifest = p.manifest
        self._applied = p.manifest.version
        self._pending = None
        now = time.time()
        self.last_flip_us = (time.perf_counter() - t0) * 1e6
        self.last_swap = now
        self.last_swap_ms = (time.monotonic() - p.learned_at) * 1000
        self.swaps += 1
        self.applied_log.append((self._applied, now, self.last_flip_us))
        self.swapped.set()
        with self._applied_changed:
            self._applied_changed.notify_all()
        if self._on_swap is not None:
            try:
                self._on_swap(old, self._applied)
            except Exception:  # a callback must not break serving
                logger.exception("on_swap callback failed")

"""HotSwapper: new versions into a live lazy model, between forward passes.

Three threads, none on the serving path:

- the subscriber listens on Redis for announcements (hints only) and wakes
  the reconciler; every (re)subscription wakes it too, since messages sent
  while it was away are lost;
- the reconciler asks the gRPC server which version to serve (HEAD, or the
  pinned one), fetches and prepares what changed (dense shards, and the
  experts that are resident or pinned), and hands a complete pending version
  to the gate; on failure the old version keeps serving and it retries with
  backoff;
- the heartbeat writes this node's status to Redis (a key that expires) and
  publishes each applied version.

The gate counts forward passes in flight (forward hooks on the model, and
`hold()` for a whole request). A pending version is applied (parameters and
the loader's manifest re-pointed: read-copy-update) only when none is in
flight, by whichever thread gets there first; nothing is written in place, so
a forward pass sees exactly one version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import torch
from torch import nn

from loaders.models import LazyModel, check_dense, check_expert_shapes, dense_state
from param_server.core.announcements import (
    APPLIED_PREFIX,
    Announcement,
    NodeStatus,
    channel,
    node_key,
    redact,
    redis_client,
)
from param_server.core.backoff import Backoff
from param_server.core.errors import InvalidInputError, ParamServerError
from param_server.core.manifest import Manifest
from param_server.core.shards import is_expert_key

logger = logging.getLogger(__name__)

ErrorHandler = Callable[[BaseException], None]


class SwapError(ParamServerError):
    """A version cannot be applied to this live model (the old one keeps serving)."""


@dataclass(slots=True)
class _Prepared:
    manifest: Manifest
    base: Manifest
    """The version it was prepared against (what it changes from)."""
    dense: dict[str, torch.Tensor]
    learned_at: float


class HotSwapper:
    """Keeps a live `LazyModel` on the newest (or a pinned) version.

    Args:
        lazy: the model, as returned by `load_lazy_model`.
        redis_url: where announcements come from; None asks the server
            (`ParamClient.announce_url`), and asks again after losing Redis.
        node_id: this node's name in the fleet status (default host-pid-random).
        heartbeat_interval: seconds between status updates; the status key
            expires after three intervals without one.
        reconcile_interval: seconds between checks with the server when no
            announcement comes (a safety net; announcements are the fast path).
        max_backoff: longest wait between retries of a failed update.
        on_error: called (from a background thread) with every error that
            kept a version from being applied or broke the subscription; the
            swapper keeps going either way. Default: log it.
        on_swap: called (on the thread that applied it, under the gate, so
            keep it short) with (old version, new version) after each swap.
        background_nice: niceness added to the swapper's threads (Linux
            schedules threads separately). Off by default: the threads share
            the GIL with serving, and a niced thread descheduled while holding
            it (or the gate, during a flip) stalls serving instead; measured,
            it lengthened flips to tens of milliseconds on a busy machine.
    """

    def __init__(
        self,
        lazy: LazyModel,
        *,
        redis_url: str | None = None,
        node_id: str | None = None,
        heartbeat_interval: float = 2.0,
        reconcile_interval: float = 30.0,
        max_backoff: float = 5.0,
        on_error: ErrorHandler | None = None,
        on_swap: Callable[[int, int], None] | None = None,
        background_nice: int = 0,
    ) -> None:
        if heartbeat_interval <= 0 or reconcile_interval <= 0 or max_backoff <= 0:
            raise InvalidInputError("intervals and backoff must be positive")
        self.lazy = lazy
        self.client = lazy.loader.client
        self.model = lazy.manifest.model
        self.node_id = node_id or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.heartbeat_interval = heartbeat_interval
        self.reconcile_interval = reconcile_interval
        self.max_backoff = max_backoff
        self._on_error = on_error
        self._on_swap = on_swap
        self._nice = background_nice
        self._discover = redis_url is None
        self._redis_url = redis_url
        self._net: nn.Module = lazy.model
        self._device = next(iter(self._net.parameters())).device
        # The gate: passes in flight, and the version waiting for none.
        self._gate = threading.Lock()
        self._active = 0
        self._pending: _Prepared | None = None
        self._applied = lazy.manifest.version
        self._applied_changed = threading.Condition()
        self._swaps = 0
        self._last_swap: float | None = None
        self._last_swap_ms: float | None = None
        self._last_flip_us: float | None = None
        self._head = lazy.manifest.version
        self._pin: int | None = None
        self._refused: int | None = None  # a version this model cannot take
        self._errors = 0
        self._last_error: str | None = None
        self._redis_up = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._swapped = threading.Event()
        self._applied_log: deque[tuple[int, float, float]] = deque(maxlen=256)
        self._hooks: list[Any] = []
        self._threads: list[threading.Thread] = []
        self.announcements = 0
        """Valid announcements received for this model."""
        self.rejected = 0
        """Malformed announcements (each still causes a check)."""
        self.checks = 0
        """Completed checks with the server (reconciliations)."""
        self.gaps = 0
        """Announcements whose previous version was not the last one seen."""
        self._last_announced: int | None = None

    # --- life cycle --------------------------------------------------------------

    def start(self) -> HotSwapper:
        """Hooks the model and starts the background threads."""
        self._hooks = [
            self._net.register_forward_pre_hook(lambda m, a: self._enter()),
            self._net.register_forward_hook(
                lambda m, a, o: self._exit(), always_call=True
            ),
        ]
        for name, target in (
            ("subscriber", self._subscribe_loop),
            ("reconciler", self._reconcile_loop),
            ("heartbeat", self._heartbeat_loop),
        ):
            t = threading.Thread(
                target=self._guarded(name, target),
                name=f"hotswap-{name}-{self.model}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        self._wake.set()  # check the server once at start
        self._swapped.set()  # and report at once
        return self

    def stop(self, timeout: float = 10.0, *, deregister: bool = True) -> None:
        """Stops the threads and unhooks the model; with `deregister` the
        node's status key goes at once (else it expires with its heartbeat)."""
        self._stop.set()
        self._wake.set()
        self._swapped.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if not deregister or self._redis_url is None:
            return
        with contextlib.suppress(redis.RedisError, OSError, ParamServerError):
            r = redis_client(self._redis_url)
            r.delete(node_key(self.model, self.node_id))
            r.close()

    def __enter__(self) -> HotSwapper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _guarded(self, name: str, fn: Callable[[], None]) -> Callable[[], None]:
        """Runs a thread body forever: an unexpected error is reported, and the
        body restarts after a pause (a thread never dies silently)."""

        def run() -> None:
            if self._nice:
                # Linux gives each thread its own nice value; elsewhere this
                # changes nothing (or is not permitted), which is harmless.
                with contextlib.suppress(OSError, AttributeError):
                    tid = threading.get_native_id()
                    os.setpriority(
                        os.PRIO_PROCESS,
                        tid,
                        os.getpriority(os.PRIO_PROCESS, tid) + self._nice,
                    )
            while not self._stop.is_set():
                try:
                    fn()
                    return
                except Exception as e:
                    logger.exception("hot-swap %s thread failed; restarting it", name)
                    self._report(e)
                    self._stop.wait(1.0)

        return run

    def _report(self, e: BaseException) -> None:
        self._errors += 1
        self._last_error = f"{type(e).__name__}: {e}"
        if self._on_error is not None:
            try:
                self._on_error(e)
            except Exception:
                logger.exception("on_error handler failed")
        else:
            logger.warning("%s: update not applied: %s", self.model, e)

    # --- the gate: flips happen only between forward passes ------------------------

    def _enter(self) -> None:
        with self._gate:
            if self._active == 0 and self._pending is not None:
                self._flip()
            self._active += 1

    def _exit(self) -> None:
        with self._gate:
            self._active -= 1
            if self._active == 0 and self._pending is not None:
                self._flip()

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Keeps one version across the block (for example a whole `generate`);
        yields that version. A pending version is applied when it ends."""
        self._enter()
        try:
            yield self._applied
        finally:
            self._exit()

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
        self._last_flip_us = (time.perf_counter() - t0) * 1e6
        self._last_swap = now
        self._last_swap_ms = (time.monotonic() - p.learned_at) * 1000
        self._swaps += 1
        self._applied_log.append((self._applied, now, self._last_flip_us))
        self._swapped.set()
        with self._applied_changed:
            self._applied_changed.notify_all()
        if self._on_swap is not None:
            try:
                self._on_swap(old, self._applied)
            except Exception:  # a callback must not break serving
                logger.exception("on_swap callback failed")

    # --- what the node asks for -------------------------------------------------------

    @property
    def applied_version(self) -> int:
        """The version forward passes starting now use."""
        return self._applied

    def pin(self, version: int) -> None:
        """Stays on `version` (moving to it now) until `unpin`."""
        if version < 1:
            raise InvalidInputError(f"cannot pin version {version}")
        self._pin = version
        self._wake.set()

    def unpin(self) -> None:
        """Follows the server's HEAD again."""
        self._pin = None
        self._wake.set()

    def reconcile_now(self) -> None:
        """Checks with the server at once (as on an announcement)."""
        self._wake.set()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Blocks until `version` is applied (True) or `timeout` passes (False).

        With no forward pass running the swapper applies it itself, so this
        also works on an idle model.
        """
        deadline = time.monotonic() + timeout
        with self._applied_changed:
            while self._applied != version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._applied_changed.wait(left)
        return True

    def status(self) -> NodeStatus:
        """This node's status (what the heartbeat publishes)."""
        cs = self.lazy.loader.stats()
        pending = self._pending
        return NodeStatus(
            node=self.node_id,
            model=self.model,
            host=socket.gethostname(),
            pid=os.getpid(),
            applied_version=self._applied,
            head_version=self._head,
            pinned_version=self._pin,
            swaps=self._swaps,
            last_swap=self._last_swap,
            last_swap_ms=self._last_swap_ms,
            last_flip_us=self._last_flip_us,
            pending_version=pending.manifest.version if pending else None,
            resident_experts=cs.resident_experts,
            resident_bytes=cs.resident_bytes,
            budget_bytes=self.lazy.loader.budget_bytes,
            hits=cs.hits,
            misses=cs.misses,
            hit_rate=cs.hit_rate,
            errors=self._errors,
            last_error=self._last_error,
            redis_connected=self._redis_up,
            heartbeat_interval=self.heartbeat_interval,
        )

    # --- reconciling with the server ------------------------------------------------

    def _reconcile_loop(self) -> None:
        backoff = Backoff(min(0.1, self.max_backoff), self.max_backoff)
        delay = 0.0
        while not self._stop.is_set():
            woke = self._wake.wait(delay or self.reconcile_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            learned = time.monotonic()
            try:
                self._reconcile(learned)
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

    def _reconcile(self, learned: float) -> None:
        pin = self._pin
        target = self.client.get_manifest(self.model, pin)
        self._head = target.version if pin is None else self.client.head(self.model)
        with self._gate:
            pending = self._pending
            if (
                (target.version == self._applied and pending is None)
                or (pending is not None and pending.manifest.version == target.version)
                or target.version == self._refused
            ):
                self.checks += 1
                return
        while True:
            try:
                prepared = self._prepare(target, learned)
            except (SwapError, InvalidInputError):
                # Retrying cannot help: wait for another version (or a pin).
                self._refused = target.version
                self.checks += 1
                raise
            with self._gate:
                if prepared.base is not self.lazy.manifest:
                    # An older pending version was applied meanwhile: what
                    # changed must be counted from it, so prepare again.
                    continue
                self._pending = prepared
                if self._active == 0:
                    self._flip()  # an idle model is updated at once
                self.checks += 1
                return

    def _prepare(self, target: Manifest, learned: float) -> _Prepared:
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
        dense = dense_state(self.client, target, dense_keys, self.lazy.family)
        check_dense(self._net, dense, target, complete=False)
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
            if is_expert_key(key) and current.shards[key].digest in resident:
                _, layer, _, expert = key.split(".")
                warm.add((int(layer), int(expert)))
        # Replacements sit beside the experts they replace until the flip
        # drops those: evicting for them would cost serving its working set.
        self.lazy.loader.warm(target, warm, evict=False)
        logger.info(
            "%s prepared: %d dense shards, %d resident experts refreshed, %d "
            "other experts marked",
            where,
            len(dense_keys),
            len(warm),
            len(changed) - len(dense_keys) - len(warm),
        )
        return _Prepared(target, current, dense, learned)

    # --- announcements ------------------------------------------------------------

    def _url(self, refresh: bool = False) -> str:
        """The Redis URL; when discovered from the server, asked again on
        `refresh` (the daemon may have restarted its Redis elsewhere)."""
        if self._discover and (refresh or self._redis_url is None):
            try:
                url = self.client.announce_url()
            except ParamServerError:
                if self._redis_url is None:
                    raise
                url = self._redis_url  # the server is away too: try the old one
            if url is None:
                raise SwapError(
                    f"the server at {self.client.target} does not announce versions; "
                    "start it with announcements on, or pass redis_url"
                )
            if ":***@" in url:
                raise SwapError(
                    f"the server announces on {url}, which needs a password it does "
                    "not hand out: pass redis_url with the password"
                )
            self._redis_url = url
        assert self._redis_url is not None
        return self._redis_url

    def _subscribe_loop(self) -> None:
        backoff = Backoff(0.05, 0.5)
        failed = False
        while not self._stop.is_set():
            pubsub = None
            try:
                r = redis_client(self._url(refresh=failed))
                pubsub = r.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(channel(self.model))
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        # (Re)connected: whatever was announced meanwhile is
                        # lost, so check with the server.
                        if not self._redis_up:
                            logger.info(
                                "%s: subscribed on %s", self.model, redact(self._url())
                            )
                        self._redis_up = True
                        failed = False
                        backoff.reset()
                        self._wake.set()
                    elif msg["type"] == "message":
                        self._on_message(msg["data"])
            except redis.AuthenticationError as e:
                self._redis_up = False
                if not failed:  # once per outage, not every retry
                    self._report(
                        SwapError(
                            f"Redis at {redact(self._redis_url or '')} refused the "
                            f"credentials ({e}); check redis_url"
                        )
                    )
                failed = True
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if self._redis_up:
                    logger.warning(
                        "%s: lost Redis (%s); serving on, reconnecting", self.model, e
                    )
                self._redis_up = False
                failed = True
            except ParamServerError as e:  # the server could not tell the URL
                self._redis_up = False
                failed = True
                self._report(e)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()
            backoff.sleep(self._stop)

    def _on_message(self, data: bytes) -> None:
        try:
            a = Announcement.from_json(data)
        except InvalidInputError as e:
            logger.warning("%s: ignoring a malformed announcement: %s", self.model, e)
            self.rejected += 1
            self._wake.set()  # harmless: a manifest check
            return
        if a.model != self.model:
            return
        self.announcements += 1
        if self._last_announced is not None and a.previous != self._last_announced:
            self.gaps += 1
        self._last_announced = a.version
        logger.debug("%s: announced %d (%s)", self.model, a.version, a.kind)
        if a.kind == "commit" and a.version == self._applied and self._pin is None:
            return  # a duplicate of what we serve
        self._wake.set()

    # --- heartbeat ---------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        r: redis.Redis | None = None
        while not self._stop.is_set():
            self._swapped.wait(self.heartbeat_interval)
            self._swapped.clear()
            if self._stop.is_set():
                return
            try:
                if r is None:
                    r = redis_client(self._url())
                status = self.status()
                ttl = max(1, int(self.heartbeat_interval * 3 + 0.999))
                r.set(node_key(self.model, self.node_id), status.to_json(), ex=ttl)
                while self._applied_log:
                    version, at, flip_us = self._applied_log[0]
                    r.publish(
                        APPLIED_PREFIX + self.model,
                        json.dumps(
                            {
                                "node": self.node_id,
                                "version": version,
                                "time": at,
                                "flip_us": round(flip_us, 1),
                            }
                        ),
                    )
                    self._applied_log.popleft()
            except (redis.RedisError, OSError, ParamServerError) as e:
                logger.debug("%s: heartbeat failed: %s", self.model, e)
                if r is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        r.close()
                r = None

"""HotSwapper: new versions into a live lazy model, between forward passes.

A facade over four parts, none on the serving path but the gate:

- the gate (`loaders.gate`) counts forward passes in flight and applies a
  prepared version only when none is (read-copy-update);
- the reconciler (`loaders.reconciler`) asks the gRPC server which version to
  serve, prepares what changed and hands it to the gate, retrying with
  backoff on failure while the old version keeps serving;
- the subscriber (`loaders.subscriber`) listens on Redis for announcements
  (hints only) and wakes the reconciler;
- the heartbeat (`loaders.heartbeat`) writes this node's status to Redis and
  publishes each applied version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator

import redis

from loaders.gate import SwapError, SwapGate
from loaders.heartbeat import Heartbeat
from loaders.models import LazyModel
from loaders.reconciler import Reconciler
from loaders.subscriber import Subscriber
from param_server.core.announcements import (
    Announcement,
    NodeStatus,
    node_status_key,
    redis_client,
)
from param_server.core.errors import (
    InvalidInputError,
    ParamServerError,
    UnavailableError,
)

__all__ = ["ErrorHandler", "HotSwapper", "SwapError"]

logger = logging.getLogger(__name__)

ErrorHandler = Callable[[BaseException], None]


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
            swapper keeps going either way. Default: log it. A server that
            cannot be reached is not an error: it is logged, counted in
            `status().outages` and retried.
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
        self._nice = background_nice
        self._errors = 0
        self._last_error: str | None = None
        self._outages = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._gate = SwapGate(lazy, on_swap)
        self._reconciler = Reconciler(
            lazy,
            self._gate,
            interval=reconcile_interval,
            max_backoff=max_backoff,
            report=self._report,
            stop=self._stop,
        )
        self._subscriber = Subscriber(
            self.client,
            self.model,
            redis_url,
            wake=self._reconciler.wake.set,
            is_served=self._is_served,
            report=self._report,
            stop=self._stop,
        )
        self._heartbeat = Heartbeat(
            self.model,
            self.node_id,
            heartbeat_interval,
            status=self.status,
            url=self._subscriber.url,
            applied_log=self._gate.applied_log,
            swapped=self._gate.swapped,
            stop=self._stop,
        )

    # --- life cycle --------------------------------------------------------------

    def start(self) -> HotSwapper:
        """Hooks the model and starts the background threads."""
        self._gate.attach()
        for name, target in (
            ("subscriber", self._subscriber.run),
            ("reconciler", self._reconciler.run),
            ("heartbeat", self._heartbeat.run),
        ):
            t = threading.Thread(
                target=self._guarded(name, target),
                name=f"hotswap-{name}-{self.model}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        self._reconciler.wake.set()  # check the server once at start
        self._gate.swapped.set()  # and report at once
        return self

    def stop(self, timeout: float = 10.0, *, deregister: bool = True) -> None:
        """Stops the threads and unhooks the model; with `deregister` the
        node's status key goes at once (else it expires with its heartbeat)."""
        self._stop.set()
        self._reconciler.wake.set()
        self._gate.swapped.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        self._gate.detach()
        url = self._subscriber.redis_url
        if not deregister or url is None:
            return
        with contextlib.suppress(redis.RedisError, OSError, ParamServerError):
            r = redis_client(url)
            r.delete(node_status_key(self.model, self.node_id))
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
        if _unreachable(e):
            # The server is down or restarting: the node serves on from what
            # it holds and the reconciler retries; nothing needs a person yet.
            self._outages += 1
            logger.warning(
                "%s: parameter server unreachable; serving version %d, retrying (%s)",
                self.model,
                self._gate.applied,
                e,
            )
            return
        self._errors += 1
        self._last_error = f"{type(e).__name__}: {e}"
        if self._on_error is not None:
            try:
                self._on_error(e)
            except Exception:
                logger.exception("on_error handler failed")
        else:
            logger.warning("%s: update not applied: %s", self.model, e)

    def _is_served(self, a: Announcement) -> bool:
        return (
            a.kind == "commit"
            and a.version == self._gate.applied
            and self._reconciler.pin is None
        )

    # --- what the node asks for -------------------------------------------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Keeps one version across the block (for example a whole `generate`);
        yields that version. A pending version is applied when it ends."""
        with self._gate.hold() as version:
            yield version

    @property
    def applied_version(self) -> int:
        """The version forward passes starting now use."""
        return self._gate.applied

    def pin(self, version: int) -> None:
        """Stays on `version` (moving to it now) until `unpin`."""
        if version < 1:
            raise InvalidInputError(f"cannot pin version {version}")
        self._reconciler.pin = version
        self._reconciler.wake.set()

    def unpin(self) -> None:
        """Follows the server's HEAD again."""
        self._reconciler.pin = None
        self._reconciler.wake.set()

    def reconcile_now(self) -> None:
        """Checks with the server at once (as on an announcement)."""
        self._reconciler.wake.set()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Blocks until `version` is applied (True) or `timeout` passes (False).

        With no forward pass running the swapper applies it itself, so this
        also works on an idle model.
        """
        return self._gate.wait_for_version(version, timeout)

    @property
    def announcements(self) -> int:
        """Valid announcements received for this model."""
        return self._subscriber.announcements

    @property
    def rejected(self) -> int:
        """Malformed announcements (each still causes a check)."""
        return self._subscriber.rejected

    @property
    def gaps(self) -> int:
        """Announcements whose previous version was not the last one seen."""
        return self._subscriber.gaps

    @property
    def checks(self) -> int:
        """Completed checks with the server (reconciliations)."""
        return self._reconciler.checks

    def status(self) -> NodeStatus:
        """This node's status (what the heartbeat publishes)."""
        cs = self.lazy.loader.stats()
        gate = self._gate
        return NodeStatus(
            node=self.node_id,
            model=self.model,
            host=socket.gethostname(),
            pid=os.getpid(),
            applied_version=gate.applied,
            head_version=self._reconciler.head,
            pinned_version=self._reconciler.pin,
            swaps=gate.swaps,
            last_swap=gate.last_swap,
            last_swap_ms=gate.last_swap_ms,
            last_flip_us=gate.last_flip_us,
            pending_version=gate.pending_version,
            resident_experts=cs.resident_experts,
            resident_bytes=cs.resident_bytes,
            budget_bytes=self.lazy.loader.budget_bytes,
            hits=cs.hits,
            misses=cs.misses,
            hit_rate=cs.hit_rate,
            errors=self._errors,
            last_error=self._last_error,
            outages=self._outages,
            redis_connected=self._subscriber.redis_up,
            heartbeat_interval=self.heartbeat_interval,
        )


def _unreachable(e: BaseException) -> bool:
    """Whether `e` comes down to the server being unreachable (after the
    client's own retries), as opposed to something wrong with a version."""
    seen: BaseException | None = e
    for _ in range(8):  # a cause chain is short; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, UnavailableError):
            return True
        seen = seen.__cause__
    return False

"""The one retry policy: exponential backoff, capped, optionally jittered.

Every loop that waits after a failure (client calls, the node's reconciler and
subscriber, the announcer, the Redis supervisor) asks a `Backoff` how long.
"""

from __future__ import annotations

import random
import threading
import time


class Backoff:
    """Delays that start at `initial`, grow by `factor` per failure up to
    `maximum`, and start over after `reset()` (call it on success).

    Args:
        initial: the first delay, in seconds (> 0).
        maximum: the longest delay (>= `initial`).
        factor: growth per failure (>= 1).
        jitter: spread each delay uniformly over [0.5, 1.5) of its value, so
            that many clients refused at once do not come back at once.
    """

    __slots__ = ("_next", "factor", "initial", "jitter", "maximum")

    def __init__(
        self,
        initial: float,
        maximum: float,
        *,
        factor: float = 2.0,
        jitter: bool = False,
    ) -> None:
        if not 0 < initial <= maximum or factor < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and factor >= 1, got "
                f"initial={initial}, maximum={maximum}, factor={factor}"
            )
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._next = initial

    def next(self) -> float:
        """The delay to wait now; the one after it grows."""
        delay = self._next
        self._next = min(delay * self.factor, self.maximum)
        return delay * (0.5 + random.random()) if self.jitter else delay

    def peek(self) -> float:
        """The delay `next()` will return, before jitter."""
        return self._next

    def reset(self) -> None:
        self._next = self.initial

    def sleep(self, stop: threading.Event | None = None) -> bool:
        """Waits `next()` seconds; returns True early if `stop` is set."""
        delay = self.next()
        if stop is None:
            time.sleep(delay)
            return False
        return stop.wait(delay)

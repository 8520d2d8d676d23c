"""Which resident experts go first when the cache needs room.

A decode step visits every MoE layer in turn, so when one step's experts do
not all fit, least-recently-used eviction throws out exactly what the next
step needs first: each layer's experts are the least recent by the time the
step comes back to that layer, and the hit rate falls to zero (measured in
BENCHMARKS.md). `FrequencyPolicy`, the default, keeps the experts that are
used most often (recently) and lets newcomers compete with them, so a
working set larger than the budget keeps a stable part resident.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol


class EvictionPolicy(Protocol):
    """Chooses which resident experts go first when room is needed.

    Called with the loader's lock held; keys are content digests. The loader
    skips candidates that are in use or pinned.
    """

    def used(self, key: str) -> None:
        """A resident key was asked for (a hit)."""
        ...

    def added(self, key: str) -> None:
        """A key became resident (after a miss)."""
        ...

    def removed(self, key: str) -> None:
        """A key is no longer resident."""
        ...

    def victims(self) -> Iterable[str]:
        """Resident keys, first to evict first."""
        ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def used(self, key: str) -> None:
        self._order.move_to_end(key)

    def added(self, key: str) -> None:
        self._order[key] = None

    def removed(self, key: str) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterable[str]:
        return list(self._order)


class FrequencyPolicy:
    """Least frequently used first, with ageing (the default).

    Every use of a key (hit or miss) adds one to its count; every
    `half_life` uses of any key, all counts halve (integer halving, so a key
    no longer used reaches zero), so the policy follows routing that shifts.
    The fewest uses go first; among equal counts the most recently added
    goes first, so that a working set larger than the budget cycles through
    one part of the cache while the rest stays (LRU would cycle through all
    of it). Counts of evicted keys are remembered (up to `memory` keys), so
    an expert that comes back is judged by its history, not as a stranger.

    Args:
        half_life: uses (of any key) after which every count halves.
        memory: most evicted keys whose counts are remembered.
    """

    def __init__(self, half_life: int = 8192, memory: int = 1 << 16) -> None:
        if half_life < 1 or memory < 0:
            raise ValueError(
                f"half_life must be >= 1 and memory >= 0, got {half_life}, {memory}"
            )
        self.half_life = half_life
        self.memory = memory
        self._uses = 0
        self._counts: dict[str, tuple[int, int]] = {}
        """key -> (count, epoch it was counted in), resident or remembered."""
        self._buckets: dict[int, dict[str, None]] = {}
        """count -> resident keys with that count, in the order they reached
        it (the last to reach it is evicted first)."""
        self._epoch = 0

    def count(self, key: str) -> int:
        """The key's count now (after ageing)."""
        count, epoch = self._counts.get(key, (0, 0))
        return count >> min(self._uses // self.half_life - epoch, 62)

    def _age(self) -> None:
        """At a new epoch, halves the resident keys' counts (keeping their order)."""
        epoch = self._uses // self.half_life
        if epoch == self._epoch:
            return
        self._epoch = epoch
        buckets: dict[int, dict[str, None]] = {}
        for c in sorted(self._buckets):
            for key in self._buckets[c]:
                now = self.count(key)
                self._counts[key] = (now, epoch)
                buckets.setdefault(now, {})[key] = None
        self._buckets = buckets

    def _use(self, key: str, resident: bool) -> None:
        self._age()
        before = self.count(key)
        if resident:
            self._unbucket(key, before)
        self._counts[key] = (before + 1, self._epoch)
        self._buckets.setdefault(before + 1, {})[key] = None
        self._uses += 1

    def _unbucket(self, key: str, count: int) -> None:
        bucket = self._buckets.get(count)
        if bucket is not None and bucket.pop(key, False) is None and not bucket:
            del self._buckets[count]

    def used(self, key: str) -> None:
        self._use(key, resident=True)

    def added(self, key: str) -> None:
        self._use(key, resident=False)

    def removed(self, key: str) -> None:
        self._age()
        self._unbucket(key, self.count(key))
        if len(self._counts) > self.memory + self._resident_count() + 1024:
            self._forget()

    def _resident_count(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _forget(self) -> None:
        """Drops the remembered counts that matter least, down to `memory`."""
        resident = {k for b in self._buckets.values() for k in b}
        gone = sorted((k for k in self._counts if k not in resident), key=self.count)
        for k in gone[: len(gone) - self.memory]:
            del self._counts[k]

    def victims(self) -> Iterable[str]:
        self._age()
        for c in sorted(self._buckets):
            yield from reversed(list(self._buckets.get(c, ())))

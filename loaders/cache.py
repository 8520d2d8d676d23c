"""LazyExpertLoader: experts on demand within a byte budget, keyed by content digest."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from loaders.eviction import EvictionPolicy, FrequencyPolicy
from loaders.narrow import Narrow, NarrowExpert
from loaders.pool import ExpertPool
from loaders.slots import ExpertSlots
from param_server.client import ParamClient
from param_server.core import quant, tensor_codec
from param_server.core.errors import InvalidInputError, NotFoundError, ParamServerError
from param_server.core.manifest import Manifest
from param_server.core.shards import expert_key, is_expert_key, parse_expert_key

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
Host = Tensors | NarrowExpert
"""An expert in the host tier: prepared tensors, or kept at its variant's
width (see `loaders.narrow`)."""
Prepare = Callable[[int, int, Tensors, bool], Tensors]
"""(layer, expert, tensors as stored, pin) -> tensors as the model uses them, in
their own CPU storage (page-locked when `pin`, ready for an async copy)."""


def own_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """`t` copied into fresh (optionally page-locked) CPU memory."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin).copy_(t)


def _keep(layer: int, expert: int, tensors: Tensors, pin: bool) -> Tensors:
    return {n: own_copy(t, pin) for n, t in tensors.items()}


class ExpertFetchError(ParamServerError):
    """An expert could not be brought in (server gone, corrupt bytes, ...)."""


@dataclass(slots=True)
class CacheStats:
    """A snapshot of the loader's counters."""

    hits: int = 0
    misses: int = 0
    fetches: int = 0
    """Fetch calls to the server (one per batch of misses)."""
    bytes_fetched: int = 0
    evictions: int = 0
    prefetched: int = 0
    """Experts brought in ahead of use (by `prefetch`)."""
    predicted: int = 0
    """Experts a layer-ahead prediction named (see `note_prediction`)."""
    predicted_routed: int = 0
    """Of those, the ones the layer's router then picked."""
    routed_after_prediction: int = 0
    """Experts routed in layers that had a prediction."""
    host_hits: int = 0
    """Misses served from the host tier (a copy to the device, no fetch)."""
    host_bytes: int = 0
    """Bytes of prepared experts kept in the host tier."""
    steps_on_map: int = 0
    """Pooled layer steps whose routed experts were all mapped (no lookup)."""
    steps_looked_up: int = 0
    """Pooled layer steps that looked their experts up (one was not mapped)."""
    steps_redone: int = 0
    """Layer steps launched on the map ahead of the lookup and run again
    because an expert was not mapped (see `hold_mapped`)."""
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    resident_experts: int = 0
    miss_latency_ms: dict[str, float] = field(default_factory=dict)
    """p50, p90, p99 and max of recent misses, in milliseconds."""

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prediction_recall(self) -> float:
        """Share of routed experts that the layer-ahead prediction named."""
        n = self.routed_after_prediction
        return self.predicted_routed / n if n else 0.0

    @property
    def prediction_precision(self) -> float:
        """Share of predicted experts that the router then picked."""
        return self.predicted_routed / self.predicted if self.predicted else 0.0


@dataclass(slots=True)
class _Entry:
    tensors: Tensors
    nbytes: int
    refs: int = 0
    pinned: bool = False
    ready: torch.cuda.Event | None = None
    """Recorded on the copy stream after the host-to-device copy (CUDA only)."""
    slot: int | None = None
    """Its slot in the loader's ExpertPool, when it is in one."""
    layer: int = -1
    """The MoE layer it belongs to (whose pool holds it)."""
    released: torch.cuda.Event | None = None
    """Recorded on the compute stream when its last user let it go (CUDA)."""


@dataclass(slots=True)
class _Flight:
    """An expert being fetched; waiters block on `done`."""

    reserved: int
    done: Future[None] = field(default_factory=Future)


class LazyExpertLoader:
    """Brings experts of one model version from a param-server on demand.

    Resident experts are bounded in bytes (`budget_bytes`, counting experts
    being fetched); the expert the eviction policy names first (by default the
    least frequently used, with ageing: see `loaders.eviction`) that no
    forward pass holds and nobody pinned is evicted first. Entries are keyed
    by content digest, so a new version of an expert is a new entry and an
    unchanged one is shared across versions.

    Args:
        client: the server connection.
        manifest: the version to serve (see `for_model`).
        budget_bytes: most bytes of experts resident at once; must hold the
            largest expert.
        device: where prepared experts live.
        prepare: turns a shard's tensors into what the model uses (for
            example gate and up concatenated); the default keeps them.
        prefetch_workers: threads that warm experts ahead of use.
        host_budget_bytes: bytes of prepared experts kept in page-locked host
            memory once fetched and verified, so that a device miss is a
            host-to-device copy instead of a fetch (least recently used out
            first). None: every expert's bytes on CUDA, 0 (off) on the CPU,
            where the device is the host.
        policy: eviction order (FrequencyPolicy by default; LRUPolicy and
            your own `EvictionPolicy` plug in the same way).
        narrow: with an 8-bit `width`, keeps each fetched expert at that
            width on the host and dequantizes it on the device when it fills
            a slot (half the host tier's bytes and half the PCIe traffic of
            bf16); None: dequantized on arrival. `load_lazy_model` passes it
            when asked to keep experts narrow.

    Raises:
        InvalidInputError: a budget of zero, negative or below one expert.
    """

    def __init__(
        self,
        client: ParamClient,
        manifest: Manifest,
        *,
        budget_bytes: int,
        device: str | torch.device = "cpu",
        prepare: Prepare | None = None,
        prefetch_workers: int = 1,
        policy: EvictionPolicy | None = None,
        slots: ExpertSlots | None = None,
        pool: ExpertPool | dict[int, ExpertPool] | None = None,
        host_budget_bytes: int | None = None,
        width: str = "full",
        narrow: Narrow | None = None,
    ) -> None:
        self.width = quant.check_width(width)
        """What experts cross the network as: `full` (the stored bytes), or
        `int8`/`fp8` variants, dequantized to the stored dtype on arrival (so
        budgets, tiers and compute see full-width experts)."""
        if budget_bytes <= 0:
            raise InvalidInputError(
                f"expert budget must be positive, got {budget_bytes} bytes"
            )
        sizes = [s.size for k, s in manifest.shards.items() if is_expert_key(k)]
        if not sizes:
            raise InvalidInputError(
                f"{manifest.model}@{manifest.version} has no experts"
            )
        if budget_bytes < max(sizes):
            raise InvalidInputError(
                f"expert budget of {budget_bytes} bytes cannot hold one expert of "
                f"{manifest.model} ({max(sizes)} bytes); give at least that much"
            )
        self.client = client
        self.manifest = manifest
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self._prepare = prepare or _keep
        self._narrow = narrow if self.width != "full" else None
        self._cuda = self.device.type == "cuda"
        # Host-to-device copies run here, never on the compute stream.
        self._copy_stream = (
            torch.cuda.Stream(self.device) if self._cuda else None  # type: ignore[no-untyped-call]
        )
        self._lock = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._policy: EvictionPolicy = policy or FrequencyPolicy()
        self._flights: dict[str, _Flight] = {}
        self._pinned_keys: set[tuple[int, int]] = set()
        self._resident = 0  # bytes of entries plus reservations of flights
        self._stats = CacheStats()
        self._latencies: deque[float] = deque(maxlen=4096)
        self._prefetcher = ThreadPoolExecutor(
            max_workers=prefetch_workers, thread_name_prefix="expert-prefetch"
        )
        self._prefetches: set[Future[None]] = set()
        self._slots: ExpertSlots | None = None
        if slots is not None:
            self.use_slots(slots)
        # Where experts live when the budget does not hold them all: slots
        # that transformers' experts implementations run on, in one pool
        # shared by the layers or in one pool per layer.
        self.pool = pool if isinstance(pool, ExpertPool) else None
        self.pools = pool if isinstance(pool, dict) else None
        self._flying: dict[int, int] = {}  # layer -> flights bound for its pool
        # Each pooled layer's map expert -> slot on the device, and what it
        # holds: an expert is *mapped* once its slot is written into the map
        # with the compute stream ordered after its copy, until it leaves
        # the slot (evicted, or a version switch). A step whose routed
        # experts are all mapped runs on the map with no further lookup
        # (`hold_mapped`); the epoch counts changes of the map, so a step
        # launched on the map before knowing its experts can tell whether
        # the map it read is still true.
        self._maps: dict[int, torch.Tensor] = {}
        self._mapped: dict[int, dict[int, tuple[int, str]]] = {}
        self._slot_experts: dict[int, dict[int, set[int]]] = {}
        self._map_epoch: dict[int, int] = {}
        self.launch_ahead = self._cuda
        """Launch a pooled step on the map before its routed experts are
        known on the host, then check (see `loaders.models`): on CUDA the
        kernels then run while the host looks the experts up; on the CPU it
        would compute before knowing whether the result can be kept."""
        # The host tier: prepared experts in page-locked memory, verified, so
        # that a device miss costs a host-to-device copy, not a fetch.
        if host_budget_bytes is None:
            host_budget_bytes = self._all_experts_bytes() if self._cuda else 0
        if host_budget_bytes < 0:
            raise InvalidInputError(
                f"host budget must be >= 0 bytes, got {host_budget_bytes}"
            )
        self.host_budget_bytes = host_budget_bytes
        self._host: OrderedDict[str, tuple[Host, int]] = OrderedDict()
        self._host_bytes = 0

    @classmethod
    def for_model(
        cls,
        client: ParamClient,
        model: str,
        version: int | None = None,
        **kwargs: object,
    ) -> LazyExpertLoader:
        """A loader for `model` at `version` (HEAD when None)."""
        return cls(client, client.get_manifest(model, version), **kwargs)  # type: ignore[arg-type]

    @property
    def keeps_narrow(self) -> bool:
        """Whether 8-bit experts stay at their width until the device."""
        return self._narrow is not None

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)

    # --- identity --------------------------------------------------------------

    def _digest(
        self, layer: int, expert: int, manifest: Manifest | None = None
    ) -> tuple[str, str, int]:
        m = manifest or self.manifest
        key = expert_key(layer, expert)
        entry = m.shards.get(key)
        if entry is None:
            raise NotFoundError(
                f"{m.model}@{m.version} has no expert {expert} in layer {layer} "
                f"(shard {key!r})"
            )
        return key, entry.digest, entry.size

    def expert_bytes(self, layer: int, expert: int) -> int:
        """Bytes the expert takes in the budget (its blob size)."""
        return self._digest(layer, expert)[2]

    # --- the core: hold experts resident while a block runs -----------------------

    @contextlib.contextmanager
    def acquire(
        self,
        layer: int,
        experts: Sequence[int],
        *,
        manifest: Manifest | None = None,
        count: bool = True,
        evict: bool = True,
        for_use: bool = True,
    ) -> Iterator[dict[int, Tensors]]:
        """Holds `experts` of `layer` resident while the block runs.

        Misses are fetched together in one call; an expert another thread is
        already fetching is waited for, not fetched again. `manifest` (the
        version being served by default) names which version of each expert;
        `count` False keeps the call out of the hit and miss counters;
        `evict` False brings misses in without evicting anything (they may
        go over the budget); `for_use` False only brings them in (a prefetch:
        on CUDA the current stream neither waits for their copies nor marks
        them as read).

        Raises:
            ExpertFetchError: an expert could not be fetched (after the
                client's retries); it names the expert.
        """
        m = manifest or self.manifest
        ids = {e: self._digest(layer, e, m) for e in experts}
        held: dict[int, Tensors] = {}
        try:
            pending = dict(ids)
            while pending:
                mine, waits = self._claim(layer, pending, held, count, evict)
                if mine:
                    # installed with our ref
                    held.update(self._fetch(layer, mine, m, timed=count))
                for fut in waits:
                    with contextlib.suppress(ExpertFetchError):
                        fut.result()  # their failure is retried (and reported) by us
                pending = {e: i for e, i in pending.items() if e not in held}
            if for_use:
                self._ready_for_use([ids[e][1] for e in held])
            yield held
        finally:
            self._release([ids[e][1] for e in held], for_use)

    def _claim(
        self,
        layer: int,
        pending: dict[int, tuple[str, str, int]],
        held: dict[int, Tensors],
        count: bool = True,
        evict: bool = True,
    ) -> tuple[dict[int, tuple[str, str, int]], list[Future[None]]]:
        """Takes hits, joins flights, and reserves room for new fetches."""
        mine: dict[int, tuple[str, str, int]] = {}
        waits: list[Future[None]] = []
        with self._lock:
            for e, (key, digest, size) in pending.items():
                entry = self._entries.get(digest)
                if entry is not None:
                    entry.refs += 1
                    if count:
                        self._policy.used(digest)
                    held[e] = entry.tensors
                    self._stats.hits += count
                elif digest in self._flights:
                    waits.append(self._flights[digest].done)
                else:
                    if evict and self.pools is not None:
                        self._make_slot(layer)
                    if evict:
                        self._make_room(size)
                    if self.pools is not None:
                        self._flying[layer] = self._flying.get(layer, 0) + 1
                    self._flights[digest] = _Flight(size)
                    self._resident += size
                    self._note_peak()
                    mine[e] = (key, digest, size)
                    self._stats.misses += count
        return mine, waits

    def _fetch(
        self,
        layer: int,
        mine: dict[int, tuple[str, str, int]],
        manifest: Manifest,
        timed: bool = True,
    ) -> dict[int, Tensors]:
        """Fetches claimed experts in one call and installs them, one ref held;
        `timed`: their latency counts among the misses'."""
        t0 = time.perf_counter()
        keys = {key: (e, digest, size) for e, (key, digest, size) in mine.items()}
        placed: list[tuple[int, int]] = []
        slots: dict[str, int] = {}  # key -> pool slot
        try:
            with self._lock:
                kept = {k: self._from_host(d) for k, (_, d, _) in keys.items()}
            remote = [k for k, h in kept.items() if h is None]
            blobs = (
                self.client.fetch_blobs(manifest, remote, width=self.width)
                if remote
                else {}
            )
            decode = (
                tensor_codec.decode if self.width == "full" else quant.decode_variant
            )
            prepared: dict[str, tuple[Tensors, torch.cuda.Event | None]] = {}
            for key in keys:
                e, digest, _ = keys[key]
                host = kept[key]
                if host is None:
                    what = f"{manifest.model}:{key}"
                    # Own storage (never a view keeping the blob alive); on CUDA
                    # it is page-locked so the copy below is an async DMA.
                    if self._narrow is not None:
                        parts = quant.decode_variant_parts(blobs[key], what)
                        host = self._narrow(layer, e, parts, self._cuda)
                    else:
                        host = self._prepare(
                            layer, e, decode(blobs[key], what), self._cuda
                        )
                    with self._lock:
                        self._to_host(digest, host)
                wait = None
                with self._lock:
                    dst = self._slots.place(layer, e, digest) if self._slots else None
                    if dst is not None:
                        placed.append((layer, e))
                    elif (pool := self._pool_of(layer)) is not None:
                        got = pool.take()
                        if got is not None:
                            slots[key], wait = got
                            dst = pool.views(slots[key])
                            self._landed(layer, 1)  # its slot is taken
                prepared[key] = self._to_device(host, dst, wait)
        except (ParamServerError, RuntimeError, ValueError) as err:
            with self._lock:
                for slot in placed:
                    assert self._slots is not None
                    self._slots.release(*slot)
                for slot_index in slots.values():
                    pool = self._pool_of(layer)
                    assert pool is not None
                    pool.give(slot_index)
                self._landed(layer, len(keys) - len(slots))
                for _, digest, size in keys.values():
                    failed = ExpertFetchError(str(err))
                    failed.__cause__ = err  # waiters can tell an outage
                    self._flights.pop(digest).done.set_exception(failed)
                    self._resident -= size
                self._lock.notify_all()
            names = ", ".join(f"layer {layer} expert {e}" for e, _, _ in keys.values())
            raise ExpertFetchError(
                f"could not bring in {names} of {manifest.model}@"
                f"{manifest.version}: {err}"
            ) from err
        dt = time.perf_counter() - t0
        with self._lock:
            for key, (e, digest, size) in keys.items():
                ts, ready = prepared[key]
                nbytes = sum(t.numel() * t.element_size() for t in ts.values())
                self._entries[digest] = _Entry(
                    ts,
                    nbytes,
                    refs=1,
                    pinned=(layer, e) in self._pinned_keys,
                    ready=ready,
                    slot=slots.get(key),
                    layer=layer,
                )
                self._policy.added(digest)
                self._resident += nbytes - size
                self._flights.pop(digest).done.set_result(None)
                if kept[key] is None:
                    self._stats.bytes_fetched += size
                else:
                    self._stats.host_hits += timed
            self._landed(layer, len(keys) - len(slots))
            self._stats.fetches += bool(remote)
            if timed:
                self._latencies.extend([dt] * len(keys))
            self._lock.notify_all()
        return {e: prepared[key][0] for key, (e, _, _) in keys.items()}

    def _pool_of(self, layer: int) -> ExpertPool | None:
        if self.pools is not None:
            return self.pools.get(layer)
        return self.pool

    def _landed(self, layer: int, n: int) -> None:
        """`n` flights bound for `layer`'s pool took their slot or ended
        without one. Needs the lock."""
        if self.pools is not None:
            self._flying[layer] = self._flying.get(layer, 0) - n

    def _make_slot(self, layer: int) -> None:
        """Evicts unheld, unpinned experts of `layer`, in policy order, until
        its pool has a slot for one more flight. Needs the lock."""
        pool = self._pool_of(layer)
        if pool is None or pool.free - self._flying.get(layer, 0) >= 1:
            return
        for digest in self._policy.victims():
            entry = self._entries.get(digest)
            if (
                entry is None
                or entry.layer != layer
                or entry.slot is None
                or entry.refs
                or entry.pinned
            ):
                continue
            self._drop(digest)
            self._stats.evictions += 1
            if pool.free - self._flying.get(layer, 0) >= 1:
                return

    def _from_host(self, digest: str) -> Host | None:
        """The host tier's prepared tensors of `digest`, or None. Needs the lock."""
        kept = self._host.get(digest)
        if kept is None:
            return None
        self._host.move_to_end(digest)
        return kept[0]

    def _to_host(self, digest: str, tensors: Host) -> None:
        """Keeps a prepared expert in the host tier, least recently used out
        first to stay within its budget. Needs the lock."""
        nbytes = (
            tensors.nbytes
            if isinstance(tensors, NarrowExpert)
            else sum(t.numel() * t.element_size() for t in tensors.values())
        )
        if nbytes > self.host_budget_bytes or digest in self._host:
            return
        while self._host_bytes + nbytes > self.host_budget_bytes:
            _, (_, gone) = self._host.popitem(last=False)
            self._host_bytes -= gone
        self._host[digest] = (tensors, nbytes)
        self._host_bytes += nbytes

    def _to_device(
        self,
        ts: Host,
        dst: Tensors | None = None,
        wait: torch.cuda.Event | None = None,
    ) -> tuple[Tensors, torch.cuda.Event | None]:
        """`ts` on the loader's device: in `dst` (an expert's slot) when given,
        else in new tensors; a narrow expert is widened there. On CUDA the
        work runs on the copy stream, after `wait`, and an event recorded
        after it is returned."""
        if not self._cuda:
            return self._place(ts, dst), None
        assert self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream):
            if wait is not None:  # the slot's last readers are done
                self._copy_stream.wait_event(wait)
            out = self._place(ts, dst)
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record(self._copy_stream)
        # The pinned host buffers may be dropped now: PyTorch's host allocator
        # keeps them until the copy that reads them has finished.
        return out, ready

    def _place(self, ts: Host, dst: Tensors | None) -> Tensors:
        """`ts` on the device (see `_to_device`), on the current stream."""
        if isinstance(ts, NarrowExpert):
            if dst is None:
                return ts.widen(self.device)
            ts.widen_into(dst)
            return dst
        if dst is None:
            if not self._cuda:
                return ts
            return {n: t.to(self.device, non_blocking=True) for n, t in ts.items()}
        for n, t in dst.items():
            t.copy_(ts[n], non_blocking=self._cuda)
        return dst

    def _ready_for_use(self, digests: list[str]) -> None:
        """Makes the current (compute) stream wait for these experts' copies.

        The CPU never blocks; the compute stream waits only for an expert it
        is about to use; a copy seen finished is forgotten (every stream may
        read the expert then). record_stream stops the allocator from reusing
        an evicted expert's memory while queued kernels may still read it
        (not needed in a pool, whose memory is never freed).
        """
        if not self._cuda:
            return
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            entries = [self._entries[d] for d in digests if d in self._entries]
        for entry in entries:
            if entry.ready is not None:
                if entry.ready.query():  # type: ignore[no-untyped-call]
                    entry.ready = None
                else:
                    stream.wait_event(entry.ready)
            if entry.slot is None:
                for t in entry.tensors.values():
                    t.record_stream(stream)

    def _make_room(self, size: int) -> None:
        """Evicts unheld, unpinned experts in policy order until `size` fits.

        Needs the lock.
        """
        if self._resident + size <= self.budget_bytes:
            return
        for digest in self._policy.victims():
            entry = self._entries.get(digest)
            if entry is None or entry.refs or entry.pinned:
                continue
            self._drop(digest)
            self._stats.evictions += 1
            if self._resident + size <= self.budget_bytes:
                return
        # Everything left is in use or pinned: the caller's batch is allowed
        # to go over (iter_experts sizes batches so that this stays rare).
        logger.debug(
            "expert budget exceeded: %d + %d > %d bytes",
            self._resident,
            size,
            self.budget_bytes,
        )

    def _note_peak(self) -> None:
        self._stats.peak_resident_bytes = max(
            self._stats.peak_resident_bytes, self._resident
        )

    def _release(self, digests: list[str], used: bool = True) -> None:
        done = None
        if used and self._cuda and (self.pool is not None or self.pools):
            # The end of the work queued so far that reads these experts: a
            # slot is not rewritten before it (see loaders.pool).
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(torch.cuda.current_stream(self.device))
        with self._lock:
            for d in digests:
                entry = self._entries.get(d)
                if entry is not None:
                    entry.refs -= 1
                    if entry.slot is not None and used:
                        entry.released = done
            self._lock.notify_all()

    def _drop(self, digest: str) -> None:
        """Forgets a resident entry, freeing its pool slot. Needs the lock."""
        entry = self._entries.pop(digest)
        self._policy.removed(digest)
        self._resident -= entry.nbytes
        if entry.slot is not None:
            self._unmap(entry.layer, entry.slot)
            pool = self._pool_of(entry.layer)
            assert pool is not None
            pool.give(entry.slot, entry.released)

    def _unmap(self, layer: int, slot: int) -> None:
        """The experts mapped to `slot` of `layer` are no longer there. Needs
        the lock."""
        gone = self._slot_experts.get(layer, {}).pop(slot, None)
        if gone:
            mapped = self._mapped[layer]
            for e in gone:
                mapped.pop(e, None)
            self._map_epoch[layer] = self._map_epoch.get(layer, 0) + 1

    def _unmap_all(self) -> None:
        """Forgets every mapping (a version switch). Needs the lock."""
        for layer in self._mapped:
            self._mapped[layer].clear()
            self._slot_experts[layer].clear()
            self._map_epoch[layer] = self._map_epoch.get(layer, 0) + 1

    def map_epoch(self, layer: int) -> int:
        """How many times `layer`'s map changed so far (an expert mapped,
        moved or unmapped)."""
        return self._map_epoch.get(layer, 0)

    def device_map(self, layer: int, num_experts: int) -> torch.Tensor:
        """`layer`'s map expert id -> pool slot on the device (every entry is
        a valid slot; only mapped experts' entries are theirs)."""
        table = self._maps.get(layer)
        if table is None:
            table = torch.zeros(num_experts, dtype=torch.long, device=self.device)
            self._maps[layer] = table
            with self._lock:
                self._mapped.setdefault(layer, {})
                self._slot_experts.setdefault(layer, {})
        return table

    def map_slots(
        self, layer: int, slots: dict[int, int], num_experts: int
    ) -> torch.Tensor:
        """Writes `slots` (experts held now, see `acquire_slots`) into the
        layer's device map and returns it; they are mapped from now on. Only
        experts whose slot changed cost a write, queued on the current
        stream like the kernels that read the map (after the wait for their
        copies, which `acquire_slots` queued)."""
        table = self.device_map(layer, num_experts)
        with self._lock:
            mapped = self._mapped[layer]
            owners = self._slot_experts[layer]
            moved = [e for e, s in slots.items() if mapped.get(e, (-1, ""))[0] != s]
            for e in moved:
                old = mapped.get(e)
                if old is not None:
                    owners[old[0]].discard(e)
                mapped[e] = (slots[e], self._digest(layer, e)[1])
                owners.setdefault(slots[e], set()).add(e)
            if moved:  # a step launched before read the old entries
                self._map_epoch[layer] = self._map_epoch.get(layer, 0) + 1
        if moved:
            at = torch.tensor(moved, dtype=torch.long)
            to = torch.tensor([slots[e] for e in moved], dtype=torch.long)
            table[at.to(self.device, non_blocking=True)] = to.to(
                self.device, non_blocking=True
            )
        return table

    @contextlib.contextmanager
    def hold_mapped(
        self, layer: int, experts: Sequence[int], epoch: int | None = None
    ) -> Iterator[bool]:
        """Holds `experts` of `layer` while the block runs and yields True when
        every one is mapped (a hit each); yields False, holding and counting
        nothing, when one is not. With `epoch` (`map_epoch` read before the
        step was launched on the map), also False when the map changed
        since: the entries the step read may have been stale (another
        thread's step mapped or evicted an expert meanwhile). On CUDA the
        slots are not rewritten before the work queued until the block ends."""
        digests: list[str] = []
        with self._lock:
            mapped = self._mapped.get(layer)
            ok = mapped is not None and (
                epoch is None or self._map_epoch.get(layer, 0) == epoch
            )
            if ok:
                assert mapped is not None
                for e in experts:
                    got = mapped.get(e)
                    if got is None:
                        ok = False
                        break
                    digests.append(got[1])
            if ok:
                for d in digests:
                    entry = self._entries[d]
                    if entry.ready is not None:
                        if not entry.ready.query():  # type: ignore[no-untyped-call]
                            ok = False  # copied for another stream: look it up
                            break
                        entry.ready = None
            if ok:
                for d in digests:
                    self._entries[d].refs += 1
                    self._policy.used(d)
                self._stats.hits += len(digests)
                self._stats.steps_on_map += 1
            else:
                self._stats.steps_looked_up += 1
                self._stats.steps_redone += epoch is not None
        if not ok:
            yield False
            return
        try:
            yield True
        finally:
            self._release(digests)

    @contextlib.contextmanager
    def acquire_slots(
        self, layer: int, experts: Sequence[int]
    ) -> Iterator[dict[int, int] | None]:
        """Holds `experts` of `layer` resident while the block runs, like
        `acquire`, and yields each one's pool slot; None when one of them is
        not in the pool (brought in over the budget) or in another layer's
        pool (the same bytes as an expert of another layer: one entry)."""
        with self.acquire(layer, experts):
            with self._lock:
                entries = [self._entries[self._digest(layer, e)[1]] for e in experts]
                slots = {
                    e: en.slot if self.pools is None or en.layer == layer else None
                    for e, en in zip(experts, entries, strict=True)
                }
            if any(s is None for s in slots.values()):
                yield None
            else:
                yield {e: s for e, s in slots.items() if s is not None}

    # --- what a forward pass uses ---------------------------------------------

    def iter_experts(
        self, layer: int, experts: Sequence[int]
    ) -> Iterator[tuple[int, Tensors]]:
        """Yields (expert, tensors) in the given order, holding each while used.

        Experts are brought in batches as large as the budget allows (all in
        one batch when they fit), so a budget smaller than one layer's routed
        experts still works, one batch after another.
        """
        i = 0
        while i < len(experts):
            batch = [experts[i]]
            room = self.budget_bytes - self.expert_bytes(layer, experts[i])
            for e in experts[i + 1 :]:
                size = self.expert_bytes(layer, e)
                if size > room:
                    break
                batch.append(e)
                room -= size
            with self.acquire(layer, batch) as held:
                for e in batch:
                    yield e, held[e]
            i += len(batch)

    def prefetch(self, layer: int, experts: Sequence[int]) -> Future[None]:
        """Brings experts in off the forward path, on the copy stream (CUDA),
        as far as room allows without evicting what is in use; experts
        already resident or coming are skipped. The forward pass that later
        asks for them waits only for their copies."""

        def run() -> None:
            with self._lock:
                mine = [
                    en
                    for en in self._entries.values()
                    if not en.refs
                    and not en.pinned
                    and (self.pools is None or en.layer == layer)
                ]
                free = (
                    self.budget_bytes - self._resident + sum(en.nbytes for en in mine)
                )
                slots = len(experts)
                if (pool := self._pool_of(layer)) is not None and self.pools:
                    slots = pool.free - self._flying.get(layer, 0) + len(mine)
                todo: list[int] = []
                room = free
                for e in experts:
                    _, digest, size = self._digest(layer, e)
                    if digest in self._entries or digest in self._flights:
                        continue
                    if size <= room and len(todo) < slots:
                        todo.append(e)
                        room -= size
            if todo:
                with self.acquire(layer, todo, count=False, for_use=False):
                    pass
                with self._lock:
                    self._stats.prefetched += len(todo)

        fut = self._prefetcher.submit(run)
        with self._lock:
            self._prefetches.add(fut)
        fut.add_done_callback(self._prefetch_done)
        return fut

    def _prefetch_done(self, fut: Future[None]) -> None:
        with self._lock:
            self._prefetches.discard(fut)

    def settle(self, timeout: float | None = None) -> None:
        """Waits for the prefetches started so far (their errors are dropped:
        a forward pass that needs the expert fetches it again and reports)."""
        with self._lock:
            pending = list(self._prefetches)
        for fut in pending:
            with contextlib.suppress(Exception):
                fut.result(timeout)

    def note_prediction(self, predicted: int, right: int, routed: int) -> None:
        """Counts one layer-ahead prediction: `predicted` experts named,
        `right` of them routed to, out of `routed` experts the layer used."""
        with self._lock:
            self._stats.predicted += predicted
            self._stats.predicted_routed += right
            self._stats.routed_after_prediction += routed

    def pool_room(self, layer: int) -> int:
        """Pool slots a forward step of `layer` may hold at once: its pool's
        capacity less the slots of pinned experts (0 without a pool)."""
        pool = self._pool_of(layer)
        if pool is None:
            return 0
        if not self._pinned_keys:
            return pool.capacity
        with self._lock:
            pinned = sum(
                1
                for e in self._entries.values()
                if e.pinned
                and e.slot is not None
                and (self.pools is None or e.layer == layer)
            )
        return pool.capacity - pinned

    def pin(self, layer: int, experts: Sequence[int], pinned: bool = True) -> None:
        """Keeps experts resident until unpinned (they count in the budget).

        A pin follows the expert into new versions (see `switch`).
        """
        with self.acquire(layer, experts) as held, self._lock:
            for e in held:
                self._entries[self._digest(layer, e)[1]].pinned = pinned
                if pinned:
                    self._pinned_keys.add((layer, e))
                else:
                    self._pinned_keys.discard((layer, e))

    # --- versions ----------------------------------------------------------------

    def warm(
        self,
        manifest: Manifest,
        experts: Iterable[tuple[int, int]],
        *,
        evict: bool = True,
    ) -> int:
        """Brings (layer, expert) pairs of `manifest` in ahead of a switch to it.

        They become ordinary cache entries (keyed by digest, evictable), so
        the serving version is untouched. With `evict` False nothing resident
        is evicted for them: replacements of resident experts exist beside the
        old ones until `switch` drops those (the budget is exceeded by what is
        being replaced, briefly, rather than serving losing its working set).
        Returns the bytes fetched.

        Raises:
            ExpertFetchError: one could not be fetched or failed its digest.
        """
        by_layer: dict[int, list[int]] = {}
        for layer, e in experts:
            by_layer.setdefault(layer, []).append(e)
        before = self._stats.bytes_fetched
        for layer, es in sorted(by_layer.items()):
            with self.acquire(layer, es, manifest=manifest, count=False, evict=evict):
                pass
        return self._stats.bytes_fetched - before

    # --- every expert in its slot (a budget that holds them all) ----------------

    def _all_experts_bytes(self) -> int:
        return sum(s.size for k, s in self.manifest.shards.items() if is_expert_key(k))

    def use_slots(self, slots: ExpertSlots) -> None:
        """Puts fetched experts into their slots in the model (see
        `loaders.slots`); the budget must hold every expert."""
        if self.budget_bytes < self._all_experts_bytes():
            raise InvalidInputError(
                f"slots need a budget that holds every expert "
                f"({self._all_experts_bytes()} bytes), got {self.budget_bytes}"
            )
        self._slots = slots
        # Nothing is evicted from the slots: a host copy would never be used.
        self.host_budget_bytes = 0
        self._host.clear()
        self._host_bytes = 0

    def fill_slots(self) -> None:
        """Brings every expert of the served version into its slot, pinned,
        and makes the current stream wait for the copies."""
        assert self._slots is not None
        by_layer: dict[int, list[int]] = {}
        for key in self.manifest.shards:
            parsed = parse_expert_key(key)
            if parsed is not None and parsed in self._slots:
                by_layer.setdefault(parsed[0], []).append(parsed[1])
        for layer, experts in sorted(by_layer.items()):
            self.pin(layer, sorted(experts))
        with self._lock:
            self._repoint(self.manifest)  # the same bytes in two slots
        if self._cuda:
            assert self._copy_stream is not None
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)

    def count_hits(self, n: int) -> None:
        """Counts `n` uses of experts in their slots (each is a hit)."""
        with self._lock:
            self._stats.hits += n

    def missing_slots(self, manifest: Manifest) -> list[tuple[int, int]]:
        """Experts of `manifest` that are neither in their slot nor cached:
        `switch` to it would have nothing to copy for them."""
        if self._slots is None:
            return []
        with self._lock:
            return self._slots.missing(
                manifest, {d: e.tensors for d, e in self._entries.items()}
            )

    def _repoint(self, manifest: Manifest) -> None:
        """Copies `manifest`'s experts into their slots. Needs the lock, and
        no forward pass running."""
        assert self._slots is not None
        views = self._slots.repoint(
            manifest,
            {d: e.tensors for d, e in self._entries.items()},
            {d: e.ready for d, e in self._entries.items()},
        )
        for digest, slot in views.items():
            entry = self._entries.get(digest)
            if entry is not None:
                entry.tensors, entry.ready = slot, None

    def residency(self) -> tuple[set[str], set[tuple[int, int]]]:
        """(digests resident now, pinned (layer, expert) pairs)."""
        with self._lock:
            return set(self._entries), set(self._pinned_keys)

    def switch(self, manifest: Manifest) -> int:
        """Serves `manifest` from now on; returns how many old entries went.

        Call it only while no forward pass runs (the HotSwapper does). Resident
        experts of the old version that the new one replaced are dropped at
        once (no second copy lingers); pins move to the new version's entries.
        """
        keep = {s.digest for k, s in manifest.shards.items() if is_expert_key(k)}
        old = {
            s.digest for k, s in self.manifest.shards.items() if is_expert_key(k)
        } - keep
        dropped = 0
        with self._lock:
            if self._slots is not None:
                self._repoint(manifest)
            self.manifest = manifest
            self._unmap_all()
            for layer, e in self._pinned_keys:
                key = expert_key(layer, e)
                if key in manifest.shards:
                    entry = self._entries.get(manifest.shards[key].digest)
                    if entry is not None:
                        entry.pinned = True
            for digest in old:
                entry = self._entries.get(digest)
                if entry is None or entry.refs:
                    continue
                self._drop(digest)
                dropped += 1
            if self.pool is not None or self.pools:
                self._into_pool()
            self._lock.notify_all()
        return dropped

    def _into_pool(self) -> None:
        """Copies entries that came in over the budget (a new version's
        experts, fetched beside the ones they replace) into slots the switch
        freed, so that the stock kernels run on them too. Needs the lock, and
        no forward pass running: the copies are queued on the current stream,
        after any work that read the slots' old experts."""
        for entry in self._entries.values():
            if entry.slot is not None or entry.refs:
                continue
            pool = self._pool_of(entry.layer)
            got = pool.take() if pool is not None else None
            if pool is None or got is None:
                continue
            slot, _ = got  # freed under this flip: the current stream is after it
            views = pool.views(slot)
            stream = torch.cuda.current_stream(self.device) if self._cuda else None
            if stream is not None and entry.ready is not None:
                stream.wait_event(entry.ready)
            for name, dst in views.items():
                dst.copy_(entry.tensors[name], non_blocking=True)
                if stream is not None:
                    entry.tensors[name].record_stream(stream)
            entry.tensors, entry.slot, entry.ready = views, slot, None

    def resize(self, budget_bytes: int) -> None:
        """Changes the budget; shrinking evicts (policy order) what no one holds."""
        largest = max(
            s.size for k, s in self.manifest.shards.items() if is_expert_key(k)
        )
        if budget_bytes < largest:
            raise InvalidInputError(
                f"expert budget of {budget_bytes} bytes cannot hold one expert "
                f"({largest} bytes)"
            )
        if self._slots is not None and budget_bytes < self._all_experts_bytes():
            raise InvalidInputError(
                "this loader keeps every expert in its slot in the model (its "
                "budget held them all); load the model again with the smaller "
                "budget instead"
            )
        with self._lock:
            self.budget_bytes = budget_bytes
            self._make_room(0)

    def resident(self) -> set[tuple[int, int]]:
        """(layer, expert) pairs of this version that are resident now."""
        with self._lock:
            digests = set(self._entries)
        out = set()
        for key, s in self.manifest.shards.items():
            if s.digest in digests and is_expert_key(key):
                _, layer, _, expert = key.split(".")
                out.add((int(layer), int(expert)))
        return out

    def reset_stats(self) -> None:
        """Zeroes the counters (the peak restarts from what is resident now)."""
        with self._lock:
            self._stats = CacheStats(peak_resident_bytes=self._resident)
            self._latencies.clear()

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters (cheap: a lock and a copy)."""
        with self._lock:
            s = CacheStats(
                **{
                    f: getattr(self._stats, f)
                    for f in (
                        "hits",
                        "misses",
                        "fetches",
                        "bytes_fetched",
                        "evictions",
                        "prefetched",
                        "predicted",
                        "predicted_routed",
                        "routed_after_prediction",
                        "host_hits",
                        "steps_on_map",
                        "steps_looked_up",
                        "steps_redone",
                        "peak_resident_bytes",
                    )
                }
            )
            s.resident_bytes = self._resident
            s.host_bytes = self._host_bytes
            s.resident_experts = len(self._entries)
            lat = sorted(self._latencies)
        if lat:
            s.miss_latency_ms = {
                name: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
                for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
            }
        return s

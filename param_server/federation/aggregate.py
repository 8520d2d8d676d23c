"""Update validation and expert-wise sparse weighted averaging.

Each tensor is averaged over the clients that sent it, weighted by their
example counts (or, for an expert's tensors, by the tokens routed to that
expert when every contributor reported them); tensors nobody sent keep their
values. Aggregation streams one tensor at a time: the only memory it adds is
the new values themselves plus one tensor's accumulator.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import Array, ArrayRecord, Message

from param_server.core.errors import InvalidInputError, ParamServerError
from param_server.core.manifest import Manifest
from param_server.core.shards import parse_expert_key, wire_key
from param_server.federation import protocol, wire

logger = logging.getLogger(__name__)


class UpdateRejectedError(ParamServerError):
    """A client's update failed validation; the message says why."""


@dataclass(frozen=True, slots=True)
class WireTensor:
    """One tensor of the model as it crosses the wire."""

    key: str
    """Wire key: the checkpoint tensor name (`name@E` for expert E's slice of
    a fused tensor)."""
    shard: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    expert: tuple[int, int] | None
    """(layer, expert) when the tensor belongs to one routed expert."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Every tensor of one model version, by wire key (from its manifest)."""

    specs: dict[str, WireTensor]

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Layout:
        specs: dict[str, WireTensor] = {}
        for shard_key in sorted(manifest.shards):
            expert = parse_expert_key(shard_key)
            for t in manifest.shards[shard_key].tensors:
                key = wire_key(t.name, expert[1] if t.stacked and expert else None)
                specs[key] = WireTensor(
                    key, shard_key, t.name, t.dtype, tuple(t.shape), expert
                )
        return cls(specs)

    def shards_of(self, keys: Sequence[str]) -> set[str]:
        return {self.specs[k].shard for k in keys}


@dataclass(slots=True)
class ClientUpdate:
    """One validated reply: who sent it and the tensors it changed."""

    node_id: int
    institution: str
    num_examples: int
    tensors: dict[str, torch.Tensor]
    """Wire key -> tensor viewing the reply's bytes (read-only)."""
    expert_tokens: dict[tuple[int, int], float] = field(default_factory=dict)
    train_loss: float | None = None
    update_norm: float = 0.0
    train_seconds: float | None = None
    held_out_loss: float | None = None
    """The received model's loss on the institution's held-out split."""
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """LoRA mode: wire key -> (A, B), the tensor's update being
    `scale * B @ A` (viewing the reply's bytes)."""
    bytes_received: int = 0
    """Payload bytes of the reply's arrays."""


@dataclass(frozen=True, slots=True)
class Rejection:
    node_id: int
    institution: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "institution": self.institution,
            "reason": self.reason,
        }


def institution_of(msg: Message) -> str:
    """The institution a reply names, else `node-<id>`."""
    if msg.has_error() or not msg.has_content():
        return f"node-{msg.metadata.src_node_id}"
    try:
        client = msg.content.config_records.get(protocol.CLIENT)
        if client is not None and isinstance(client.get(protocol.INSTITUTION), str):
            return str(client[protocol.INSTITUTION])[:128]
    except (AttributeError, KeyError, TypeError):  # a reply with an error
        pass
    return f"node-{msg.metadata.src_node_id}"


def parse_reply(
    msg: Message,
    layout: Layout,
    current: Mapping[str, torch.Tensor],
    *,
    sent_dtypes: Mapping[str, str],
    max_update_norm: float | None = None,
    require_all: bool = False,
    lora_rank: int = 0,
    lora_scale: float = 0.0,
) -> ClientUpdate:
    """Checks one reply and returns it as a ClientUpdate.

    Args:
        current: wire key -> the global values the client started from.
        sent_dtypes: wire key -> the dtype it was sent in; a reply must use it.
        max_update_norm: bound on the L2 norm of (update - current) over
            every tensor sent; None for no bound.
        require_all: dense mode: every tensor must be present.
        lora_rank: LoRA mode (> 0): a tensor's update may come as adapters
            `<key>::lora_A` (rank x in) and `<key>::lora_B` (out x rank), in
            the tensor's dtype; their update is `lora_scale * B @ A`.

    Raises:
        UpdateRejectedError: with the reason, for any defect.
    """
    who = institution_of(msg)
    if msg.has_error():
        raise UpdateRejectedError(f"client error {msg.error.code}: {msg.error.reason}")
    content = msg.content
    metrics = content.metric_records.get(protocol.METRICS)
    if metrics is None or protocol.NUM_EXAMPLES not in metrics:
        raise UpdateRejectedError(
            f"reply has no {protocol.METRICS!r} MetricRecord with "
            f"{protocol.NUM_EXAMPLES!r}"
        )
    n = metrics[protocol.NUM_EXAMPLES]
    if isinstance(n, list) or not math.isfinite(n) or n <= 0 or n != int(n):
        raise UpdateRejectedError(
            f"{protocol.NUM_EXAMPLES} must be a positive integer, got {n!r}"
        )
    records = list(content.array_records.values())
    if len(records) != 1:
        raise UpdateRejectedError(f"expected one ArrayRecord, got {len(records)}")
    rec: ArrayRecord = records[0]

    halves: dict[str, dict[str, str]] = {}  # wire key -> "A"/"B" -> reply key
    for k in rec:
        adapter = protocol.adapter_of(k)
        if adapter is not None and adapter[0] in layout.specs:
            halves.setdefault(adapter[0], {})[adapter[1]] = k
    if halves and lora_rank <= 0:
        raise UpdateRejectedError(
            f"low-rank adapters sent (for {next(iter(halves))!r}) but this round "
            "asked for whole tensors"
        )
    adapter_keys = {k for pair in halves.values() for k in pair.values()}
    unknown = [k for k in rec if k not in layout.specs and k not in adapter_keys]
    if unknown:
        shown = ", ".join(repr(k[:80]) for k in unknown[:3])
        raise UpdateRejectedError(
            f"{len(unknown)} unknown tensor name(s): {shown}; the client's model "
            "does not match the served one"
        )
    if require_all and len(rec) != len(layout.specs):
        raise UpdateRejectedError(
            f"dense update has {len(rec)} of {len(layout.specs)} tensors"
        )
    tensors: dict[str, torch.Tensor] = {}
    sq = 0.0
    for key, arr in rec.items():
        if key in adapter_keys:
            continue
        spec = layout.specs[key]
        t = _decode(arr, key, f"tensor {key!r}", sent_dtypes.get(key, spec.dtype))
        if tuple(t.shape) != spec.shape:
            raise UpdateRejectedError(
                f"tensor {key!r}: shape {list(t.shape)} but the model's is "
                f"{list(spec.shape)}"
            )
        if t.is_floating_point():
            if not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise UpdateRejectedError(
                    f"tensor {key!r}: {bad} NaN/Inf value(s) of {t.numel()}"
                )
            if max_update_norm is not None:
                delta = t.float() - current[key].float()
                sq += float(torch.linalg.vector_norm(delta, dtype=torch.float64) ** 2)
        tensors[key] = t
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, pair in halves.items():
        a, b = _adapter(key, pair, rec, layout.specs[key], sent_dtypes, lora_rank)
        if key in tensors:
            raise UpdateRejectedError(
                f"tensor {key!r} came both whole and as adapters; send one"
            )
        adapters[key] = (a, b)
        if max_update_norm is not None:
            delta = lora_scale * (b.double() @ a.double())
            sq += float(torch.linalg.vector_norm(delta) ** 2)
    norm = math.sqrt(sq)
    if max_update_norm is not None and norm > max_update_norm:
        raise UpdateRejectedError(
            f"update norm {norm:.4g} exceeds the bound {max_update_norm:.4g} "
            "(max-update-norm)"
        )

    tokens: dict[tuple[int, int], float] = {}
    for mkey, value in metrics.items():
        if not mkey.startswith(protocol.TOKENS_PREFIX):
            continue
        try:
            layer = int(mkey.removeprefix(protocol.TOKENS_PREFIX))
        except ValueError:
            raise UpdateRejectedError(f"bad metric name {mkey!r}") from None
        counts = value if isinstance(value, list) else [value]
        for expert, c in enumerate(counts):
            if not math.isfinite(c) or c < 0:
                raise UpdateRejectedError(f"{mkey}[{expert}] = {c!r} is not a count")
            tokens[(layer, expert)] = float(c)
    loss = metrics.get(protocol.TRAIN_LOSS)
    return ClientUpdate(
        node_id=msg.metadata.src_node_id,
        institution=who,
        num_examples=int(n),
        tensors=tensors,
        expert_tokens=tokens,
        train_loss=float(loss) if isinstance(loss, int | float) else None,
        update_norm=norm,
        train_seconds=_number(metrics.get(protocol.TRAIN_SECONDS)),
        held_out_loss=_loss(metrics.get(protocol.HELD_OUT_LOSS)),
        adapters=adapters,
        bytes_received=sum(len(a.data) for a in rec.values()),
    )


def _decode(arr: Array, key: str, label: str, want: str) -> torch.Tensor:
    """One reply array as a tensor, which must be in dtype `want`."""
    try:
        t = wire.from_array(arr, key)
    except InvalidInputError as e:
        raise UpdateRejectedError(str(e)) from e
    got = wire.dtype_name(arr)
    if got != want:
        raise UpdateRejectedError(f"{label}: dtype {got} but the model's is {want}")
    return t


def _adapter(
    key: str,
    pair: Mapping[str, str],
    rec: ArrayRecord,
    spec: WireTensor,
    sent_dtypes: Mapping[str, str],
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (A, B) of `key`'s update, checked against the tensor and the rank."""
    missing = [h for h in ("A", "B") if h not in pair]
    if missing:
        raise UpdateRejectedError(
            f"tensor {key!r}: lora_{missing[0]} missing (an update needs both "
            "halves of the adapter)"
        )
    if len(spec.shape) < 2 or math.prod(spec.shape[:-2]) != 1:
        raise UpdateRejectedError(
            f"tensor {key!r} of shape {list(spec.shape)} cannot take a "
            "low-rank update (not a matrix)"
        )
    rows, cols = spec.shape[-2], spec.shape[-1]
    want_shape = {"A": (rank, cols), "B": (rows, rank)}
    out = {}
    for half, reply_key in pair.items():
        want = sent_dtypes.get(key, spec.dtype)
        t = _decode(rec[reply_key], reply_key, repr(reply_key), want)
        if tuple(t.shape) != want_shape[half]:
            raise UpdateRejectedError(
                f"{reply_key!r}: shape {list(t.shape)}, expected "
                f"{list(want_shape[half])} (rank {rank}, tensor "
                f"{[rows, cols]})"
            )
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateRejectedError(
                f"{reply_key!r}: {bad} NaN/Inf value(s) of {t.numel()}"
            )
        out[half] = t
    return out["A"], out["B"]


def _loss(v: object) -> float | None:
    """A reported loss, or None when it is not a finite, non-negative number."""
    x = _number(v)
    return x if x is not None and x >= 0 else None


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


def all_finite(t: torch.Tensor) -> bool:
    """Whether no element is NaN or Inf, in about a tenth of isfinite's time.

    Any NaN or Inf makes the sum NaN or Inf, so a finite sum proves the
    tensor finite; only a non-finite sum (a bad value, or finite values that
    overflow when added) needs the element-wise check.
    """
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if math.isfinite(float(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def weight_of(update: ClientUpdate, spec: WireTensor, by_tokens: bool) -> float:
    if by_tokens and spec.expert is not None:
        return update.expert_tokens[spec.expert]
    return float(update.num_examples)


def contribution_order(update: ClientUpdate) -> tuple[str, int]:
    """The order contributions are accumulated in: by institution, then node.

    Flower samples nodes and replies arrive in random order; floating-point
    sums depend on their order, so without a fixed one the same inputs could
    give different averages.
    """
    return (update.institution, update.node_id)


def sparse_average(
    updates: Sequence[ClientUpdate],
    layout: Layout,
    current: Mapping[str, torch.Tensor] | None = None,
    lora_scale: float = 0.0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(wire key, averaged tensor) for every tensor at least one client sent.

    A tensor some client updated through adapters (LoRA mode) becomes its
    `current` value plus the weighted mean of the clients' updates, each
    `lora_scale * B @ A` (or, from a client that sent the tensor whole, its
    values minus `current`): every client's result `current + update` is
    formed in float64, averaged with the weights below and rounded once, to
    the stored dtype, as for whole tensors. Averaging the A and the B
    matrices separately instead would be biased: the mean of products is
    not the product of means.

    One tensor at a time: the weighted sum is accumulated in float64 over the
    contributions in `contribution_order` (so the result never depends on the
    order replies arrived in), divided once, and rounded to the stored dtype
    (`_Workspace.round`). A tensor only one client sent comes back bit-exact.
    Expert tensors are weighted by routed tokens when every contributor
    reported them (and they sum to more than zero), otherwise everything is
    weighted by example counts.

    Rounding guarantee, with integer weights (example or token counts):
    bfloat16 and float16 results are the correctly rounded (half to even)
    weighted mean, since their products and sums are exact in float64 unless
    one element's contributions span more than ~2^40 in magnitude. float32
    results are the float64 quotient rounded once: the correctly rounded mean
    except where the exact mean lies within about 2^-50 (relative) of a
    midpoint between two float32 values, and then one ulp off at most.
    float64 tensors are accumulated in float64 (within a few ulps), float8
    ones rounded through float32 (within one ulp).
    """
    ordered = sorted(updates, key=contribution_order)
    keys = sorted({k for u in ordered for k in (*u.tensors, *u.adapters)})
    work = _Workspace()
    for key in keys:
        spec = layout.specs[key]
        senders = [u for u in ordered if key in u.tensors or key in u.adapters]
        by_tokens = spec.expert is not None and all(
            spec.expert in u.expert_tokens for u in senders
        )
        weights = [weight_of(u, spec, by_tokens) for u in senders]
        if by_tokens and sum(weights) <= 0:
            weights = [float(u.num_examples) for u in senders]
        if any(key in u.adapters for u in senders):
            if current is None:
                raise InvalidInputError(
                    f"tensor {key!r} came as adapters: averaging it needs the "
                    "current values"
                )
            base = current[key]
            flats = [_result_of(u, key, base, lora_scale) for u in senders]
            out = torch.empty_like(base)
            work.average(flats, weights, out.view(-1))
            yield key, out
            continue
        first = senders[0].tensors[key]
        if len(senders) == 1:
            yield key, first.clone()
            continue
        if not first.is_floating_point():
            raise InvalidInputError(
                f"tensor {key!r} of dtype {first.dtype} cannot be averaged"
            )
        out = torch.empty_like(first)
        work.average(
            [u.tensors[key].reshape(-1) for u in senders], weights, out.view(-1)
        )
        yield key, out


def _result_of(
    update: ClientUpdate, key: str, base: torch.Tensor, scale: float
) -> torch.Tensor:
    """The client's value of tensor `key`, flat, in float64: `base` plus its
    low-rank update, or the tensor it sent whole."""
    if key in update.tensors:
        return update.tensors[key].reshape(-1).double()
    a, b = update.adapters[key]
    low = torch.mm(b.double(), a.double()).mul_(scale)
    return low.reshape(-1).add_(base.reshape(-1).double())


_CHUNK = 1 << 18  # elements averaged at a time (2 MiB of float64)


class _Workspace:
    """Buffers reused for every chunk of every tensor: a fresh multi-MiB
    temporary per operation costs more (page faults) than the arithmetic."""

    def __init__(self) -> None:
        self.total = torch.empty(_CHUNK, dtype=torch.float64)
        self.mean = torch.empty(_CHUNK, dtype=torch.float64)
        self.q32 = torch.empty(_CHUNK, dtype=torch.float32)
        self.bits = torch.empty(_CHUNK, dtype=torch.int32)
        self.flag = torch.empty(_CHUNK, dtype=torch.bool)
        self.flag2 = torch.empty(_CHUNK, dtype=torch.bool)

    def average(
        self, flats: list[torch.Tensor], weights: list[float], out: torch.Tensor
    ) -> None:
        """out = the weighted mean of `flats`, rounded as `round` says."""
        weight = math.fsum(weights)
        for lo in range(0, out.numel(), _CHUNK):
            hi = min(lo + _CHUNK, out.numel())
            n = hi - lo
            total = self.total[:n]
            total.copy_(flats[0][lo:hi]).mul_(weights[0])
            for flat, w in zip(flats[1:], weights[1:], strict=True):
                total.add_(flat[lo:hi], alpha=w)  # in float64: exact products
            mean = torch.div(total, weight, out=self.mean[:n])
            self.round(total, weight, mean, out[lo:hi])

    def round(
        self, total: torch.Tensor, weight: float, mean: torch.Tensor, out: torch.Tensor
    ) -> None:
        """out = `total / weight` (`mean`, in float64) rounded to out's dtype.

        The float64 quotient is rounded once, and going on to bfloat16 or
        float16 through float32 rounds again; the result can only differ from
        the correctly rounded one where one of those roundings lands exactly
        on a midpoint between two values of out's dtype (every such midpoint
        is a float32, and rounding is monotone). A bit test finds those few
        elements; only they get the exact check. float32 results are the
        float64 quotient rounded once; float8 ones go through float32.
        """
        if out.dtype in (torch.float64, torch.float32):
            out.copy_(mean)
            return
        n = mean.numel()
        q32 = self.q32[:n]
        q32.copy_(mean)
        out.copy_(q32)
        if out.dtype not in (torch.bfloat16, torch.float16):
            return
        bits = torch.bitwise_and(
            q32.view(torch.int32), _LOW[out.dtype], out=self.bits[:n]
        )
        suspect = torch.eq(bits, _MIDPOINT[out.dtype], out=self.flag[:n])
        if out.dtype == torch.float16:  # below its normal range: check all
            torch.abs(q32, out=q32)
            torch.logical_or(
                suspect, torch.lt(q32, 2.0**-14, out=self.flag2[:n]), out=suspect
            )
        if int(torch.count_nonzero(suspect)):
            at = suspect.nonzero(as_tuple=True)
            out[at] = _exact_rounding(total[at], weight, out[at])


# The low float32 bits below a bfloat16 / float16 significand, and their
# pattern when a float32 lies exactly halfway between two such values.
_LOW = {torch.bfloat16: 0xFFFF, torch.float16: 0x1FFF}
_MIDPOINT = {torch.bfloat16: 0x8000, torch.float16: 0x1000}


def _exact_rounding(
    total: torch.Tensor, weight: float, r: torch.Tensor
) -> torch.Tensor:
    """Corrects `r` (bfloat16 or float16), at most one step from the correctly
    rounded `total / weight`, by comparing `total` with `midpoint * weight`
    for the midpoints on both sides of it. A midpoint has one bit more than `r`'s
    dtype and the weights are integers, so the products are exact in float64
    and the comparison is exact whenever `total` is."""
    up = torch.nextafter(r, torch.full_like(r, math.inf))
    down = torch.nextafter(r, torch.full_like(r, -math.inf))
    rd = r.double()
    mid_up = (rd + up.double()) * 0.5 * weight
    mid_down = (rd + down.double()) * 0.5 * weight
    # Past a midpoint: the neighbour is nearer. On one: the even of the two
    # (the last bit of a 16-bit float's encoding is its last significand bit).
    odd = (r.view(torch.int16) & 1).bool()
    go_up = (total > mid_up) | ((total == mid_up) & odd)
    go_down = (total < mid_down) | ((total == mid_down) & odd)
    return torch.where(go_up, up, torch.where(go_down, down, r))


def merge_into_record(
    current: ArrayRecord, averaged: Iterator[tuple[str, torch.Tensor]]
) -> tuple[ArrayRecord, list[str]]:
    """A new record: `current`'s Arrays (shared, not copied) with the averaged
    tensors replacing theirs; and the keys whose bytes actually changed.

    Each averaged tensor is packed and dropped before the next is computed.
    """
    out = ArrayRecord()
    replaced: dict[str, Array] = {}
    changed: list[str] = []
    for key, t in averaged:
        arr = wire.to_array(t)
        old = current.get(key)
        if old is None or old.stype != wire.RAW_STYPE or old.data != arr.data:
            changed.append(key)
        replaced[key] = arr
        del t
    for key, arr in current.items():
        out[key] = replaced.get(key, arr)
    return out, changed

"""transformers MoE models whose experts come from a param-server on demand.

transformers 5 keeps a layer's experts in one module whose forward takes
(hidden_states, top_k_index, top_k_weights) and whose weights are fused 3-D
parameters, and lets a library register another forward for those modules
(`ExpertsInterface`). We register one that asks a LazyExpertLoader for the
routed experts only, and drop the fused parameters, so expert weights exist
only while cached.

Adding a model family means adding a row to FAMILIES in param_server.core.shards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from loaders.cache import LazyExpertLoader, Tensors, own_copy
from loaders.eviction import EvictionPolicy
from loaders.narrow import Narrow, NarrowExpert, Part, part_shape
from loaders.pool import ExpertPool
from loaders.slots import ExpertSlots
from param_server.client import ParamClient
from param_server.core import prequant, tensor_codec
from param_server.core.errors import InvalidInputError
from param_server.core.manifest import Manifest
from param_server.core.shards import (
    ModelFamily,
    by_expert_suffix,
    is_expert_key,
    lazy_family,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMPLEMENTATION = "param_server_lazy"
POOLED = "param_server_pooled"


def _gather(
    family: ModelFamily,
    shapes: dict[str, tuple[int, ...]],
    what: str,
    named: Mapping[str, T],
    shape_of: Callable[[T], tuple[int, ...]],
) -> dict[str, list[T]]:
    """Each fused parameter's stored parts, in the order they concatenate
    (along the first dimension), checked against the config's shapes."""
    by_suffix = by_expert_suffix(named)
    out = {}
    for param, parts in family.params:
        if param in by_suffix:  # stored fused ([E, ...] split per expert)
            src = [by_suffix[param]]
        else:
            missing = [p for p in parts if p not in by_suffix]
            if missing:
                raise InvalidInputError(
                    f"{what}: no tensor ending in {missing[0]!r} (have "
                    f"{sorted(by_suffix)})"
                )
            src = [by_suffix[p] for p in parts]
        first = shape_of(src[0])
        shape = (sum(shape_of(s)[0] for s in src), *first[1:])
        if shape != shapes[param]:
            raise InvalidInputError(
                f"{what}: tensor {param!r} has shape {list(shape)} but the model "
                f"config expects {list(shapes[param])}"
            )
        out[param] = src
    return out


def _prepare_for(  # type: ignore[no-untyped-def]
    family: ModelFamily,
    shapes: dict[str, tuple[int, ...]],
    model: str,
    scheme: prequant.Scheme | None = None,
    dtype: torch.dtype | None = None,
):
    """A Prepare that builds the fused per-expert tensors the module expects
    (dequantized to `dtype` first when the checkpoint arrived quantized)."""

    def prepare(layer: int, expert: int, tensors: Tensors, pin: bool) -> Tensors:
        what = f"{model} layer {layer} expert {expert}"
        if scheme is not None:
            assert dtype is not None
            tensors = prequant.dequantize_shard(tensors, scheme, dtype, what)
        out = {}
        for param, src in _gather(
            family, shapes, what, tensors, lambda t: tuple(t.shape)
        ).items():
            if len(src) == 1:
                out[param] = own_copy(src[0], pin)
                continue
            t = torch.empty(shapes[param], dtype=src[0].dtype, pin_memory=pin)
            torch.cat(src, dim=0, out=t)
            out[param] = t
        return out

    return prepare


def _narrow_for(
    family: ModelFamily, shapes: dict[str, tuple[int, ...]], model: str
) -> Narrow:
    """A Narrow that keeps an expert's 8-bit variant parts, checked against
    the config's shapes, until the device widens them."""

    def narrow(
        layer: int, expert: int, parts: Mapping[str, Part], pin: bool
    ) -> NarrowExpert:
        what = f"{model} layer {layer} expert {expert}"
        gathered = _gather(family, shapes, what, parts, part_shape)
        return NarrowExpert.pack(
            {
                param: (shapes[param], src[0].dtype, src)
                for param, src in gathered.items()
            },
            pin,
        )

    return narrow


def lazy_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The eager experts forward of transformers, op for op, on cached experts."""
    loader: LazyExpertLoader = self._lazy_loader  # type: ignore[assignment]
    layer: int = self._lazy_layer  # type: ignore[assignment]
    num_experts: int = self._lazy_num_experts  # type: ignore[assignment]
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    hit = [e for e in expert_hit[:, 0].tolist() if e != num_experts]
    for expert_idx, w in loader.iter_experts(layer, hit):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, w["gate_up_proj"]).chunk(
            2, dim=-1
        )
        current = self.act_fn(gate) * up  # type: ignore[operator]
        current = nn.functional.linear(current, w["down_proj"])
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(
            0, token_idx, current.to(final_hidden_states.dtype)
        )
    return final_hidden_states


def pooled_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' own experts implementation on the loader's pool: routed
    expert ids are replaced by their slots through a map kept on the device
    (see `LazyExpertLoader.map_slots`).

    When every routed expert is mapped already (the common step), that is
    all: on CUDA the step is launched on the map first, and the host then
    learns the routed experts (a copy of the router's output, the only wait:
    the experts' kernels are queued behind it and run meanwhile) and keeps
    the result when each one was mapped and the map unchanged since the
    launch. Otherwise the routed experts are brought into slots and the step
    runs on them (a launched result is dropped). A step that routes to more
    experts than the pool holds runs them in groups that fit, one after
    another; the eager loop runs only when a group cannot get its slots
    (experts pinned or brought in over the budget)."""
    loader: LazyExpertLoader = self._lazy_loader  # type: ignore[assignment]
    layer: int = self._lazy_layer  # type: ignore[assignment]
    inner: Callable[..., torch.Tensor] = self._lazy_inner  # type: ignore[assignment]
    num_experts: int = self._lazy_num_experts  # type: ignore[assignment]
    likeliest: list[int] = []
    if "_lazy_ahead" not in self.__dict__ and loader.launch_ahead:
        epoch = loader.map_epoch(layer)
        table = loader.device_map(layer, num_experts)
        host, copied = _routed_to_host(top_k_index)
        out = inner(self, hidden_states, table[top_k_index], top_k_weights)
        if copied is not None:
            copied.synchronize()
        ids = torch.unique(host).tolist()
        _score_the_guess(self, loader, ids)
        with loader.hold_mapped(layer, ids, epoch) as hit:
            if hit:
                return out
    else:
        ids, predicted, likeliest = _routed_and_predicted(
            self, hidden_states, top_k_index
        )
        _score_the_guess(self, loader, ids)
        if predicted is not None:
            self._lazy_ahead[2].__dict__["_lazy_predicted"] = predicted  # type: ignore[index]
        with loader.hold_mapped(layer, ids) as hit:
            if hit:
                if likeliest:
                    _prefetch_ahead(self, likeliest)
                table = loader.device_map(layer, num_experts)
                return inner(self, hidden_states, table[top_k_index], top_k_weights)
    room = loader.pool_room(layer)
    if len(ids) <= room:
        with loader.acquire_slots(layer, ids) as slots:
            if slots is not None:
                if likeliest:
                    # This layer's experts are held: the prefetch cannot evict
                    # them, and its copies run while this layer computes.
                    _prefetch_ahead(self, likeliest)
                table = loader.map_slots(layer, slots, num_experts)
                return inner(self, hidden_states, table[top_k_index], top_k_weights)
    elif room > 0:
        grouped = _in_groups(self, hidden_states, top_k_index, top_k_weights, ids, room)
        if grouped is not None:
            return grouped
    return lazy_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def _score_the_guess(self: nn.Module, loader: LazyExpertLoader, ids: list[int]) -> None:
    """Counts how well the previous layer predicted this layer's experts."""
    guess: list[int] | None = self.__dict__.pop("_lazy_predicted", None)
    if guess is not None:
        loader.note_prediction(len(guess), len(set(guess) & set(ids)), len(ids))


def _routed_to_host(
    top_k_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of the routed expert ids, queued now on the current stream
    (into page-locked memory, so the host does not wait), and the event to
    wait for before reading it (None off CUDA: the tensor itself)."""
    if not top_k_index.is_cuda:
        return top_k_index, None
    host = torch.empty(top_k_index.shape, dtype=top_k_index.dtype, pin_memory=True)
    host.copy_(top_k_index, non_blocking=True)
    copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
    copied.record()
    return host, copied


def _routed_and_predicted(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor
) -> tuple[list[int], list[int] | None, list[int]]:
    """This layer's routed experts and, when the next MoE layer's router is
    known, the experts it picks for these hidden states (pre-gating: a
    layer's input predicts the next layer's routing, because the residual
    stream changes little from one layer to the next), and of those the
    top-k most picked (what is prefetched: at large batches the prediction
    names most experts, and bringing them all in would evict the ones
    in use). One host synchronisation for all."""
    num_experts: int = self._lazy_num_experts  # type: ignore[assignment]
    ahead = self.__dict__.get("_lazy_ahead")
    if ahead is None:
        return torch.unique(top_k_index).tolist(), None, []
    router, top_k, _ = ahead
    with torch.no_grad():
        # forward, not __call__: the extra routing must not reach hooks that
        # record router outputs.
        out = router.forward(hidden_states)
    if isinstance(out, tuple):
        guess = out[-1]
    else:  # a router that returns only logits
        guess = torch.topk(out, top_k, dim=-1).indices
    votes = torch.zeros((2, num_experts), dtype=torch.int32, device=guess.device)
    for row, index in enumerate((top_k_index, guess)):
        flat = index.reshape(-1).to(votes.device)
        votes[row].scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    both = votes.cpu()
    routed = both[0].nonzero()[:, 0].tolist()
    named = both[1].nonzero()[:, 0].tolist()
    likeliest = both[1].argsort(descending=True, stable=True)[: min(top_k, len(named))]
    return routed, named, likeliest.tolist()


def _prefetch_ahead(self: nn.Module, experts: list[int]) -> None:
    """Starts bringing `experts` of the next MoE layer in."""
    loader: LazyExpertLoader = self._lazy_loader  # type: ignore[assignment]
    _, _, nxt = self._lazy_ahead  # type: ignore[misc]
    loader.prefetch(nxt._lazy_layer, experts)


def _in_groups(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    ids: list[int],
    room: int,
) -> torch.Tensor | None:
    """The experts of a step routed to more experts than the pool holds, in
    groups of at most `room`, each on the stock implementation; None when a
    group cannot get its slots.

    Each (token, choice) row's expert output is taken from exactly one group,
    computed by the implementation's own kernels with unit weight, so it is
    what the resident model computes; weighting and the per-token sum then
    repeat the implementation's last two steps on all rows at once.
    grouped_mm gets a group's rows only (its kernels compute each expert's
    rows alike however many other rows there are); the others get every row
    each time, because batched matrix products may pick another algorithm,
    and another summation order, for another number of rows.
    """
    from transformers.integrations.moe import grouped_mm_experts_forward

    loader: LazyExpertLoader = self._lazy_loader  # type: ignore[assignment]
    layer: int = self._lazy_layer  # type: ignore[assignment]
    num_experts: int = self._lazy_num_experts  # type: ignore[assignment]
    inner: Callable[..., torch.Tensor] = self._lazy_inner  # type: ignore[assignment]
    device = hidden_states.device
    tokens, top_k = top_k_index.shape
    groups = [ids[i : i + room] for i in range(0, len(ids), room)]
    group_of = torch.zeros(num_experts, dtype=torch.long)
    for g, members in enumerate(groups):
        group_of[members] = g
    flat = top_k_index.reshape(-1)
    gid = group_of.to(device, non_blocking=True)[flat]
    order = torch.argsort(gid, stable=True)
    counts = torch.bincount(gid, minlength=len(groups)).tolist()
    every_row = inner is not grouped_mm_experts_forward
    rows = torch.empty(
        (tokens * top_k, hidden_states.shape[-1]),
        dtype=hidden_states.dtype,
        device=device,
    )
    unit = torch.ones(
        (tokens * top_k if every_row else max(counts), 1),
        dtype=top_k_weights.dtype,
        device=device,
    )
    start = 0
    for members, n in zip(groups, counts, strict=True):
        picked = order[start : start + n]
        start += n
        with loader.acquire_slots(layer, members) as slots:
            if slots is None:
                return None
            table = loader.map_slots(layer, slots, num_experts)
            if every_row:  # rows of other groups: computed, not kept
                out = inner(
                    self,
                    hidden_states.repeat_interleave(top_k, dim=0),
                    table[flat].unsqueeze(1),
                    unit,
                )
                rows[picked] = out[picked]
            else:
                rows[picked] = inner(
                    self,
                    hidden_states[picked // top_k],
                    table[flat[picked]].unsqueeze(1),
                    unit[:n],
                )
    weighted = rows * top_k_weights.reshape(-1).unsqueeze(-1)
    out = weighted.view(tokens, top_k, -1).sum(dim=1)
    return out.to(hidden_states.dtype)


def _count_hits(loader: LazyExpertLoader):  # type: ignore[no-untyped-def]
    def hook(
        module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> None:
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        if isinstance(index, torch.Tensor):
            loader.count_hits(index.numel())

    return hook


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, lazy_experts_forward)
    ExpertsInterface.register(POOLED, pooled_experts_forward)


@dataclass
class LazyModel:
    """A transformers model serving experts through `loader`."""

    model: nn.Module
    loader: LazyExpertLoader
    manifest: Manifest
    """The version being served (a HotSwapper moves it)."""
    family: ModelFamily
    expert_shapes: dict[str, tuple[int, ...]]
    """Fused per-expert parameter -> shape the model expects."""
    scheme: prequant.Scheme | None = None
    """How the checkpoint's weights are stored when it arrived quantized
    (each shard is dequantized to the compute dtype when it arrives)."""
    experts_implementation: str = "eager"
    """What computes the experts: transformers' implementation of that name,
    on the model's own parameters (every expert in its slot) or on the
    loader's pool of slots; "eager" when the eager loop runs on cached
    experts. With a pool, a step routed to more experts than it holds runs
    the eager loop too."""

    def close(self) -> None:
        self.loader.close()


def _get(module: nn.Module, path: str) -> nn.Module | None:
    found: nn.Module | None = module
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


def _pools_for(
    implementation: str,
    moe_layers: dict[int, nn.Module],
    fused: dict[str, tuple[torch.Size, torch.dtype]],
    budget_bytes: int,
    device: str | torch.device,
) -> dict[int, ExpertPool] | None:
    """One pool of expert slots per MoE layer, together as many as the
    budget holds, for an implementation that can run on one (not eager: its
    result depends on the order it visits experts in, and the eager loop on
    cached experts is it). Per layer, because the stock kernels' cost grows
    with the number of experts they are shown (grouped_mm walks every
    group), so a layer is shown its own slots only."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation == "eager" or implementation not in ALL_EXPERTS_FUNCTIONS:
        return None
    if not moe_layers or not fused:
        return None
    shapes = {p: tuple(shape[1:]) for p, (shape, _) in fused.items()}
    dtype = next(iter(fused.values()))[1]
    per_expert = sum(
        math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        for shape in shapes.values()
    )
    capacity = budget_bytes // per_expert
    if capacity < len(moe_layers):
        return None
    share, extra = divmod(capacity, len(moe_layers))
    return {
        layer: ExpertPool(shapes, share + (i < extra), dtype=dtype, device=device)
        for i, layer in enumerate(sorted(moe_layers))
    }


def load_lazy_model(
    client: ParamClient,
    model: str,
    *,
    budget_bytes: int,
    version: int | None = None,
    device: str | torch.device = "cpu",
    policy: EvictionPolicy | None = None,
    experts_implementation: str | None = None,
    host_budget_bytes: int | None = None,
    prefetch: bool | None = None,
    width: str = "full",
    keep_narrow: bool = False,
) -> LazyModel:
    """Builds `model` from the server with lazily loaded experts.

    Dense and global weights are fetched and loaded. When `budget_bytes`
    holds every expert, each experts module keeps its fused parameters and
    every expert is fetched into its slot there (see `loaders.slots`): the
    model runs transformers' own `experts_implementation` (None: the
    transformers default, `grouped_mm` where it can run) exactly as the
    resident model does. Below that, each experts module holds no weights
    and asks the loader for the experts its router picks, computing
    transformers' eager experts loop on them. `policy` orders evictions
    (`FrequencyPolicy` by default; see `loaders.eviction`).
    `host_budget_bytes` bounds the host tier of prepared experts in
    page-locked memory (see `LazyExpertLoader`; default on CUDA: every
    expert's bytes, off on the CPU and when every expert is in its slot).
    With a pool, `prefetch` predicts each next MoE layer's experts by
    applying its router to the current layer's input, and brings them in
    on the copy stream while the current layer computes (counted in
    `loader.stats()`: `prefetched`, `prediction_recall`,
    `prediction_precision`). None (the default): off. It costs a router
    pass and a host synchronisation per layer, and a layer whose experts
    are all mapped runs without either when it is off (on CUDA the step is
    launched before the lookup: see `pooled_experts_forward`); measured in
    BENCHMARKS.md, it paid on none of the models there. `width` "int8" or
    "fp8" fetches experts as the server's 8-bit variants (about half the
    bytes of bf16 on the wire), dequantized to the stored dtype when they
    arrive; hot swaps then fetch the new experts' variants too. With
    `keep_narrow` (CUDA) an 8-bit expert stays at that width on the host and
    is dequantized on the device when it fills a slot: the host tier holds
    twice the experts and a miss moves half the bytes over PCIe, for more
    work per miss on the host (the same numbers either way; see
    `loaders.narrow`, measured in BENCHMARKS.md). A checkpoint
    imported already quantized (config.json's `quantization_config`: FP8
    block scales or compressed-tensors 8-bit, see
    `param_server.core.prequant`) is fetched as stored and dequantized to
    the config's dtype on arrival (`width` must be "full").

    Raises:
        UnavailableError: the server stayed unreachable (after retries).
        InvalidInputError: an unsupported family, a zero or too small budget,
            or a checkpoint that does not match the config (naming the tensor
            and both shapes).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    _register()
    manifest = client.get_manifest(model, version)
    if "config.json" not in manifest.files:
        raise InvalidInputError(f"{model}@{manifest.version} has no config.json")
    cfg_dict = json.loads(
        bytes(client.fetch_blobs(manifest, [], files=["config.json"])["config.json"])
    )
    scheme = prequant.scheme_of(cfg_dict)
    if scheme is not None:
        if width != "full":
            raise InvalidInputError(
                f"{model} is stored quantized ({scheme.method}); it has no "
                f"{width} variant: serve it at width 'full' (its own 8-bit bytes)"
            )
        # Built at the compute dtype; the weights are dequantized on arrival.
        cfg_dict = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg_dict)
    family = lazy_family(config.model_type)
    dtype = getattr(config, "dtype", None) or torch.float32
    extra = (
        {}
        if experts_implementation is None
        else {"experts_implementation": experts_implementation}
    )
    with no_init_weights():  # allocations stay untouched until dropped or loaded
        net = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)  # type: ignore[no-untyped-call]
    net.eval()
    every_expert = sum(s.size for k, s in manifest.shards.items() if is_expert_key(k))
    in_slots = budget_bytes >= every_expert
    # Layers with a dense MLP instead (DeepSeek-V3's first layers) have none.
    moe_layers = {
        i: experts
        for i, layer in enumerate(net.model.layers)
        if (experts := _get(layer, family.experts_path)) is not None
    }
    shapes: dict[str, tuple[int, ...]] = {}
    fused: dict[str, tuple[torch.Size, torch.dtype]] = {}
    for experts in moe_layers.values():
        for param, _ in family.params:
            t = getattr(experts, param)
            shapes[param] = tuple(t.shape[1:])
            fused[param] = (t.shape, t.dtype)
            delattr(experts, param)  # never touched, so never resident
    check_expert_shapes(manifest, family, shapes)
    loader = LazyExpertLoader(
        client,
        manifest,
        budget_bytes=budget_bytes,
        device=device,
        prepare=_prepare_for(family, shapes, model, scheme, dtype),
        policy=policy,
        host_budget_bytes=host_budget_bytes,
        width=width,
        narrow=_narrow_for(family, shapes, model) if keep_narrow else None,
    )
    if not in_slots:
        for i, experts in moe_layers.items():
            # Plain attributes (not submodules): what the lazy forwards read.
            experts.__dict__["_lazy_loader"] = loader
            experts.__dict__["_lazy_layer"] = i
            experts.__dict__["_lazy_num_experts"] = experts.num_experts
    state = dense_state(client, manifest, None, family, scheme, dtype)
    check_dense(net, state, manifest, complete=True)
    net.load_state_dict(state, strict=False, assign=True)
    if getattr(net.config, "tie_word_embeddings", False):
        net.tie_weights()
    if in_slots:  # the slots, allocated where they will live, filled below
        for experts in moe_layers.values():
            for param, (shape, dt) in fused.items():
                empty = torch.empty(shape, dtype=dt, device=device)
                experts.register_parameter(param, nn.Parameter(empty, False))
    net.to(device)
    if in_slots:
        loader.use_slots(ExpertSlots(moe_layers, [p for p, _ in family.params]))
        loader.fill_slots()
        for experts in moe_layers.values():
            # Every routed expert is a hit; counted from shapes, no sync.
            experts.register_forward_pre_hook(_count_hits(loader), with_kwargs=True)
        runs = str(net.config._experts_implementation)
    else:
        runs = str(net.config._experts_implementation)
        pools = _pools_for(runs, moe_layers, fused, budget_bytes, device)
        if pools is None:
            runs = "eager"
        loader.pools = pools
        name = IMPLEMENTATION if pools is None else POOLED
        if pools is not None and prefetch:
            _link_ahead(net, moe_layers, family)
        for i, experts in moe_layers.items():
            if pools is not None:
                from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

                experts.__dict__["_lazy_inner"] = ALL_EXPERTS_FUNCTIONS[runs]
                experts.__dict__.update(pools[i].tensors)  # its weights: its pool
                experts.__dict__["num_experts"] = pools[i].capacity
        net.config._experts_implementation = name
        for module in net.modules():
            if hasattr(module, "_lazy_loader"):
                module.config._experts_implementation = name
        if pools is not None:
            _follow_the_decode_switch(
                net, list(moe_layers.values()), torch.device(device)
            )
    logger.info(
        "lazy model %s@%d on %s, expert budget %d bytes (%s), experts run %s",
        model,
        manifest.version,
        device,
        budget_bytes,
        "every expert in its slot"
        if in_slots
        else f"experts on demand{' in per-layer pools' if loader.pools else ''}",
        runs,
    )
    return LazyModel(net, loader, manifest, family, shapes, scheme, runs)


def _follow_the_decode_switch(
    net: nn.Module, modules: list[nn.Module], device: torch.device
) -> None:
    """Makes `generate` switch the pooled layers' implementation for decoding
    as it switches a resident model's: transformers runs `batched_mm` instead
    of `grouped_mm` while decoding on a device other than the CPU (faster on
    a few tokens), by renaming the configured implementation, which a pooled
    model does not carry (its layers run `param_server_pooled`, with the
    stock implementation inside). Without this the lazy model would decode
    with another kernel than the resident one, slower and not bit-equal."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    original = getattr(net, "_optimize_model_for_decode", None)
    if original is None:  # a transformers without the switch
        return
    grouped = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    batched = ALL_EXPERTS_FUNCTIONS["batched_mm"]

    @contextlib.contextmanager
    def optimize_for_decode() -> Iterator[None]:
        swap = []
        if device.type != "cpu":
            swap = [m for m in modules if m.__dict__["_lazy_inner"] is grouped]
        with original():
            for m in swap:
                m.__dict__["_lazy_inner"] = batched
            try:
                yield
            finally:
                for m in swap:
                    m.__dict__["_lazy_inner"] = grouped

    net.__dict__["_optimize_model_for_decode"] = optimize_for_decode


def _link_ahead(
    net: nn.Module, moe_layers: dict[int, nn.Module], family: ModelFamily
) -> None:
    """Gives each experts module the next MoE layer's router and experts
    module, for the layer-ahead prediction."""
    order = sorted(moe_layers)
    default_k = int(getattr(net.config, "num_experts_per_tok", 1) or 1)
    layers: list[nn.Module] = list(net.model.layers)  # type: ignore[union-attr,arg-type]
    for here, there in itertools.pairwise(order):
        router = _get(layers[there], family.router_path)
        if router is None or not callable(getattr(router, "forward", None)):
            continue
        top_k = int(getattr(router, "top_k", default_k))
        moe_layers[here].__dict__["_lazy_ahead"] = (router, top_k, moe_layers[there])


def check_expert_shapes(
    manifest: Manifest, family: ModelFamily, shapes: dict[str, tuple[int, ...]]
) -> None:
    """Checks every expert in the manifest against the config, before serving."""
    if shapes and not any(is_expert_key(key) for key in manifest.shards):
        raise InvalidInputError(
            f"{manifest.model}@{manifest.version} has no expert shards, but the "
            f"{family.model_types[0]} model built from its config.json has "
            "routed experts: the import recognised none of its expert tensors "
            "(see the warning it printed). Re-import it once its naming is a "
            "row of FAMILIES in param_server/core/shards.py"
        )
    for key, shard in sorted(manifest.shards.items()):
        if not is_expert_key(key):
            continue
        by_suffix = by_expert_suffix({t.name: t for t in shard.tensors})
        for param, parts in family.params:
            if param in by_suffix:
                first, shape = by_suffix[param], by_suffix[param].shape
            elif all(p in by_suffix for p in parts):
                first = by_suffix[parts[0]]
                shape = (sum(by_suffix[p].shape[0] for p in parts), *first.shape[1:])
            else:
                raise InvalidInputError(
                    f"{manifest.model}@{manifest.version} shard {key!r} lacks tensors "
                    f"ending in {list(parts)} (has {sorted(by_suffix)})"
                )
            if tuple(shape) != shapes[param]:
                raise InvalidInputError(
                    f"{manifest.model}@{manifest.version}: tensor {first.name!r} makes "
                    f"{param} of shape {list(shape)} but the model built from "
                    f"config.json expects {list(shapes[param])}"
                )


def dense_state(
    client: ParamClient,
    manifest: Manifest,
    keys: list[str] | None,
    family: ModelFamily,
    scheme: prequant.Scheme | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Module name -> tensor (own storage) of the dense shards `keys` (all when
    None) of `manifest`, dequantized to `dtype` when the checkpoint arrived
    quantized (`scheme`)."""
    if keys is None:
        keys = [k for k in manifest.shards if not is_expert_key(k)]
    state: dict[str, torch.Tensor] = {}
    for key, buf in client.fetch_blobs(manifest, keys).items():
        what = f"{manifest.model}:{key}"
        tensors = tensor_codec.decode(buf, what)
        if scheme is not None:
            assert dtype is not None
            tensors = prequant.dequantize_shard(tensors, scheme, dtype, what)
        for name, t in tensors.items():
            for a, b in family.renames:
                name = name.replace(a, b)
            state[name] = t.clone()  # own storage; the blob buffer is dropped
    return state


def check_dense(
    net: nn.Module,
    state: dict[str, torch.Tensor],
    manifest: Manifest,
    *,
    complete: bool,
) -> None:
    """Checks names, shapes (and for a live model, dtypes) against `net`.

    Raises:
        InvalidInputError: naming the tensor and what was expected.
    """
    where = f"{manifest.model}@{manifest.version}"
    expected = dict(net.state_dict())
    for name, t in state.items():
        want = expected.get(name)
        if want is None:
            raise InvalidInputError(
                f"{where}: tensor {name!r} is not in the model built from its "
                "config.json; the config does not match the weights"
            )
        if tuple(want.shape) != tuple(t.shape):
            raise InvalidInputError(
                f"{where}: tensor {name!r} has shape {list(t.shape)} but the model "
                f"built from config.json expects {list(want.shape)}"
            )
        if not complete and want.dtype != t.dtype:
            raise InvalidInputError(
                f"{where}: tensor {name!r} is {t.dtype} but the live model has "
                f"{want.dtype}; a dtype change needs a restart of the node"
            )
    if complete:
        missing = sorted(set(expected) - set(state) - _tied(net))
        if missing:
            raise InvalidInputError(
                f"{where}: no weights for {missing[:3]} ({len(missing)} tensors "
                "missing)"
            )


def _tied(net: nn.Module) -> set[str]:
    if getattr(net.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()

"""Every expert in its own place in the model's fused parameters.

When the budget holds every expert, a lazy model keeps its experts modules'
own fused parameters (`[num_experts, ...]`, as a resident model has them)
and the loader writes each expert straight into its slot: the model then
runs transformers' own experts implementation (`grouped_mm`, `batched_mm`,
`eager`, whatever it is configured with), unchanged, on its own weights, so
it computes exactly what the resident model computes, as fast. The loader's
cache entries are views of the slots, so nothing is held twice.

A hot update fetches the new version of an expert beside the model (an
ordinary cache entry) and `repoint` copies it into the slot at the flip,
when no forward pass runs; the copy is queued on the compute stream, so
passes before the flip read the old weights and passes after it the new.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from param_server.core.manifest import Manifest
from param_server.core.shards import expert_key

Tensors = dict[str, torch.Tensor]


class ExpertSlots:
    """The slots of every (layer, expert) in the experts modules' parameters.

    Args:
        modules: layer -> its experts module, holding the fused parameters.
        params: names of the fused parameters (`gate_up_proj`, `down_proj`).
    """

    def __init__(self, modules: Mapping[int, nn.Module], params: list[str]) -> None:
        self._views: dict[tuple[int, int], Tensors] = {}
        for layer, module in modules.items():
            fused = {p: getattr(module, p).data for p in params}
            count = next(iter(fused.values())).shape[0]
            for e in range(count):
                self._views[(layer, e)] = {p: t[e] for p, t in fused.items()}
        self._digest: dict[tuple[int, int], str | None] = dict.fromkeys(self._views)

    def __contains__(self, slot: tuple[int, int]) -> bool:
        return slot in self._views

    def place(self, layer: int, expert: int, digest: str) -> Tensors | None:
        """Where a newly fetched expert goes: its empty slot, or None (a slot
        that holds a version keeps it until `repoint`)."""
        slot = (layer, expert)
        if slot not in self._views or self._digest[slot] is not None:
            return None
        self._digest[slot] = digest
        return self._views[slot]

    def release(self, layer: int, expert: int) -> None:
        """Marks a slot empty again (its fetch failed after `place`)."""
        self._digest[(layer, expert)] = None

    def missing(
        self, manifest: Manifest, entries: Mapping[str, Tensors]
    ) -> list[tuple[int, int]]:
        """Slots whose expert in `manifest` is neither in place nor cached."""
        out = []
        for slot in self._views:
            digest = manifest.shards[expert_key(*slot)].digest
            if self._digest[slot] != digest and digest not in entries:
                out.append(slot)
        return out

    def repoint(
        self,
        manifest: Manifest,
        entries: Mapping[str, Tensors],
        ready: Mapping[str, torch.cuda.Event | None],
    ) -> dict[str, Tensors]:
        """Puts every expert of `manifest` into its slot, copying those not
        there from wherever the same bytes are (another slot, or the cache
        entry `entries[digest]`); call it only while no forward pass runs.
        Returns digest -> slot views of every digest now in a slot: the cache
        entries of those digests should be these views.

        Raises:
            KeyError: an expert of `manifest` is neither in a slot nor cached
                (check `missing` first).
        """
        want = {slot: manifest.shards[expert_key(*slot)].digest for slot in self._views}
        changing = {slot for slot, d in want.items() if self._digest[slot] != d}
        holders: dict[str, list[tuple[int, int]]] = {}
        for slot, d in self._digest.items():
            if d is not None:
                holders.setdefault(d, []).append(slot)
        sources: dict[str, Tensors] = {}
        for slot in sorted(changing):
            d = want[slot]
            if d in sources:
                continue
            stable = [h for h in holders.get(d, []) if h not in changing]
            if stable:
                sources[d] = self._views[stable[0]]
            elif d in holders:  # only in slots about to change: keep a copy
                sources[d] = {
                    n: t.clone() for n, t in self._views[holders[d][0]].items()
                }
            else:
                sources[d] = entries[d]
        for slot in sorted(changing):
            d = want[slot]
            views, src = self._views[slot], sources[d]
            first = next(iter(views.values()))
            stream = torch.cuda.current_stream(first.device) if first.is_cuda else None
            event = ready.get(d)
            if stream is not None and event is not None:
                stream.wait_event(event)
            for name, dst in views.items():
                dst.copy_(src[name], non_blocking=True)
                if stream is not None:
                    # The source's memory must outlive the queued copy.
                    src[name].record_stream(stream)
            self._digest[slot] = d
        out: dict[str, Tensors] = {}
        for slot, d in self._digest.items():
            if d is not None:
                out.setdefault(d, self._views[slot])
        return out

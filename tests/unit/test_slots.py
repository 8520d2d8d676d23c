"""Experts in their slots of the model's fused parameters: placing, and
copying versions in and out at a flip, the same bytes in several slots
included (an upcycled MoE starts with every expert identical)."""

from __future__ import annotations

import torch
from torch import nn

from loaders.slots import ExpertSlots
from param_server.core.manifest import Manifest, ShardEntry
from param_server.core.shards import expert_key


class Experts(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.zeros(n, 2), requires_grad=False)


def manifest(version: int, digests: dict[tuple[int, int], str]) -> Manifest:
    shards = {
        expert_key(*slot): ShardEntry(expert_key(*slot), d, 8, ())
        for slot, d in digests.items()
    }
    return Manifest(
        model="m",
        version=version,
        parent=version - 1,
        created_at="",
        author="",
        message="",
        metadata={},
        changed=(),
        files={},
        shards=shards,
    )


def value(x: float) -> dict[str, torch.Tensor]:
    return {"up": torch.full((2,), x)}


def test_place_fills_empty_slots_only_and_release_empties_them() -> None:
    layer = Experts(2)
    slots = ExpertSlots({0: layer}, ["up"])
    views = slots.place(0, 1, "a")
    assert views is not None
    views["up"].copy_(torch.tensor([1.0, 2.0]))
    assert layer.up[1].tolist() == [1.0, 2.0]  # a view of the parameter
    assert slots.place(0, 1, "b") is None  # taken until repointed
    assert slots.place(3, 0, "c") is None  # not a slot
    slots.release(0, 1)
    assert slots.place(0, 1, "b") is not None


def test_repoint_copies_versions_in_and_shares_identical_experts() -> None:
    layers = {0: Experts(3), 1: Experts(3)}
    slots = ExpertSlots(layers, ["up"])
    # Upcycled: every expert the same bytes, fetched once into (0, 0).
    same = {slot: "d" for slot in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]}
    v1 = manifest(1, same)
    first = slots.place(0, 0, "d")
    assert first is not None
    first["up"].copy_(torch.tensor([7.0, 7.0]))
    assert slots.missing(v1, {"d": first}) == []
    views = slots.repoint(v1, {"d": first}, {})
    assert all(layer.up.eq(7.0).all() for layer in layers.values())
    assert set(views) == {"d"}
    # Version 2 changes (0, 0) only: the shared entry must stay right for
    # the others, although it was a view of (0, 0).
    v2 = manifest(2, {**same, (0, 0): "e"})
    assert slots.missing(v2, {"d": views["d"]}) == [(0, 0)]
    views = slots.repoint(v2, {"d": views["d"], "e": value(9.0)}, {})
    assert layers[0].up[0].tolist() == [9.0, 9.0]
    assert layers[0].up[1].tolist() == [7.0, 7.0]
    assert views["d"]["up"].tolist() == [7.0, 7.0]  # re-pointed to a slot holding d
    assert views["e"]["up"].data_ptr() == layers[0].up[0].data_ptr()
    # Rolling back copies d from another slot; nothing needs the cache.
    views = slots.repoint(v1, {}, {})
    assert all(layer.up.eq(7.0).all() for layer in layers.values())


def test_a_swap_of_two_experts_contents_reads_before_it_writes() -> None:
    layer = Experts(2)
    slots = ExpertSlots({0: layer}, ["up"])
    v1 = manifest(1, {(0, 0): "a", (0, 1): "b"})
    for e, (d, x) in enumerate([("a", 1.0), ("b", 2.0)]):
        views = slots.place(0, e, d)
        assert views is not None
        views["up"].copy_(value(x)["up"])
    slots.repoint(v1, {}, {})
    v2 = manifest(2, {(0, 0): "b", (0, 1): "a"})
    slots.repoint(v2, {}, {})
    assert layer.up[:, 0].tolist() == [2.0, 1.0]

"""A pool of expert slots shared by every layer, for budgets that do not hold
every expert.

Device tensors shaped like one layer's fused expert parameters, but with as
many rows (slots) as the budget holds experts. The loader writes each expert
it brings in into a free slot, and frees the slot when it evicts the expert.
Each experts module sees the pool as its weights, with the slot of each
routed expert in place of the expert's id, so transformers' own experts
implementations (`grouped_mm`, `batched_mm`) run on it unchanged.

On CUDA a slot is written on the loader's copy stream; before a slot is
reused, that stream waits for an event recorded on the compute stream when
the slot's last user released it, so a queued kernel never reads an expert
that replaced the one it was launched for.
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


class ExpertPool:
    """`capacity` expert slots of the given per-expert shapes.

    Args:
        shapes: fused parameter -> shape of one expert's slice of it.
        capacity: slots (at least 1).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        capacity: int,
        *,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"an expert pool needs at least one slot, got {capacity}")
        self.capacity = capacity
        self.tensors = {
            p: torch.empty((capacity, *shape), dtype=dtype, device=device)
            for p, shape in shapes.items()
        }
        self._free = list(range(capacity - 1, -1, -1))
        self._after: dict[int, torch.cuda.Event | None] = {}

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> tuple[int, torch.cuda.Event | None] | None:
        """A free slot and what to wait for before writing it; None when full."""
        if not self._free:
            return None
        slot = self._free.pop()
        return slot, self._after.pop(slot, None)

    def give(self, slot: int, after: torch.cuda.Event | None = None) -> None:
        """Frees `slot`; `after` marks the end of the last work that reads it."""
        self._after[slot] = after
        self._free.append(slot)

    def views(self, slot: int) -> Tensors:
        return {p: t[slot] for p, t in self.tensors.items()}

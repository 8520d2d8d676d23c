"""Experts kept at 8 bits until the device: packing and widening on the CPU."""

from __future__ import annotations

import pytest
import torch

from loaders.narrow import NarrowExpert
from param_server.core import quant


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_widened_parts_equal_their_dequantization_concatenated(
    kind: str, dtype: torch.dtype
) -> None:
    """Two quantized parts (one with edge blocks) and a plain vector, packed
    into one buffer and widened: each parameter is the concatenation of
    what `quant.dequantize` gives, bit for bit, and the buffer holds about
    half the bytes of the widened parameters."""
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(256, 384, generator=g).to(dtype)
    up = torch.randn(200, 384, generator=g).to(dtype)
    down = torch.randn(384, 456, generator=g).to(dtype)
    bias = torch.randn(384, generator=g).to(dtype)
    qg, qu, qd = (quant.quantize(w, kind) for w in (gate, up, down))
    narrow = NarrowExpert.pack(
        {
            "gate_up": ((456, 384), dtype, [qg, qu]),
            "down": ((384, 456), dtype, [qd]),
            "bias": ((384,), dtype, [bias]),
        },
        pin=False,
    )
    got = narrow.widen(torch.device("cpu"))
    want_gate_up = torch.cat([quant.dequantize(qg), quant.dequantize(qu)])
    assert torch.equal(got["gate_up"], want_gate_up)
    assert torch.equal(got["down"], quant.dequantize(qd))
    assert torch.equal(got["bias"], bias)
    wide = sum(t.numel() * t.element_size() for t in got.values())
    share = narrow.nbytes / wide
    assert (
        (0.25 if dtype == torch.float32 else 0.5)
        <= share
        < (0.27 if dtype == torch.float32 else 0.53)
    )
    # Into slots of another dtype: rounded once to the stored dtype first.
    slots = {k: torch.empty(t.shape, dtype=torch.float32) for k, t in got.items()}
    narrow.widen_into(slots)
    assert all(torch.equal(slots[k], got[k].float()) for k in got)


def test_packed_parts_are_copies_of_the_received_bytes() -> None:
    """The buffer owns its bytes: changing the parts afterwards changes
    nothing (they are views of a received blob, which is dropped)."""
    w = torch.randn(128, 128)
    qz = quant.quantize(w, "int8")
    narrow = NarrowExpert.pack({"w": ((128, 128), torch.float32, [qz])}, pin=False)
    before = narrow.widen(torch.device("cpu"))["w"]
    qz.values.zero_()
    qz.scales.fill_(7.0)
    assert torch.equal(narrow.widen(torch.device("cpu"))["w"], before)

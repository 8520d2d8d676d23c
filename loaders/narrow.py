"""Experts kept at their 8-bit width until they reach the device.

A node that fetches `int8` or `fp8` variants onto a GPU can keep each
expert on the host as the variant stores it (values and scales, in one
page-locked buffer), copy that buffer across PCIe in one transfer, and
dequantize on the device, one kernel per stored tensor, when the expert
fills its slot: half the host memory per expert in the host tier and half
the bytes over PCIe of bf16, and no float8 arithmetic on the CPU (which has
no vectorised cast for it). The result is the number the CPU computes
(float32 products, rounded once to the stored dtype), so a model is served
identically either way. It costs more work on the host per miss than a
plain copy (a kernel per stored tensor), so it is what a node chooses when
its host memory cannot hold every expert at full width (`keep_narrow` of
`load_lazy_model`), not the default: see BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from param_server.core import quant

Tensors = dict[str, torch.Tensor]
Part = torch.Tensor | quant.Quantized
"""A stored tensor of a variant: quantized (values and scales) or as it is."""

_ALIGN = 16


def part_shape(part: Part) -> tuple[int, ...]:
    """The shape of the tensor a part stands for."""
    return tuple(part.values.shape if isinstance(part, quant.Quantized) else part.shape)


@dataclass(frozen=True, slots=True)
class _Span:
    """A tensor's place in a NarrowExpert's buffer."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        n = torch.Size(self.shape).numel() * self.dtype.itemsize
        return buf[self.offset : self.offset + n].view(self.dtype).view(self.shape)


@dataclass(frozen=True, slots=True)
class _Stored:
    """One stored part: its values (and scales, when quantized)."""

    values: _Span
    scales: _Span | None = None
    kind: str = ""
    dtype: torch.dtype | None = None
    """What dequantization returns (the weight's original dtype)."""


@dataclass(frozen=True, slots=True)
class NarrowExpert:
    """An expert as the model's parameters want it, each parameter still in
    its stored parts (concatenated along the first dimension when widened),
    all of them in one CPU buffer."""

    buf: torch.Tensor
    """uint8, every part's values and scales (page-locked on CUDA)."""
    params: Mapping[str, tuple[tuple[int, ...], torch.dtype, tuple[_Stored, ...]]]
    """parameter -> (its shape, its dtype once widened, its parts in order)."""

    @classmethod
    def pack(
        cls,
        params: Mapping[str, tuple[tuple[int, ...], torch.dtype, list[Part]]],
        pin: bool,
    ) -> NarrowExpert:
        """Copies the parts into one (page-locked when `pin`) buffer."""
        tensors: list[tuple[int, torch.Tensor]] = []
        size = 0

        def place(t: torch.Tensor) -> _Span:
            nonlocal size
            span = _Span(size, tuple(t.shape), t.dtype)
            tensors.append((size, t))
            size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
            return span

        laid: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[_Stored, ...]]] = {}
        for name, (shape, dtype, parts) in params.items():
            stored = []
            for p in parts:
                if isinstance(p, quant.Quantized):
                    stored.append(
                        _Stored(place(p.values), place(p.scales), p.kind, p.dtype)
                    )
                else:
                    stored.append(_Stored(place(p)))
            laid[name] = (shape, dtype, tuple(stored))
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        for offset, t in tensors:
            n = t.numel() * t.element_size()
            buf[offset : offset + n].copy_(t.contiguous().view(-1).view(torch.uint8))
        return cls(buf, laid)

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    def widen_into(self, dst: Tensors) -> None:
        """Writes the widened parameters into `dst` (on any device; on CUDA
        call it on the stream that should do the work): one copy of the
        buffer, then one kernel per stored tensor."""
        device = next(iter(dst.values())).device
        on = self.buf.to(device, non_blocking=True)
        for name, (_, _, parts) in self.params.items():
            out = dst[name]
            row = 0
            for p in parts:
                values = p.values.view(on)
                rows = values.shape[0]
                target = out[row : row + rows]
                if p.scales is None:
                    target.copy_(values.reshape(target.shape))
                else:
                    assert p.dtype is not None
                    qz = quant.Quantized(p.kind, values, p.scales.view(on), p.dtype)
                    quant.dequantize(qz, out=target)
                row += rows

    def widen(self, device: torch.device) -> Tensors:
        """The widened parameters in new tensors on `device`."""
        out = {
            name: torch.empty(shape, dtype=dtype, device=device)
            for name, (shape, dtype, _) in self.params.items()
        }
        self.widen_into(out)
        return out


Narrow = Callable[[int, int, Mapping[str, Part], bool], NarrowExpert]
"""(layer, expert, a variant's parts by tensor name, pin) -> the expert kept
narrow, in its own CPU storage (page-locked when `pin`)."""

"""8-bit variants of expert weights: the maths, shared by the daemon that
makes them and every client that reads them.

- `int8`: symmetric, one float32 scale per output channel (row):
  `scale = max|row| / 127`, `q = round(w / scale)` (half to even) clamped to
  [-127, 127]; `w ≈ q * scale`. A row of zeros gets scale 1 (and q = 0).
- `fp8`: E4M3 (`float8_e4m3fn`) with one float32 scale per 128 x 128 block,
  the layout DeepSeek-V3 ships: `scale_inv = max|block| / 448`,
  `q = float8(w / scale_inv)` (round to nearest even), `w ≈ q * scale_inv`
  (the name `weight_scale_inv` is the checkpoint convention for it). Edge
  blocks are smaller; a block of zeros gets scale 1.

Weights are matrices (out x in); leading dimensions of size 1 (an expert's
slice of a fused tensor) are kept. NaN or Inf weights are refused: a scale
computed from them would silently poison the whole row or block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from param_server.core.errors import InvalidInputError

INT8 = "int8"
FP8 = "fp8"
WIDTHS = ("full", INT8, FP8)
"""What a node can ask for: the stored width, or one of the 8-bit variants."""

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_BLOCK = 128
INT8_MAX = 127


@dataclass(frozen=True, slots=True)
class Quantized:
    """A quantized matrix and its scales."""

    kind: str
    values: torch.Tensor
    """int8 or float8_e4m3fn, the weight's shape."""
    scales: torch.Tensor
    """float32: [out] for int8, [ceil(out/128), ceil(in/128)] for fp8."""
    dtype: torch.dtype
    """The dtype the weight had (what dequantization returns)."""

    @property
    def nbytes(self) -> int:
        return (
            self.values.numel() * self.values.element_size()
            + self.scales.numel() * self.scales.element_size()
        )


def check_width(width: str) -> str:
    if width not in WIDTHS:
        raise InvalidInputError(
            f"unknown width {width!r}; choose one of {', '.join(WIDTHS)}"
        )
    return width


def _matrix(w: torch.Tensor, what: str) -> torch.Tensor:
    if not w.is_floating_point():
        raise InvalidInputError(f"{what}: dtype {w.dtype} is not a float weight")
    if w.dim() < 2 or math.prod(w.shape[:-2]) != 1:
        raise InvalidInputError(
            f"{what}: shape {list(w.shape)} is not a matrix; only 2-D weights "
            "(or slices of one expert) are quantized"
        )
    m = w.reshape(w.shape[-2], w.shape[-1]).float()
    if not bool(torch.isfinite(m).all()):
        bad = int((~torch.isfinite(m)).sum())
        raise InvalidInputError(
            f"{what}: {bad} NaN/Inf value(s); refusing to quantize it"
        )
    return m


def quantize(w: torch.Tensor, kind: str, what: str = "weight") -> Quantized:
    """`w` as an `int8` or `fp8` variant (see the module doc).

    Raises:
        InvalidInputError: an unknown kind, a non-matrix, a non-float dtype,
            or NaN/Inf values.
    """
    m = _matrix(w, what)
    if kind == INT8:
        amax = m.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        q = torch.round(m / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        return Quantized(INT8, q.to(torch.int8).reshape(w.shape), scale, w.dtype)
    if kind == FP8:
        rows, cols = m.shape
        br, bc = -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)
        padded = torch.zeros(br * FP8_BLOCK, bc * FP8_BLOCK)
        padded[:rows, :cols] = m
        blocks = padded.view(br, FP8_BLOCK, bc, FP8_BLOCK)
        amax = blocks.abs().amax(dim=(1, 3))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scaled = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        q = scaled.view(br * FP8_BLOCK, bc * FP8_BLOCK)[:rows, :cols]
        values = q.to(torch.float8_e4m3fn).reshape(w.shape)
        return Quantized(FP8, values, scale, w.dtype)
    raise InvalidInputError(f"unknown quantization {kind!r}; choose {INT8} or {FP8}")


def dequantize(qz: Quantized, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight `qz` stands for, in `dtype` (default: the original dtype),
    computed in float32 and rounded once."""
    shape = qz.values.shape
    q = qz.values.reshape(shape[-2], shape[-1]).float()
    if qz.kind == INT8:
        w = q * qz.scales[:, None]
    elif qz.kind == FP8:
        rows, cols = q.shape
        s = qz.scales.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
        w = q * s[:rows, :cols]
    else:
        raise InvalidInputError(f"unknown quantization {qz.kind!r}")
    return w.to(dtype or qz.dtype).reshape(shape)

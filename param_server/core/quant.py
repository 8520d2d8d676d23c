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

import json
import math
import mmap
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import save as _st_save

from param_server.core.errors import InvalidInputError
from param_server.core.safetensors_format import parse_header
from param_server.core.tensor_codec import DTYPE_NAMES, DTYPES, decode
from param_server.core.widths import FP8, INT8, WIDTHS, check_width

__all__ = ["FP8", "INT8", "WIDTHS", "Quantized", "check_width", "dequantize"]


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


def dequantize(
    qz: Quantized, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The weight `qz` stands for, in `dtype` (default: the original dtype),
    computed in float32 and rounded once, on the device `qz` is on. With
    `out` (the weight's shape, on that device) it is written there, then
    converted to `out`'s dtype if that differs, and `out` is returned."""
    if qz.kind not in (INT8, FP8):
        raise InvalidInputError(f"unknown quantization {qz.kind!r}")
    shape = qz.values.shape
    rows, cols = shape[-2], shape[-1]
    want = dtype or qz.dtype
    direct = out is not None and out.dtype == want and out.is_contiguous()
    res = (
        out.view(rows, cols)
        if out is not None and direct
        else torch.empty((rows, cols), dtype=want, device=qz.values.device)
    )
    q = qz.values.reshape(rows, cols)
    # Products in float32 (int8 promotes to it), rounded once into `res`.
    if qz.kind == INT8:
        torch.mul(q, qz.scales[:, None], out=res)
    else:
        q = q.float()  # float8 does not promote
        br, bc = qz.scales.shape
        if rows == br * FP8_BLOCK and cols == bc * FP8_BLOCK:  # whole blocks
            torch.mul(
                q.view(br, FP8_BLOCK, bc, FP8_BLOCK),
                qz.scales[:, None, :, None],
                out=res.view(br, FP8_BLOCK, bc, FP8_BLOCK),
            )
        else:
            s = qz.scales.repeat_interleave(FP8_BLOCK, 0)
            torch.mul(q, s.repeat_interleave(FP8_BLOCK, 1)[:rows, :cols], out=res)
    if out is None:
        return res.view(shape)
    if not direct:
        out.copy_(res.view(out.shape))
    return out


# --- variant blobs -----------------------------------------------------------------

VARIANT_KEY = "moe-param-server.variant"
"""The safetensors metadata key that describes a variant blob: JSON with
`kind`, `source` (the source blob's digest) and `dtypes` (each quantized
tensor's original safetensors dtype)."""
SCALE_SUFFIX = "::scale"
"""A quantized tensor `N`'s scales are the tensor `N::scale` (float32)."""


_EIGHT_BIT = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)


def _quantizable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2 and math.prod(t.shape[:-2]) == 1


def encode_variant(
    tensors: Mapping[str, torch.Tensor], kind: str, source: str
) -> bytes:
    """The `kind` variant of a shard as self-describing safetensors bytes:
    every float matrix quantized (values under its own name, scales under
    `name::scale`), anything else (vectors, integer tensors) kept as it is.
    Equal inputs give equal bytes, so a variant's digest is a function of
    its source's.

    Raises:
        InvalidInputError: an unknown kind, or NaN/Inf in a weight.
    """
    if kind not in (INT8, FP8):
        raise InvalidInputError(
            f"unknown quantization {kind!r}; choose {INT8} or {FP8}"
        )
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, str] = {}
    for name in sorted(tensors):
        t = tensors[name]
        if name.endswith(SCALE_SUFFIX):
            raise InvalidInputError(
                f"tensor {name!r}: names ending in {SCALE_SUFFIX!r} are reserved"
            )
        if t.dtype in _EIGHT_BIT:
            raise InvalidInputError(
                f"tensor {name!r} is stored at 8 bits already ({t.dtype}): the "
                f"model was imported quantized and has no {kind} variant; fetch "
                "it at full width"
            )
        if _quantizable(t):
            qz = quantize(t, kind, name)
            out[name] = qz.values.contiguous()
            out[name + SCALE_SUFFIX] = qz.scales.contiguous()
            dtypes[name] = DTYPE_NAMES[t.dtype]
        else:
            out[name] = t.detach().contiguous()
    about = {"kind": kind, "source": source, "dtypes": dtypes}
    # One metadata key: its JSON (sorted) makes the header, and so the
    # digest, the same on every run.
    return _st_save(out, metadata={VARIANT_KEY: json.dumps(about, sort_keys=True)})


def variant_info(
    buf: bytes | bytearray | memoryview | mmap.mmap, what: str = "blob"
) -> dict[str, object]:
    """The description of a variant blob (see VARIANT_KEY).

    Raises:
        InvalidInputError: not safetensors, or not a variant.
    """
    header = parse_header(memoryview(buf), len(buf), what)
    raw = header.metadata.get(VARIANT_KEY)
    if raw is None:
        raise InvalidInputError(f"{what} is not a quantized variant")
    try:
        about = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{what}: malformed variant description: {e}") from e
    if not isinstance(about, dict) or about.get("kind") not in (INT8, FP8):
        raise InvalidInputError(f"{what}: malformed variant description {raw!r}")
    return about


def decode_variant_parts(
    buf: bytes | bytearray | memoryview | mmap.mmap, what: str = "blob"
) -> dict[str, torch.Tensor | Quantized]:
    """The tensors of a variant blob as they are stored: each quantized one
    as its `Quantized` values and scales (views of `buf`), the others as
    tensors.

    Raises:
        InvalidInputError: not a variant, or a quantized tensor without its
            scales.
    """
    about = variant_info(buf, what)
    kind = str(about["kind"])
    dtypes = about.get("dtypes", {})
    if not isinstance(dtypes, dict):
        raise InvalidInputError(f"{what}: malformed variant description")
    raw = decode(buf, what)
    out: dict[str, torch.Tensor | Quantized] = {}
    for name, t in raw.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if name in dtypes:
            scales = raw.get(name + SCALE_SUFFIX)
            dtype = DTYPES.get(str(dtypes[name]))
            if scales is None or dtype is None:
                raise InvalidInputError(f"{what}: tensor {name!r} lacks its scales")
            out[name] = Quantized(kind, t, scales, dtype)
        else:
            out[name] = t
    return out


def decode_variant(
    buf: bytes | bytearray | memoryview | mmap.mmap, what: str = "blob"
) -> dict[str, torch.Tensor]:
    """The tensors a variant blob stands for, dequantized to their original
    dtypes (what `decode` of the source gives, up to quantization error).

    Raises:
        InvalidInputError: not a variant, or a quantized tensor without its
            scales.
    """
    return {
        name: dequantize(t) if isinstance(t, Quantized) else t
        for name, t in decode_variant_parts(buf, what).items()
    }

"""Checkpoints that arrive quantized, as Hugging Face ships them.

Two layouts, named by config.json's `quantization_config`:

- `quant_method: fp8` (DeepSeek-V3, Qwen3 FP8, "fine-grained FP8"): each
  quantized `X.weight` is float8_e4m3fn beside `X.weight_scale_inv`, one
  float32 per `weight_block_size` block (128 x 128); `w = q * scale_inv`.
- `quant_method: compressed-tensors` with 8-bit weights (`int-quantized`,
  `float-quantized`, `naive-quantized`): `X.weight` is int8 or
  float8_e4m3fn beside `X.weight_scale`, per tensor, per output channel
  (`[out, 1]`), per block or per group; `w = q * scale`. Symmetric only: a
  non-zero `weight_zero_point` is refused, as are packed 4-bit weights.

The store keeps such a checkpoint bit for bit (a scale lives in the shard of
its weight, so an expert's shard holds its own scales) and exports it back
unchanged. A serving node dequantizes each shard into the model's compute
dtype when it arrives (float32 product, rounded once, as transformers does
when it loads such a checkpoint with `dequantize=True`). Activation scales
(`input_scale`) are dropped: the node computes in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from param_server.core.errors import InvalidInputError

EIGHT_BIT = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
_DROPPED = ("input_scale", "input_zero_point", "weight_zero_point")


@dataclass(frozen=True, slots=True)
class Scheme:
    """How a checkpoint's quantized weights are stored."""

    method: str
    """`fp8` or `compressed-tensors` (config.json's `quant_method`)."""
    scale_suffix: str
    """What follows `X.weight` in the name of its scales."""
    block: tuple[int, int] | None = None
    """The fp8 layout's block (rows, columns); compressed-tensors scales
    say their own granularity by their shape."""


def scheme_of(config: Mapping[str, Any]) -> Scheme | None:
    """The quantization of a checkpoint, from its config.json; None when it
    is stored at full width.

    Raises:
        InvalidInputError: a quantization this product cannot serve, named.
    """
    qc = config.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, Mapping):
        raise InvalidInputError("config.json: quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size") or [128, 128]
        if (
            not isinstance(block, list)
            or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)
        ):
            raise InvalidInputError(
                f"config.json: fp8 weight_block_size {block!r} is not two positive "
                "integers"
            )
        return Scheme("fp8", "_scale_inv", (block[0], block[1]))
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt not in ("int-quantized", "float-quantized", "naive-quantized"):
            raise InvalidInputError(
                f"config.json: compressed-tensors format {fmt!r} cannot be served; "
                "supported: int-quantized, float-quantized, naive-quantized (8-bit "
                "weights)"
            )
        for name, group in (qc.get("config_groups") or {}).items():
            weights = (group or {}).get("weights") or {}
            bits = weights.get("num_bits", 8)
            symmetric = weights.get("symmetric", True) is True
            if bits != 8 or not symmetric:
                kind = f"{bits}-bit" + ("" if symmetric else " asymmetric")
                raise InvalidInputError(
                    f"config.json: compressed-tensors group {name!r} has {kind} "
                    "weights; only symmetric 8-bit weights can be served"
                )
        return Scheme("compressed-tensors", "_scale")
    raise InvalidInputError(
        f"config.json: quantization {method!r} cannot be served; supported: fp8 "
        "(block scales, weight_scale_inv) and compressed-tensors 8-bit weights. "
        "Import a full-width checkpoint instead"
    )


def _expanded(scale: torch.Tensor, rows: int, cols: int, what: str) -> torch.Tensor:
    """`scale` ([r, c], [r], or a scalar) spread over a rows x cols matrix, each
    entry over its block of ceil(rows / r) x ceil(cols / c) (edge blocks
    smaller)."""
    s = scale.float()
    if s.dim() == 0 or s.numel() == 1:
        return s.reshape(1, 1).expand(rows, cols)
    if s.dim() == 1:
        s = s[:, None]
    if s.dim() != 2:
        raise InvalidInputError(f"{what}: scales of shape {list(scale.shape)}")
    r, c = s.shape
    br, bc = -(-rows // r), -(-cols // c)
    if -(-rows // br) != r or -(-cols // bc) != c:
        raise InvalidInputError(
            f"{what}: scales of shape {list(scale.shape)} do not tile a "
            f"{rows} x {cols} weight"
        )
    return s.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    scheme: Scheme,
    dtype: torch.dtype,
    what: str = "weight",
) -> torch.Tensor:
    """One stored weight and its scales as a `dtype` matrix: `q * scale` in
    float32, rounded once.

    Raises:
        InvalidInputError: scales that do not fit the weight, or NaN/Inf ones.
    """
    if q.dim() != 2:
        raise InvalidInputError(f"{what}: a quantized weight of shape {list(q.shape)}")
    if not bool(torch.isfinite(scale.float()).all()):
        raise InvalidInputError(f"{what}: its scales hold NaN or Inf")
    rows, cols = q.shape
    if scheme.block is not None:
        br, bc = scheme.block
        want = (math.ceil(rows / br), math.ceil(cols / bc))
        if tuple(scale.shape) != want:
            raise InvalidInputError(
                f"{what}: weight_scale_inv of shape {list(scale.shape)}, but a "
                f"{rows} x {cols} weight in {br} x {bc} blocks needs {list(want)}"
            )
        s = scale.float().repeat_interleave(br, 0)[:rows]
        s = s.repeat_interleave(bc, 1)[:, :cols]
    else:
        s = _expanded(scale, rows, cols, what)
    return (q.float() * s).to(dtype)


def dequantize_shard(
    tensors: Mapping[str, torch.Tensor],
    scheme: Scheme,
    dtype: torch.dtype,
    what: str = "shard",
) -> dict[str, torch.Tensor]:
    """A shard's tensors with every quantized weight dequantized to `dtype`
    and the scales (and activation scales) dropped; the rest as they are.

    Raises:
        InvalidInputError: an 8-bit weight without its scales, a non-zero zero
            point, packed weights, or scales that do not fit.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(scheme.scale_suffix) and name[: -len(scheme.scale_suffix)] in (
            tensors
        ):
            continue
        tail = name.rsplit(".", 1)[-1]
        if tail in _DROPPED:
            if tail.endswith("zero_point") and bool((t != 0).any()):
                raise InvalidInputError(
                    f"{what}: {name} is not zero; asymmetric quantization cannot "
                    "be served"
                )
            continue
        if tail in ("weight_packed", "weight_shape"):
            raise InvalidInputError(
                f"{what}: {name}: packed (sub-8-bit) weights cannot be served"
            )
        scale = tensors.get(name + scheme.scale_suffix)
        if scale is not None:
            out[name] = dequantize_weight(t, scale, scheme, dtype, f"{what}: {name}")
        elif t.dtype in EIGHT_BIT:
            raise InvalidInputError(
                f"{what}: {name} is {t.dtype} but has no {name}{scheme.scale_suffix}"
                " beside it"
            )
        else:
            out[name] = t
    return out

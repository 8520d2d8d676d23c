"""Tensors to safetensors bytes and back, without copies where possible."""

from __future__ import annotations

import mmap
from collections.abc import Mapping

import torch
from safetensors.torch import save as _st_save

from param_server.core.safetensors_format import Header, parse_header

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def encode(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialises tensors as safetensors bytes; equal inputs give equal bytes.

    No metadata is written, so the bytes (and hence the digest) depend only
    on the tensor names, dtypes, shapes and values.
    """
    return _st_save({k: v.detach().contiguous() for k, v in tensors.items()})


def decode(
    buf: bytes | bytearray | memoryview | mmap.mmap,
    source: str = "blob",
    header: Header | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors viewing `buf` directly (zero-copy); the caller keeps `buf` alive.

    A read-only `buf` (bytes) is copied once, since torch tensors must be
    writable; pass a bytearray or a writable mapping to avoid that copy.
    """
    mv = memoryview(buf)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    if header is None:
        header = parse_header(mv, len(mv), source)
    out: dict[str, torch.Tensor] = {}
    for t in header.tensors:
        dtype = DTYPES[t.dtype]
        n = t.end - t.begin
        if n == 0:
            out[t.name] = torch.empty(t.shape, dtype=dtype)
            continue
        raw = torch.frombuffer(
            mv, dtype=torch.uint8, count=n, offset=header.data_start + t.begin
        )
        try:
            out[t.name] = raw.view(dtype).view(t.shape)
        except RuntimeError:  # offset not aligned for this dtype: copy once
            out[t.name] = raw.clone().view(dtype).view(t.shape)
    return out

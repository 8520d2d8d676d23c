"""Strict, torch-free parsing of safetensors headers (hostile input welcome)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

from param_server.core.errors import InvalidInputError

# Bytes per element for every dtype the safetensors format defines.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 65536
MAX_TENSOR_NAME = 1024


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor inside a safetensors blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Byte offset of the first element, relative to the start of the data."""
    end: int


@dataclass(frozen=True, slots=True)
class Header:
    """A validated safetensors header."""

    data_start: int
    """Absolute offset of the data section (8 + header length)."""
    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str]

    @property
    def total_size(self) -> int:
        """Size in bytes of the whole file this header describes."""
        return self.data_start + max((t.end for t in self.tensors), default=0)


def _bad(what: str, source: str) -> InvalidInputError:
    return InvalidInputError(
        f"{source}: not a valid safetensors file: {what}; re-export it with "
        "safetensors.torch.save_file"
    )


def parse_header(prefix: bytes | memoryview, total_size: int, source: str) -> Header:
    """Parses and validates the header of a safetensors file.

    Args:
        prefix: the file's first bytes; at least 8 plus the header length.
        total_size: the file's size in bytes; every tensor must lie inside it
            and together the tensors must cover the data section exactly.
        source: what to call the file in error messages.

    Returns:
        The validated header, tensors ordered by offset.

    Raises:
        InvalidInputError: a truncated file, a header that is not JSON, an
            unknown dtype, a shape that does not match the byte range, or
            ranges that overlap, leave gaps or run past the end of the file.
    """
    if total_size < 8 or len(prefix) < 8:
        raise _bad(f"{total_size} bytes is too short for a header", source)
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > MAX_HEADER_BYTES:
        raise _bad(f"header of {n} bytes exceeds the {MAX_HEADER_BYTES} limit", source)
    if 8 + n > total_size:
        raise _bad(f"header claims {n} bytes but the file has {total_size}", source)
    if len(prefix) < 8 + n:
        raise ValueError("prefix shorter than the header; pass more bytes")
    try:
        raw = json.loads(bytes(prefix[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"header is not UTF-8 JSON ({e})", source) from e
    if not isinstance(raw, dict):
        raise _bad("header is not a JSON object", source)
    metadata: dict[str, str] = {}
    meta = raw.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise _bad("__metadata__ must map strings to strings", source)
        metadata = meta
    if len(raw) > MAX_TENSORS:
        raise _bad(f"{len(raw)} tensors exceed the limit of {MAX_TENSORS}", source)
    data_len = total_size - 8 - n
    specs: list[TensorSpec] = []
    for name, info in raw.items():
        if not name or len(name) > MAX_TENSOR_NAME:
            raise _bad(f"tensor name of length {len(name)} is not allowed", source)
        if not isinstance(info, dict):
            raise _bad(f"entry for tensor {name!r} is not an object", source)
        dtype, shape, offsets = (
            info.get("dtype"),
            info.get("shape"),
            info.get("data_offsets"),
        )
        if dtype not in DTYPE_SIZES:
            raise _bad(f"tensor {name!r} has unknown dtype {dtype!r}", source)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _bad(f"tensor {name!r} has invalid shape {shape!r}", source)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise _bad(
                f"tensor {name!r} has data_offsets {offsets!r} outside the "
                f"{data_len}-byte data section",
                source,
            )
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(
                f"tensor {name!r} of dtype {dtype} and shape {shape} needs "
                f"{nbytes} bytes but its offsets span {offsets[1] - offsets[0]}",
                source,
            )
        specs.append(TensorSpec(name, dtype, tuple(shape), offsets[0], offsets[1]))
    specs.sort(key=lambda s: (s.begin, s.end))
    cursor = 0
    for s in specs:
        if s.begin != cursor:
            what = (
                "overlaps the previous tensor" if s.begin < cursor else "leaves a gap"
            )
            raise _bad(f"tensor {s.name!r} at offset {s.begin} {what}", source)
        cursor = s.end
    if cursor != data_len:
        raise _bad(
            f"tensors cover {cursor} bytes but the data section has {data_len} "
            "(truncated or trailing bytes)",
            source,
        )
    return Header(8 + n, tuple(specs), metadata)


def read_header(f: BinaryIO, total_size: int, source: str) -> Header:
    """Reads and validates the header of an open safetensors file."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise _bad("file is shorter than 8 bytes", source)
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > total_size:
        return parse_header(head, total_size, source)  # raises with the reason
    return parse_header(head + f.read(n), total_size, source)

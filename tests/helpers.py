"""Test helpers that need no torch (the crash-test child imports them)."""

from __future__ import annotations

import json
import struct


def raw_safetensors(tensors: dict[str, bytes], dtype: str = "U8") -> bytes:
    """A valid safetensors file of 1-D tensors with the given raw bytes."""
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": [len(data)],
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(tensors.values())


def header_bytes(header: dict[str, object], data: bytes = b"") -> bytes:
    """A safetensors file with an arbitrary (possibly hostile) header."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data

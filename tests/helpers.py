"""Test helpers that need no torch (the crash-test child imports them)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable


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


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `cond` against a deadline; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - t0

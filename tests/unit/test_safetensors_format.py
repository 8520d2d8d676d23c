"""Strict header parsing: hostile and broken safetensors are refused clearly."""

from __future__ import annotations

import contextlib
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.core import tensor_codec
from param_server.core.errors import InvalidInputError
from param_server.core.safetensors_format import parse_header
from tests.helpers import header_bytes, raw_safetensors


def parse(buf: bytes):  # type: ignore[no-untyped-def]
    return parse_header(buf, len(buf), "test")


def test_valid_file_parses() -> None:
    buf = raw_safetensors({"a": b"\x01\x02", "b": b"\x03"})
    h = parse(buf)
    assert [(t.name, t.shape) for t in h.tensors] == [("a", (2,)), ("b", (1,))]
    assert h.total_size == len(buf)


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "needs 8 bytes",
        ),
        (
            {"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}},
            b"\0",
            "unknown dtype",
        ),
        (
            {"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}},
            b"\0",
            "invalid shape",
        ),
        (
            {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}},
            b"\0\0",
            "outside",
        ),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"\0" * 3,
            "overlaps",
        ),
        ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0", "gap"),
        (
            {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
            b"\0\0",
            "trailing",
        ),
        ({"a": [1, 2]}, b"", "not an object"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        (
            {"a": {"dtype": "U8", "shape": [1], "data_offsets": [True, 1]}},
            b"\0",
            "data_offsets",
        ),
    ],
)
def test_hostile_headers_are_refused(header: dict, data: bytes, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        parse(header_bytes(header, data))


def test_header_length_beyond_file() -> None:
    buf = struct.pack("<Q", 1000) + b"{}"
    with pytest.raises(InvalidInputError, match="header claims 1000 bytes"):
        parse(buf)


def test_huge_header_length() -> None:
    with pytest.raises(InvalidInputError, match="exceeds"):
        parse(struct.pack("<Q", 2**63) + b"{}")


def test_not_json_and_too_short() -> None:
    with pytest.raises(InvalidInputError, match="not UTF-8 JSON"):
        parse(struct.pack("<Q", 3) + b"\xff\xfe{")
    with pytest.raises(InvalidInputError, match="too short"):
        parse(b"abc")


@given(st.binary(max_size=256))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash_the_parser(blob: bytes) -> None:
    # Only InvalidInputError may escape: no IndexError, KeyError, TypeError...
    with contextlib.suppress(InvalidInputError):
        parse(blob)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8), st.binary(min_size=0, max_size=16), max_size=5
    )
)
@settings(max_examples=100, deadline=None)
def test_codec_round_trips_what_it_encodes(tensors: dict[str, bytes]) -> None:
    ts = {
        k: torch.frombuffer(bytearray(v), dtype=torch.uint8)
        if v
        else torch.empty(0, dtype=torch.uint8)
        for k, v in tensors.items()
    }
    buf = tensor_codec.encode(ts)
    back = tensor_codec.decode(bytearray(buf))
    assert back.keys() == ts.keys()
    for k in ts:
        assert torch.equal(back[k], ts[k])


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int64,
        torch.bool,
        torch.float8_e4m3fn,
        torch.uint8,
    ],
)
def test_codec_is_bit_exact_for_every_dtype(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 100).to(dtype)
    back = tensor_codec.decode(bytearray(tensor_codec.encode({"t": t})))["t"]
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_encoding_is_deterministic() -> None:
    ts = {"b": torch.ones(3), "a": torch.zeros(2, dtype=torch.bfloat16)}
    assert tensor_codec.encode(ts) == tensor_codec.encode(dict(reversed(ts.items())))

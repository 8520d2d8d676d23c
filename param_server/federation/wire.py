"""Tensors across Flower's transport, bit-exact for every dtype the store holds.

Flower's `Array` built from a tensor goes through NumPy, which has no bfloat16
(and no float8): it refuses them. We carry the raw little-endian bytes instead,
tagged with the safetensors dtype name and our own `stype`, so a bf16 expert
crosses the wire and comes back with the same bits and the same dtype. Arrays
in Flower's own NumPy format (what its strategies and mods produce) are read
too, without a copy of the payload.
"""

from __future__ import annotations

import ast
import sys
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from param_server.core.errors import InvalidInputError
from param_server.core.tensor_codec import DTYPE_NAMES, DTYPES

RAW_STYPE = "moe-param-server.raw-le"
"""`Array.stype` of our encoding: C-order little-endian bytes, dtype named as
in safetensors (`BF16`, `F32`, ...)."""
NUMPY_STYPE = "numpy.ndarray"

_NUMPY_DTYPES: dict[str, str] = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "bool": "BOOL",
}

if sys.byteorder != "little":  # pragma: no cover - every supported host is LE
    raise ImportError("the wire format assumes a little-endian host")


def to_array(t: torch.Tensor) -> Array:
    """An Array holding `t`'s bytes unchanged (any dtype, bf16 included)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    try:
        dtype = DTYPE_NAMES[t.dtype]
    except KeyError:
        raise InvalidInputError(f"dtype {t.dtype} cannot be sent") from None
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return Array(dtype=dtype, shape=tuple(t.shape), stype=RAW_STYPE, data=data)


_NUMPY_SAFE = frozenset(_NUMPY_DTYPES.values())


def to_numpy_array(t: torch.Tensor) -> tuple[Array, str]:
    """`t` as a Flower NumPy Array (what its strategies and mods read), and the
    dtype it travels in: NumPy has no bf16 or fp8, so those are widened to
    float32, exactly; everything else keeps its dtype."""
    t = t.detach().cpu().contiguous()
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise InvalidInputError(f"dtype {t.dtype} cannot be sent")
    if name not in _NUMPY_SAFE:
        t, name = t.float(), "F32"
    return Array(t.numpy()), name


def encode(t: torch.Tensor, dense: bool) -> tuple[Array, str]:
    """`t` for the wire: raw and bit-exact (sparse mode), or NumPy (dense mode,
    see `to_numpy_array`). Returns the Array and the dtype it carries."""
    if dense:
        return to_numpy_array(t)
    arr = to_array(t)
    return arr, arr.dtype


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of raw-encoded tensors, in the order given."""
    rec = ArrayRecord()
    for k, t in tensors.items():
        rec[k] = to_array(t)
    return rec


def dtype_name(a: Array) -> str:
    """The safetensors dtype name of an Array in either encoding."""
    if a.stype == RAW_STYPE:
        return a.dtype
    if a.stype == NUMPY_STYPE:
        name = _NUMPY_DTYPES.get(a.dtype)
        if name is None:
            raise InvalidInputError(f"unsupported NumPy dtype {a.dtype!r}")
        return name
    raise InvalidInputError(
        f"unknown array encoding {a.stype!r}; expected {RAW_STYPE!r} or {NUMPY_STYPE!r}"
    )


def _npy_payload(data: bytes) -> tuple[memoryview, str, tuple[int, ...]]:
    """(payload view, dtype descr, shape) of an .npy buffer, without copying."""
    mv = memoryview(data)
    if bytes(mv[:6]) != b"\x93NUMPY" or len(mv) < 10:
        raise InvalidInputError("array data is not in .npy format")
    major = mv[6]
    if major == 1:
        hlen = int.from_bytes(mv[8:10], "little")
        start = 10
    elif major in (2, 3):
        hlen = int.from_bytes(mv[8:12], "little")
        start = 12
    else:
        raise InvalidInputError(f"unsupported .npy version {major}")
    try:
        header = ast.literal_eval(bytes(mv[start : start + hlen]).decode("latin1"))
    except (ValueError, SyntaxError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"malformed .npy header: {e}") from e
    if not isinstance(header, dict) or header.get("fortran_order"):
        raise InvalidInputError("only C-order .npy arrays are accepted")
    descr = np.dtype(header["descr"])
    if descr.byteorder == ">":
        raise InvalidInputError("big-endian arrays are not accepted")
    return mv[start + hlen :], descr.name, tuple(header["shape"])


def from_array(a: Array, what: str = "array") -> torch.Tensor:
    """A tensor viewing `a`'s bytes (no copy); treat it as read-only.

    Raises:
        InvalidInputError: unknown encoding or dtype, or a payload whose size
            does not match the declared shape.
    """
    name = dtype_name(a)
    dtype = DTYPES.get(name)
    if dtype is None:
        raise InvalidInputError(f"{what}: unknown dtype {name!r}")
    if a.stype == NUMPY_STYPE:
        payload, _, shape = _npy_payload(a.data)
    else:
        payload, shape = memoryview(a.data), tuple(a.shape)
    numel = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise InvalidInputError(f"{what}: invalid shape {shape}")
        numel *= d
    expected = numel * dtype.itemsize
    if len(payload) != expected:
        raise InvalidInputError(
            f"{what}: {len(payload)} bytes for shape {list(shape)} of {name} "
            f"(expected {expected}); the update is truncated or corrupt"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # Read-only payload: the tensor is only ever read (aggregation copies).
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(payload, dtype=torch.uint8)
    return t.view(dtype).view(shape)


def from_record(rec: ArrayRecord, what: str = "record") -> dict[str, torch.Tensor]:
    """Every tensor of an ArrayRecord, viewing its bytes."""
    return {k: from_array(a, f"{what}[{k!r}]") for k, a in rec.items()}

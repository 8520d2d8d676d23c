"""The widths a node may ask experts in (no torch here: the daemon and the
store import it, and stay light)."""

from __future__ import annotations

from param_server.core.errors import InvalidInputError

FULL = "full"
INT8 = "int8"
FP8 = "fp8"
WIDTHS = (FULL, INT8, FP8)
"""The stored width, or one of the 8-bit variants (see `core.quant`)."""


def check_width(width: str) -> str:
    if width not in WIDTHS:
        raise InvalidInputError(
            f"unknown width {width!r}; choose one of {', '.join(WIDTHS)}"
        )
    return width

"""Validation of model names, shard keys and file names (no path tricks)."""

from __future__ import annotations

import re

from param_server.core.errors import InvalidInputError

_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,255}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")

MAX_NAME_LEN = 256


def _check(kind: str, value: object, pattern: re.Pattern[str], hint: str) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"{kind} must be a string, got {type(value).__name__}")
    if not pattern.fullmatch(value) or ".." in value:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InvalidInputError(f"invalid {kind} {shown!r}: {hint}")
    return value


def check_model_name(name: object) -> str:
    """Returns `name` if it is a valid model name, else raises InvalidInputError."""
    return _check(
        "model name",
        name,
        _MODEL_RE,
        "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
        "digit, without '..' or path separators (e.g. 'mixtral-8x7b')",
    )


def check_shard_key(key: object) -> str:
    """Returns `key` if it is a valid shard key, else raises InvalidInputError."""
    return _check(
        "shard key",
        key,
        _KEY_RE,
        "use letters, digits, '.', '_' or '-' without '..' or path separators "
        "(e.g. 'layers.3.experts.7')",
    )


def check_file_name(name: object) -> str:
    """Returns `name` if it is a valid model file name (e.g. 'config.json')."""
    return _check(
        "file name",
        name,
        _KEY_RE,
        "a plain file name such as 'config.json', without directories or '..'",
    )


def check_digest(digest: object) -> str:
    """Returns `digest` if it is a lowercase hex SHA-256."""
    return _check("digest", digest, _DIGEST_RE, "expected 64 lowercase hex digits")

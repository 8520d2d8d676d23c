"""Bearer tokens with roles, as the daemon checks them.

Tokens are random strings handed out once (`param-server token create`); the
daemon keeps only their SHA-256, compares digests in constant time and never
logs a token. Each token has a role (`reader` < `writer` < `admin`, each
allowing what the ones before it do) and optionally a list of models it is
limited to.

A tokens file is TOML (or JSON with the same shape):

    [[token]]
    name = "fleet"                 # shown in logs and errors, never the token
    role = "reader"                # reader | writer | admin
    sha256 = "9f86d08...0f00a08"   # hex SHA-256 of the token
    models = ["mixtral-8x7b"]      # optional: only these models
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from param_server.core.auth import AUTH_HEADER, TOKEN_PREFIX, Role, is_loopback_host
from param_server.core.errors import (
    AuthenticationError,
    InvalidInputError,
    PermissionDeniedError,
)
from param_server.core.names import check_model_name

logger = logging.getLogger(__name__)

_HEX64 = re.compile(r"[0-9a-f]{64}")
ANY_MODEL = "*"
"""For calls about no model in particular (listing, store info): any token of
the role will do, whatever models it is limited to. Not a valid model name."""
# Longest Authorization value we look at; longer ones are refused unhashed.
_MAX_TOKEN_CHARS = 512


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token belongs to and what it may do."""

    name: str
    role: Role
    models: frozenset[str] | None = None
    """The models it is limited to; None means every model."""

    def allows(self, role: Role, model: str | None = None) -> bool:
        """May it act as `role` on `model` (None: the whole store, which needs
        an unlimited token; ANY_MODEL: no model in particular)?"""
        if self.role < role:
            return False
        if model == ANY_MODEL or self.models is None:
            return True
        return model is not None and model in self.models

    def visible(self, model: str) -> bool:
        return self.models is None or model in self.models


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 the daemon keeps instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenTable:
    """The tokens a daemon accepts, kept as digests."""

    def __init__(
        self,
        entries: Iterable[Mapping[str, Any]],
        source: str,
        path: Path | None = None,
    ) -> None:
        self.path = path
        """The file it was read from (what `reload` reads again)."""
        self._entries: list[_Entry] = []
        names: set[str] = set()
        for i, raw in enumerate(entries):
            where = f"{source}: token #{i + 1}"
            if not isinstance(raw, Mapping):
                raise InvalidInputError(f"{where} is not a table")
            unknown = set(raw) - {"name", "role", "sha256", "models"}
            if unknown:
                if "token" in unknown:
                    raise InvalidInputError(
                        f"{where} holds a plain token; store only its hash "
                        "(sha256 = param-server token hash TOKEN)"
                    )
                raise InvalidInputError(f"{where} has unknown keys {sorted(unknown)}")
            name = raw.get("name")
            if not isinstance(name, str) or not name or name in names:
                raise InvalidInputError(f"{where} needs a unique, non-empty name")
            names.add(name)
            digest = str(raw.get("sha256", "")).lower()
            if not _HEX64.fullmatch(digest):
                raise InvalidInputError(
                    f"{where} ({name}): sha256 must be 64 hex digits"
                )
            models = raw.get("models")
            if models is not None:
                if not isinstance(models, list) or not models:
                    raise InvalidInputError(
                        f"{where} ({name}): models must be a non-empty list"
                    )
                models = frozenset(check_model_name(m) for m in models)
            self._entries.append(
                _Entry(
                    bytes.fromhex(digest),
                    Principal(name, Role.parse(raw.get("role")), models),
                )
            )
        if not self._entries:
            raise InvalidInputError(f"{source} defines no tokens")

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return [e.principal.name for e in self._entries]

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Reads a TOML (or JSON) tokens file.

        Raises:
            InvalidInputError: unreadable or malformed, or it holds plain tokens.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise InvalidInputError(f"cannot read tokens file {path}: {e}") from e
        try:
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise InvalidInputError(f"tokens file {path} does not parse: {e}") from e
        return cls(_token_list(data, str(path)), str(path), path)

    def reload(self) -> None:
        """Reads the file again and swaps the new tokens in at once (revoked
        ones stop working on the next call).

        Raises:
            InvalidInputError: no file, or the new file is bad; the tokens in
                use are kept.
        """
        if self.path is None:
            raise InvalidInputError("these tokens came from no file; cannot reload")
        self._entries = TokenTable.load(self.path)._entries

    @classmethod
    def from_env(cls, var: str = "PARAM_SERVER_TOKENS") -> TokenTable | None:
        """Tokens from an environment variable holding the file's JSON form
        (a list of entries, or {"token": [...]}); None when unset."""
        value = os.environ.get(var)
        if not value:
            return None
        try:
            data = json.loads(value)
        except ValueError as e:
            raise InvalidInputError(f"${var} is not JSON: {e}") from e
        return cls(_token_list(data, f"${var}"), f"${var}")

    def authenticate(self, token: str) -> Principal | None:
        """The principal of `token`, or None. Every entry is compared, so the
        time taken does not depend on which one (if any) matches."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for e in self._entries:
            if hmac.compare_digest(digest, e.digest):
                found = e.principal
        return found


def _token_list(data: object, source: str) -> list[Any]:
    if isinstance(data, dict):
        data = data.get("token", [])
    if not isinstance(data, list):
        raise InvalidInputError(f"{source}: expected a list of [[token]] entries")
    return data


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of an `authorization: Bearer ...` header.

    Raises:
        AuthenticationError: no header, or not a bearer token.
    """
    values = [v for k, v in metadata or () if k == AUTH_HEADER]
    if not values:
        raise AuthenticationError(
            "this server needs a token: pass one with --token or "
            "$PARAM_SERVER_TOKEN (ParamClient(credentials=...))"
        )
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token:
        raise AuthenticationError("malformed authorization header; expected Bearer")
    if len(token) > _MAX_TOKEN_CHARS:
        raise AuthenticationError("token is not valid")
    return token.strip()


class Authorizer:
    """Checks each call's token against a TokenTable and the role it needs."""

    def __init__(self, tokens: TokenTable, *, plaintext: bool) -> None:
        self.tokens = tokens
        self.plaintext = plaintext

    def principal(self, metadata: Any, peer: str) -> Principal:
        """Who is calling.

        Raises:
            AuthenticationError: no token, an unknown one, or a token sent in
                plaintext from off this host.
        """
        if self.plaintext and not is_local_peer(peer):
            raise AuthenticationError(
                "tokens are accepted over plaintext only from this host; "
                "the server must run with TLS (--tls-cert/--tls-key)"
            )
        p = self.tokens.authenticate(bearer_token(metadata))
        if p is None:
            logger.warning("refused an unknown token from %s", peer)
            raise AuthenticationError(
                "token is not valid (unknown or revoked); ask the operator for "
                "a new one (param-server token create)"
            )
        return p

    def check(
        self, metadata: Any, peer: str, role: Role, model: str | None
    ) -> Principal:
        """The caller, if it may act as `role` on `model` (None: store-wide).

        Raises:
            AuthenticationError: see `principal`.
            PermissionDeniedError: the token's role or models do not allow it.
        """
        p = self.principal(metadata, peer)
        if not p.allows(role, model):
            what = (
                "this server"
                if model == ANY_MODEL
                else (f"model {model!r}" if model else "the whole store")
            )
            need = role.name.lower()
            logger.warning("denied %s (%s) %s on %s", p.name, p.role.name, need, what)
            raise PermissionDeniedError(
                f"token {p.name!r} ({p.role.name.lower()}"
                + (f", limited to {sorted(p.models)}" if p.models else "")
                + f") may not do this on {what}: it needs the {need} role"
                + (" without a model limit" if model is None and p.models else "")
            )
        return p


def is_local_peer(peer: str) -> bool:
    """True when a gRPC peer string ("ipv4:127.0.0.1:5", "unix:...") is local."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind in ("ipv4", "ipv6"):
        host = rest.rsplit(":", 1)[0]
        return is_loopback_host(host.replace("%5B", "[").replace("%5D", "]"))
    return False

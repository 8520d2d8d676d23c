"""Who a client is and how it reaches the daemon: roles, the header a token
travels in, and the client's credentials (token and TLS material)."""

from __future__ import annotations

import enum
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from param_server.core.errors import InvalidInputError

TOKEN_PREFIX = "pst_"
AUTH_HEADER = "authorization"


class Role(enum.IntEnum):
    """What a token may do; each role includes the ones below it."""

    READER = 1
    """Manifests, versions and fetches (inference nodes)."""
    WRITER = 2
    """Commits (the federation server side, trainers)."""
    ADMIN = 3
    """Rollback, pins, garbage collection."""

    @classmethod
    def parse(cls, value: object) -> Role:
        try:
            return cls[str(value).upper()]
        except KeyError:
            raise InvalidInputError(
                f"unknown role {value!r}; use one of reader, writer, admin"
            ) from None


def is_loopback_host(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_pem(path: str | Path | None, what: str) -> bytes | None:
    """The bytes of a PEM file, or None for no path.

    Raises:
        InvalidInputError: unreadable, or not PEM.
    """
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInputError(f"cannot read {what} {path}: {e}") from e
    if b"-----BEGIN " not in data:
        raise InvalidInputError(f"{what} {path} is not a PEM file")
    return data


@dataclass(frozen=True, slots=True)
class Credentials:
    """How a client proves itself and checks the server.

    With `tls` on, the server's certificate is checked against `ca` (the
    system's roots when None); `cert` and `key` are this client's certificate
    for mutual TLS.
    """

    token: str | None = None
    tls: bool = False
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInputError("a client certificate needs its key, and back")
        if (self.ca or self.cert) and not self.tls:
            raise InvalidInputError("CA and client certificates need tls=True")

    def __repr__(self) -> str:  # never show the token or the key
        return (
            f"Credentials(token={'***' if self.token else None}, tls={self.tls}, "
            f"ca={self.ca is not None}, cert={self.cert is not None})"
        )

    @classmethod
    def from_files(
        cls,
        *,
        token: str | None = None,
        tls: bool = False,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
    ) -> Credentials:
        return cls(
            token=token or None,
            tls=tls or bool(ca or cert),
            ca=read_pem(ca, "CA certificate"),
            cert=read_pem(cert, "client certificate"),
            key=read_pem(key, "client key"),
        )

    @classmethod
    def from_env(cls) -> Credentials:
        """From $PARAM_SERVER_TOKEN, $PARAM_SERVER_CA, $PARAM_SERVER_CLIENT_CERT
        and $PARAM_SERVER_CLIENT_KEY (TLS is on when any file is given)."""
        env = os.environ
        return cls.from_files(
            token=env.get("PARAM_SERVER_TOKEN"),
            ca=env.get("PARAM_SERVER_CA") or None,
            cert=env.get("PARAM_SERVER_CLIENT_CERT") or None,
            key=env.get("PARAM_SERVER_CLIENT_KEY") or None,
        )

"""The daemon's settings (light to import: the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from param_server.core.auth import is_loopback_host

if TYPE_CHECKING:
    from param_server.server.security import TokenTable


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Settings of the param-server daemon."""

    store: Path
    """Directory of the parameter store (created when missing)."""
    listen: str = "127.0.0.1:50051"
    """host:port to listen on; port 0 picks a free one."""
    max_workers: int = 32
    """Threads serving RPCs; each stream holds one while it runs."""
    max_streams: int = 24
    """Fetch and commit streams served at once (fewer than `max_workers`, so
    short calls always find a thread); more are refused as busy and clients
    retry with backoff, so memory stays bounded however many nodes connect."""
    idle_timeout: float = 60.0
    """A stream that moves no message for this many seconds (a stalled or
    vanished client) is cancelled and its thread and buffers released."""
    max_commit_bytes: int = 256 * 1024**3
    """Largest total size of the blobs one commit may upload."""
    max_commit_blobs: int = 100_000
    """Most blobs (shards and files) one commit may upload."""
    grace_seconds: float = 10.0
    """How long SIGTERM waits for running RPCs before cancelling them."""
    announce: bool = True
    """Publish every new version on Redis pub/sub (see param_server.server.announce)."""
    redis_url: str | None = None
    """Redis to announce on; None starts a private redis-server on a free
    loopback port (when `announce` is on)."""
    tokens: TokenTable | None = None
    """Accepted bearer tokens and their roles; None serves without auth
    (allowed on loopback, or elsewhere with `allow_unauthenticated`)."""
    tls_cert: Path | None = None
    """PEM certificate (chain) the server presents; with `tls_key` turns TLS on."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: Path | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed
    (mutual TLS)."""
    allow_unauthenticated: bool = False
    """Serve a non-loopback address without tokens (anyone who can reach it
    may read, commit and roll back)."""
    read_only: bool = False
    """Serve reads only: commits, rollbacks, pins and gc are refused
    (FAILED_PRECONDITION). A store on a read-only file system is served this
    way without asking."""

    def __post_init__(self) -> None:
        if self.max_workers < 2:
            raise ValueError(f"max_workers must be >= 2, got {self.max_workers}")
        if not 1 <= self.max_streams < self.max_workers:
            raise ValueError(
                f"max_streams must be between 1 and max_workers - 1 "
                f"({self.max_workers - 1}), got {self.max_streams}"
            )
        if self.idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0, got {self.idle_timeout}")
        if self.max_commit_bytes < 1 or self.max_commit_blobs < 1:
            raise ValueError("max_commit_bytes and max_commit_blobs must be >= 1")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"listen address {self.listen!r} is not host:port "
                "(e.g. 127.0.0.1:50051)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "a client CA (mutual TLS) needs the server's own certificate and key"
            )
        if not self.local_only:
            if self.tokens is None and not self.allow_unauthenticated:
                raise ValueError(
                    f"listening on {self.listen} without tokens lets anyone who "
                    "can reach it commit and roll back; give a tokens file "
                    "(--tokens-file), listen on 127.0.0.1, or pass "
                    "--allow-unauthenticated if that is really what you want"
                )
            if self.tokens is not None and self.tls_cert is None:
                raise ValueError(
                    f"listening on {self.listen} without TLS would send tokens "
                    "in plaintext; give --tls-cert and --tls-key (or listen on "
                    "127.0.0.1)"
                )

    @property
    def local_only(self) -> bool:
        """True when only this machine can reach the listening address."""
        return is_loopback_host(self.listen.rpartition(":")[0])


def default(name: str) -> Any:
    """The default of ServerConfig's field `name`."""
    return next(f.default for f in fields(ServerConfig) if f.name == name)

"""Exceptions of the parameter server; each maps to one gRPC status code."""

from __future__ import annotations


class ParamServerError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidInputError(ParamServerError, ValueError):
    """A name, key, file or request is malformed (INVALID_ARGUMENT)."""


class NotFoundError(ParamServerError, LookupError):
    """An unknown model, version, shard or file (NOT_FOUND)."""


class StaleParentError(ParamServerError):
    """A commit named a parent that is no longer HEAD (ABORTED)."""

    @classmethod
    def for_versions(cls, model: str, parent: int, head: int) -> StaleParentError:
        return cls(
            f"model {model!r}: commit is based on version {parent} but HEAD is "
            f"version {head}; fetch version {head}, reapply your change and "
            "commit again"
        )


class SchemaMismatchError(InvalidInputError):
    """A commit changes tensor names, shapes or dtypes without allowing it."""


class IntegrityError(ParamServerError):
    """Stored bytes no longer match their digest (DATA_LOSS)."""


class StoreIOError(ParamServerError):
    """The store could not be written: unwritable, full, or similar."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class ReadOnlyStoreError(StoreIOError):
    """The store is served read-only; commits, rollbacks, pins and gc are
    refused (FAILED_PRECONDITION)."""


class StoreInUseError(ParamServerError):
    """Another daemon is already serving this store."""


class ListenError(ParamServerError, OSError):
    """The daemon cannot listen on the address it was given (in use, or not
    an address of this machine)."""


class UnavailableError(ParamServerError, ConnectionError):
    """The server could not be reached, even after retries (UNAVAILABLE)."""


class RedisMissingError(ParamServerError):
    """`redis-server` is not installed (or not on PATH)."""


class RedisStartError(UnavailableError):
    """`redis-server` is installed but did not come up; says what it reported."""


class AuthenticationError(ParamServerError):
    """No token, an unknown one, or one sent where it could leak (UNAUTHENTICATED)."""


class PermissionDeniedError(ParamServerError):
    """The token's role or models do not allow the call (PERMISSION_DENIED)."""


class BusyError(UnavailableError):
    """The server is at its limit of concurrent streams; retry later."""

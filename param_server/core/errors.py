"""Exceptions of the parameter server, and the one table that maps each to
its gRPC status, its CLI exit code and whether a client retries it."""

from __future__ import annotations

import enum
import errno as _errno
from dataclasses import dataclass


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


class ExitCode(enum.IntEnum):
    """Exit statuses of the command line; each failure kind has its own."""

    OK = 0
    ERROR = 1
    USAGE = 2  # click's own
    NOT_FOUND = 3
    INVALID_INPUT = 4
    STALE_PARENT = 5
    INTEGRITY = 6
    STORE_IO = 7
    UNAVAILABLE = 8
    REDIS_FAILED = 9
    ADDRESS_IN_USE = 10
    REDIS_MISSING = 11
    UNAUTHENTICATED = 12
    PERMISSION_DENIED = 13
    STORE_IN_USE = 14


@dataclass(frozen=True, slots=True)
class ErrorKind:
    """One row of ERRORS."""

    error: type[ParamServerError]
    status: str
    """The gRPC status code's name it travels with (errors that never leave
    the daemon say INTERNAL)."""
    exit_code: ExitCode
    retryable: bool = False
    """A client retries it with backoff (the server refused before any work,
    or could not be reached)."""


# Most specific first: an error's kind is the first row it is an instance of.
# The daemon sends the kind's name in trailing metadata (ERROR_KIND_KEY), so
# a client raises the same class; without it (another server, the transport
# itself) a client takes the last row with the status.
ERRORS: tuple[ErrorKind, ...] = (
    ErrorKind(ReadOnlyStoreError, "FAILED_PRECONDITION", ExitCode.STORE_IO),
    ErrorKind(StoreIOError, "RESOURCE_EXHAUSTED", ExitCode.STORE_IO),
    ErrorKind(StaleParentError, "ABORTED", ExitCode.STALE_PARENT),
    ErrorKind(NotFoundError, "NOT_FOUND", ExitCode.NOT_FOUND),
    ErrorKind(SchemaMismatchError, "INVALID_ARGUMENT", ExitCode.INVALID_INPUT),
    ErrorKind(InvalidInputError, "INVALID_ARGUMENT", ExitCode.INVALID_INPUT),
    ErrorKind(IntegrityError, "DATA_LOSS", ExitCode.INTEGRITY),
    ErrorKind(AuthenticationError, "UNAUTHENTICATED", ExitCode.UNAUTHENTICATED),
    ErrorKind(PermissionDeniedError, "PERMISSION_DENIED", ExitCode.PERMISSION_DENIED),
    ErrorKind(BusyError, "UNAVAILABLE", ExitCode.UNAVAILABLE, retryable=True),
    ErrorKind(RedisStartError, "INTERNAL", ExitCode.REDIS_FAILED),
    ErrorKind(UnavailableError, "UNAVAILABLE", ExitCode.UNAVAILABLE, retryable=True),
    ErrorKind(ListenError, "INTERNAL", ExitCode.ADDRESS_IN_USE),
    ErrorKind(RedisMissingError, "INTERNAL", ExitCode.REDIS_MISSING),
    ErrorKind(StoreInUseError, "INTERNAL", ExitCode.STORE_IN_USE),
    ErrorKind(ParamServerError, "INTERNAL", ExitCode.ERROR),
)
ERROR_KIND_KEY = "paramserver-error"
"""Trailing-metadata key of the error class's name on a failed call."""
_FULL = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG}
_BY_NAME = {k.error.__name__: k for k in ERRORS}
_BY_STATUS = {k.status: k for k in ERRORS}  # the last row of each status wins


def kind_of(e: ParamServerError) -> ErrorKind:
    """The row of ERRORS for `e`."""
    return next(k for k in ERRORS if isinstance(e, k.error))


def status_name(e: ParamServerError) -> str:
    """The gRPC status code (by name) `e` is sent with."""
    kind = kind_of(e)
    full = isinstance(e, StoreIOError) and e.errno in _FULL
    if kind.error is StoreIOError and not full:
        return "INTERNAL"  # not the client's doing: unwritable, I/O error
    return kind.status


def kind_for(status: str, name: str | None) -> ErrorKind:
    """The kind a client raises for a failed call: by the class name the
    daemon sent, else by status (UNAVAILABLE from the transport, say)."""
    if name is not None and name in _BY_NAME:
        return _BY_NAME[name]
    if status == "CANCELLED":
        # Our clients never cancel their own calls: the server (shutting
        # down) or a proxy between did, so it is an outage, retried.
        return _BY_NAME[UnavailableError.__name__]
    return _BY_STATUS.get(status, ERRORS[-1])

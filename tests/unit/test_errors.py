"""One table maps every error to its gRPC status, exit code and retryability."""

from __future__ import annotations

import errno
import inspect

import grpc
import pytest

from param_server.core import errors
from param_server.core.errors import (
    ERRORS,
    BusyError,
    ExitCode,
    ParamServerError,
    SchemaMismatchError,
    StoreIOError,
    kind_for,
    kind_of,
    status_name,
)
from param_server.server.service import status_for


def _error_classes() -> list[type[ParamServerError]]:
    return [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, ParamServerError) and c.__module__ == errors.__name__
    ]


def test_every_error_has_its_own_row_and_no_row_is_shadowed() -> None:
    rows = [k.error for k in ERRORS]
    assert sorted(c.__name__ for c in rows) == sorted(
        c.__name__ for c in _error_classes()
    )
    for i, kind in enumerate(ERRORS):  # a subclass never comes after its base
        assert not any(issubclass(kind.error, k.error) for k in ERRORS[:i]), kind
    assert ERRORS[-1].error is ParamServerError


@pytest.mark.parametrize("cls", _error_classes())
def test_a_client_raises_the_class_the_daemon_raised(
    cls: type[ParamServerError],
) -> None:
    e = cls("x", errno.ENOSPC) if issubclass(cls, StoreIOError) else cls("x")
    status = status_name(e)
    assert grpc.StatusCode[status] == status_for(e)
    assert kind_for(status, cls.__name__).error is cls
    assert isinstance(kind_of(e).exit_code, ExitCode)


def test_without_the_name_the_status_decides() -> None:
    # e.g. UNAVAILABLE from the transport itself, or an older daemon.
    assert kind_for("UNAVAILABLE", None).error.__name__ == "UnavailableError"
    assert kind_for("UNAVAILABLE", None).retryable
    # A call the server cancelled (it was shutting down) is an outage too.
    assert kind_for("CANCELLED", None).error.__name__ == "UnavailableError"
    assert kind_for("CANCELLED", None).retryable
    assert kind_for("INVALID_ARGUMENT", None).error.__name__ == "InvalidInputError"
    assert kind_for("INVALID_ARGUMENT", "NotAnError").error.__name__ == (
        "InvalidInputError"
    )
    assert kind_for("UNKNOWN", None).error is ParamServerError
    assert kind_for("UNAVAILABLE", "BusyError").error is BusyError


def test_store_errors_are_resource_exhausted_only_when_full() -> None:
    assert status_name(StoreIOError("full", errno.ENOSPC)) == "RESOURCE_EXHAUSTED"
    assert status_name(StoreIOError("no", errno.EACCES)) == "INTERNAL"
    assert kind_of(SchemaMismatchError("x")).exit_code == ExitCode.INVALID_INPUT

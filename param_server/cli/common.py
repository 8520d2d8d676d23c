"""What every command group shares: error handling, logging, common
options, sizes, safe printing, and the store-or-daemon choice of the
admin commands."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from param_server.core.errors import ParamServerError, kind_of
from param_server.server.config import default

if TYPE_CHECKING:
    from param_server.core.admin import VersionAdmin
    from param_server.core.auth import Credentials

DEFAULT_STORE = "./param-store"
DEFAULT_LISTEN = default("listen")

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Prints our errors as one clear line and exits with their status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ParamServerError as e:
            code = kind_of(e).exit_code
            click.echo(f"error: {e}", err=True)
            sys.exit(code)

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STORE,
    show_default=True,
    envvar="PARAM_SERVER_STORE",
    help="Store directory.",
)


def engine_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--engine",
        type=click.Choice(["simulation", "deployment"]),
        default=default,
        show_default=True,
        help="Flower engine: simulation (in this process) or deployment (a "
        "SuperLink and one SuperNode per institution on loopback).",
    )


server_option = click.option(
    "--server",
    default=None,
    metavar="HOST:PORT",
    help="Act through a running daemon instead of opening --store directly.",
)


def pem_option(name: str, help: str, envvar: str | None = None) -> Callable[[F], F]:
    """An option naming an existing PEM file (certificate or key)."""
    return click.option(
        name,
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        envvar=envvar,
        show_envvar=envvar is not None,
        help=help,
    )


def client_options(fn: F) -> F:
    """--token and TLS options for commands that talk to a daemon; the
    command receives them as one `credentials` argument."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        token: str | None,
        ca_cert: Path | None,
        client_cert: Path | None,
        client_key: Path | None,
        **kwargs: Any,
    ) -> Any:
        from param_server.core.auth import Credentials

        kwargs["credentials"] = Credentials.from_files(
            token=token, ca=ca_cert, cert=client_cert, key=client_key
        )
        return fn(*args, **kwargs)

    for decorator in reversed(
        [
            click.option(
                "--token",
                default=None,
                envvar="PARAM_SERVER_TOKEN",
                show_envvar=True,
                help="Bearer token for a daemon that requires one.",
            ),
            pem_option(
                "--ca-cert",
                "Connect with TLS, trusting this CA (PEM) for the server's "
                "certificate (grpcs://HOST:PORT uses the system's CAs).",
                envvar="PARAM_SERVER_CA",
            ),
            pem_option(
                "--client-cert",
                "This client's certificate (PEM) for mutual TLS.",
                envvar="PARAM_SERVER_CLIENT_CERT",
            ),
            pem_option(
                "--client-key",
                "The key (PEM) of --client-cert.",
                envvar="PARAM_SERVER_CLIENT_KEY",
            ),
        ]
    ):
        wrapper = decorator(wrapper)
    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def open_admin(
    store: Path, server: str | None, credentials: Credentials
) -> Iterator[VersionAdmin]:
    """The daemon at `server` when given, else the store at `store` (which
    must exist): both answer the same admin calls."""
    if server:
        from param_server.client import ParamClient

        with ParamClient.from_url(server, credentials, streams=1) as client:
            yield client
    else:
        from param_server.store import Store

        s = Store(store, create=False)
        try:
            yield s
        finally:
            s.close()


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([KMGT]I?B|B)?", re.IGNORECASE)
MIN_SHARD_BYTES = 10**6
MAX_SHARD_BYTES = 2**50


def parse_size(text: str) -> int:
    """Bytes of a shard size from '500MB', '2GiB', '1.5TB' or a byte count.

    Raises:
        click.BadParameter: not a size, or not from 1 MB to 1 PiB.
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise click.BadParameter(
            f"cannot read {text!r} as a size; give a number and a unit: B, KB, "
            "MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), "
            "e.g. 500MB or 2GiB"
        )
    value = float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()]
    if not MIN_SHARD_BYTES <= value <= MAX_SHARD_BYTES:
        raise click.BadParameter(
            f"{text!r} is {value:.4g} bytes; give a size from 1MB to 1024TiB"
        )
    return int(value)


def printable(text: str) -> str:
    """`text` with control and format characters escaped, so stored strings
    (commit messages, authors, node names) cannot move the cursor, recolour
    or reorder a terminal; what is stored stays as it was."""
    return "".join(
        ch
        if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )

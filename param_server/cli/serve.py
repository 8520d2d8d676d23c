"""`param-server serve`: the daemon."""

from __future__ import annotations

import os
from pathlib import Path

import click

from param_server.cli.common import (
    DEFAULT_LISTEN,
    handle_errors,
    pem_option,
    store_option,
)
from param_server.cli.main import main
from param_server.server.config import ServerConfig, default


@main.command()
@store_option
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="Address to listen on (host:port; port 0 picks a free one).",
)
@click.option(
    "--max-workers",
    default=default("max_workers"),
    show_default=True,
    help="Threads serving RPCs.",
)
@click.option(
    "--grace",
    default=default("grace_seconds"),
    show_default=True,
    help="Seconds SIGTERM waits for running RPCs.",
)
@click.option(
    "--port-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bound port here once serving.",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    metavar="URL",
    envvar="PARAM_SERVER_REDIS",
    help="Announce versions on this Redis (redis://[user:password@]host:port/db, "
    "rediss:// for TLS). Default: start a private redis-server on a free "
    "loopback port.",
)
@click.option(
    "--announce/--no-announce",
    default=True,
    show_default=True,
    help="Publish every new version on Redis pub/sub.",
)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    envvar="PARAM_SERVER_TOKENS_FILE",
    show_envvar=True,
    help="Require bearer tokens: a TOML file of token hashes with roles "
    "(see `param-server token create`). Without it, $PARAM_SERVER_TOKENS may "
    "hold the same entries as JSON.",
)
@pem_option(
    "--tls-cert",
    "Serve TLS with this certificate (PEM).",
)
@pem_option(
    "--tls-key",
    "The private key (PEM) of --tls-cert.",
)
@pem_option(
    "--tls-client-ca",
    "Mutual TLS: accept only clients with a certificate from this CA (PEM).",
)
@click.option(
    "--allow-unauthenticated",
    is_flag=True,
    help="Serve a non-loopback address without tokens (anyone who reaches it "
    "may commit and roll back).",
)
@click.option(
    "--read-only",
    is_flag=True,
    help="Serve reads only (refuse commits, rollbacks, pins and gc); a store "
    "on a read-only file system is served this way without it.",
)
@click.option(
    "--max-streams",
    default=default("max_streams"),
    show_default=True,
    help="Fetch and commit streams served at once; more are refused as busy "
    "and clients retry.",
)
@click.option(
    "--idle-timeout",
    default=default("idle_timeout"),
    show_default=True,
    help="Cancel a stream that moves nothing for this many seconds.",
)
@handle_errors
def serve(
    store: Path,
    listen: str,
    max_workers: int,
    grace: float,
    port_file: Path | None,
    redis_url: str | None,
    announce: bool,
    tokens_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    allow_unauthenticated: bool,
    read_only: bool,
    max_streams: int,
    idle_timeout: float,
) -> None:
    """Run the daemon until SIGTERM or Ctrl-C.

    On a loopback address it may run without tokens; anywhere else it needs
    --tokens-file (or $PARAM_SERVER_TOKENS) and --tls-cert/--tls-key, or an
    explicit --allow-unauthenticated.
    """
    from param_server.server.security import TokenTable
    from param_server.server.service import serve as run

    tokens = (
        TokenTable.load(tokens_file)
        if tokens_file is not None
        else TokenTable.from_env()
    )
    try:
        config = ServerConfig(
            store=store,
            listen=listen,
            max_workers=max(max_workers, max_streams + 1),
            max_streams=max_streams,
            idle_timeout=idle_timeout,
            grace_seconds=grace,
            announce=announce,
            redis_url=redis_url,
            tokens=tokens,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            allow_unauthenticated=allow_unauthenticated,
            read_only=read_only,
        )
    except ValueError as e:
        raise click.BadParameter(str(e)) from e
    if tokens is None and not config.local_only:
        click.echo(
            f"warning: serving {listen} without authentication; anyone who can "
            "reach it may commit, roll back and collect garbage",
            err=True,
        )

    def ready(port: int) -> None:
        if port_file is not None:
            tmp = port_file.with_name(port_file.name + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, port_file)

    run(config, on_ready=ready)

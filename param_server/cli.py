"""The `param-server` command line: the daemon and store administration."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sys
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from param_server.core.errors import (
    ExitCode,
    InvalidInputError,
    ParamServerError,
    UnavailableError,
    kind_of,
)
from param_server.federation.config import SPARSE_FEDAVG, STRATEGIES

if TYPE_CHECKING:
    from param_server.core.auth import Credentials

logger = logging.getLogger(__name__)

DEFAULT_STORE = "./param-store"
DEFAULT_LISTEN = "127.0.0.1:50051"

__all__ = ["ExitCode", "main"]  # exit statuses: the ERRORS table in errors.py

F = TypeVar("F", bound=Callable[..., Any])


def _handle_errors(fn: F) -> F:
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


def _setup_logging(level: str) -> None:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default=None,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level [default: info for serve, which logs what it does; warning "
    "for the other commands, which print their own results].",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log at info level, libraries' (Flower, Ray, transformers) chatter "
    "and progress bars included.",
)
@click.version_option(package_name="moe-param-server")
@click.pass_context
def main(ctx: click.Context, log_level: str | None, verbose: bool) -> None:
    """Versioned, content-addressed parameter server for Mixture-of-Experts models."""
    if not verbose:
        # transformers' own bars (writing a tiny model, say) are chatter
        # between our lines; ours (import, export) have their own switch.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if log_level is None:
        log_level = (
            "info" if verbose or ctx.invoked_subcommand == "serve" else "warning"
        )
    _setup_logging(log_level)
    ctx.obj = {"verbose": verbose}


@main.command()
@store_option
@click.option(
    "--listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    help="Address to listen on (host:port; port 0 picks a free one).",
)
@click.option(
    "--max-workers", default=32, show_default=True, help="Threads serving RPCs."
)
@click.option(
    "--grace",
    default=10.0,
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
    default=24,
    show_default=True,
    help="Fetch and commit streams served at once; more are refused as busy "
    "and clients retry.",
)
@click.option(
    "--idle-timeout",
    default=60.0,
    show_default=True,
    help="Cancel a stream that moves nothing for this many seconds.",
)
@_handle_errors
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
    from param_server.server.service import ServerConfig
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


@main.group()
def token() -> None:
    """Create and hash the bearer tokens a daemon accepts (--tokens-file)."""


@token.command("create")
@click.option("--name", required=True, help="Who holds it (shown in logs).")
@click.option(
    "--role",
    type=click.Choice(["reader", "writer", "admin"]),
    required=True,
    help="reader: manifests and fetches; writer: + commits; admin: + rollback, "
    "pins, gc.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Limit it to this model (repeat for more; default: every model).",
)
@click.option(
    "--tokens-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="TOML file to add the token's hash to (created, mode 0600).",
)
@_handle_errors
def token_create(
    name: str, role: str, models: tuple[str, ...], tokens_file: Path
) -> None:
    """Make a token, add its hash to the tokens file, print it once.

    A running daemon picks changes up on SIGHUP (`kill -HUP PID`); to
    revoke a token, delete its entry and send SIGHUP.
    """
    from param_server.core.names import check_model_name
    from param_server.server.security import TokenTable, hash_token, new_token

    for m in models:
        check_model_name(m)
    if tokens_file.exists() and name in TokenTable.load(tokens_file).names():
        raise InvalidInputError(f"{tokens_file} already has a token named {name!r}")
    tok = new_token()
    entry = f'\n[[token]]\nname = {json.dumps(name)}\nrole = "{role}"\n'
    entry += f'sha256 = "{hash_token(tok)}"\n'
    if models:
        entry += f"models = {json.dumps(list(models))}\n"
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(entry)
    click.echo(tok)
    click.echo(
        f"added {name!r} ({role}) to {tokens_file}; the token above is shown only now",
        err=True,
    )


@token.command("hash")
def token_hash() -> None:
    """Print the SHA-256 of a token read from stdin (for a tokens file)."""
    from param_server.server.security import hash_token

    tok = sys.stdin.readline().strip()
    if not tok:
        raise click.UsageError("give the token on stdin")
    click.echo(hash_token(tok))


@main.command("import")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", required=True, help="Model name in the store.")
@store_option
@click.option("--message", default="", help="Commit message.")
@click.option(
    "--author",
    default=lambda: os.environ.get("USER", "import"),
    show_default="$USER",
    help="Who commits.",
)
@click.option(
    "--allow-schema-change",
    is_flag=True,
    help="Accept tensors that differ from the current version's.",
)
@click.option(
    "--follow-links",
    is_flag=True,
    help="Follow symbolic links that lead out of SRC (refused by default: "
    "only for folders you trust, such as a Hugging Face cache snapshot).",
)
@click.option(
    "--require-experts",
    is_flag=True,
    help="Refuse a checkpoint in which no expert tensor is recognised "
    "(otherwise a warning).",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_handle_errors
def import_(
    src: Path,
    model: str,
    store: Path,
    message: str,
    author: str,
    allow_schema_change: bool,
    follow_links: bool,
    require_experts: bool,
    progress: bool,
) -> None:
    """Import a Hugging Face checkpoint folder as a new version."""
    from param_server.store import Store
    from param_server.store.checkpoints import import_checkpoint

    r = import_checkpoint(
        Store(store),
        src,
        model,
        author=author,
        message=message,
        allow_schema_change=allow_schema_change,
        progress=progress,
        follow_links=follow_links,
        require_experts=require_experts,
    )
    m = r.manifest
    click.echo(
        f"{model}@{m.version}: {len(m.shards)} shards, {len(m.changed)} changed, "
        f"{r.blobs_written} new blobs ({_size(r.bytes_written)})"
    )


@main.command()
@click.argument("model")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@store_option
@click.option("--version", type=int, default=None, help="Version (default: HEAD).")
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Split weights into files of at most this size (B, KB, MB, GB, TB "
    "or KiB, MiB, GiB, TiB; from 1MB to 1024TiB).",
    callback=lambda ctx, param, value: parse_size(value),
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_handle_errors
def export(
    model: str,
    dest: Path,
    store: Path,
    version: int | None,
    max_shard_size: int,
    progress: bool,
) -> None:
    """Export a version as a Hugging Face checkpoint folder."""
    from param_server.store import Store
    from param_server.store.checkpoints import export_checkpoint

    out = export_checkpoint(
        Store(store, create=False),
        model,
        dest,
        version=version,
        max_shard_bytes=max_shard_size,
        progress=progress,
    )
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model")
@store_option
@server_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_handle_errors
@client_options
def versions(
    model: str,
    store: Path,
    server: str | None,
    as_json: bool,
    credentials: Credentials,
) -> None:
    """List a model's live versions."""
    if server:
        from param_server.client import ParamClient

        with ParamClient.from_url(server, credentials, streams=1) as c:
            rows = c.list_versions(model)
    else:
        from param_server.store import Store

        rows = Store(store, create=False).list_versions(model)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        return
    click.echo(
        f"{'':2}{'VERSION':>7} {'PARENT':>6} {'CHANGED':>7}  {'CREATED':<27} "
        f"{'AUTHOR':<12} MESSAGE"
    )
    for r in rows:
        mark = ("*" if r.head else " ") + ("p" if r.pinned else " ")
        click.echo(
            f"{mark}{r.version:>7} {r.parent:>6} {r.num_changed:>7}  "
            f"{_printable(r.created_at):<27} {_printable(r.author[:12]):<12} "
            f"{_printable(r.message)}"
        )
    click.echo("(* HEAD, p pinned)")


@main.command()
@click.argument("model")
@click.argument("version", type=int)
@store_option
@server_option
@click.option("--message", default="", help="Why (recorded in history).")
@_handle_errors
@client_options
def rollback(
    model: str,
    version: int,
    store: Path,
    server: str | None,
    message: str,
    credentials: Credentials,
) -> None:
    """Move a model's HEAD back to VERSION (recorded in history)."""
    author = os.environ.get("USER", "cli")
    if server:
        from param_server.client import ParamClient

        with ParamClient.from_url(server, credentials, streams=1) as c:
            prev, head = c.rollback(model, version, author=author, message=message)
    else:
        from param_server.store import Store

        prev, head = Store(store, create=False).rollback(
            model, version, author=author, message=message
        )
    click.echo(f"{model}: HEAD {prev} -> {head}")


@main.command()
@click.argument("model")
@click.argument("version", type=int)
@store_option
@server_option
@click.option("--unpin", is_flag=True, help="Remove the pin instead.")
@_handle_errors
@client_options
def pin(
    model: str,
    version: int,
    store: Path,
    server: str | None,
    unpin: bool,
    credentials: Credentials,
) -> None:
    """Pin VERSION so garbage collection keeps it (or --unpin)."""
    if server:
        from param_server.client import ParamClient

        with ParamClient.from_url(server, credentials, streams=1) as c:
            pins = c.set_pin(model, version, not unpin)
    else:
        from param_server.store import Store

        pins = list(Store(store, create=False).set_pin(model, version, not unpin))
    click.echo(f"{model}: pinned versions {pins or 'none'}")


@main.command()
@store_option
@server_option
@click.option(
    "--keep-last",
    default=10,
    show_default=True,
    help="Newest versions to keep per model (plus pinned ones and HEAD).",
)
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@_handle_errors
@client_options
def gc(
    store: Path,
    server: str | None,
    keep_last: int,
    dry_run: bool,
    credentials: Credentials,
) -> None:
    """Drop old versions and delete blobs nothing retained references."""
    if server:
        from param_server.client import ParamClient

        with ParamClient.from_url(server, credentials, streams=1) as c:
            g = c.collect_garbage(keep_last, dry_run)
    else:
        from param_server.store import Store

        g = Store(store, create=False).gc(keep_last, dry_run=dry_run)
    dropped = [f"{m}@{v}" for m, v in g.dropped_versions]
    blobs, freed = g.blobs_deleted, g.bytes_freed
    verb = "would drop" if dry_run else "dropped"
    click.echo(
        f"{verb} {len(dropped)} versions {dropped}, {blobs} blobs ({_size(freed)})"
    )


@main.command()
@store_option
@_handle_errors
def fsck(store: Path) -> None:
    """Verify every live version's blobs exist and match their digests."""
    from param_server.store import Store

    problems = Store(store, create=False).fsck()
    for p in problems:
        click.echo(p, err=True)
    if problems:
        sys.exit(ExitCode.INTEGRITY)
    click.echo("store is consistent")


@main.command()
@click.option(
    "--server",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="HOST:PORT",
    help="The daemon (for each model's HEAD, and its Redis URL).",
)
@click.option(
    "--redis",
    "redis_url",
    default=None,
    metavar="URL",
    envvar="PARAM_SERVER_REDIS",
    help="Redis the nodes report to (default: the one the daemon announces on).",
)
@click.option("--model", default=None, help="Only this model's nodes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--watch",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Print the table again every SECONDS until Ctrl-C.",
)
@_handle_errors
@client_options
def status(
    server: str,
    redis_url: str | None,
    model: str | None,
    as_json: bool,
    watch: float | None,
    credentials: Credentials,
) -> None:
    """Show the fleet: which node serves which version, which lag or are gone.

    A node that stops reporting disappears once its heartbeat expires (three
    heartbeat intervals); one that is late but not yet expired shows as stale.
    """
    import time

    import redis

    from param_server.client import ParamClient
    from param_server.core.announcements import read_fleet, redis_client

    with ParamClient.from_url(server, credentials, retries=1, timeout=5.0) as client:
        url = redis_url or client.announce_url()
        if url is None:
            raise InvalidInputError(
                f"the daemon at {server} does not announce versions; give --redis URL"
            )
        r = redis_client(url)
        while True:
            try:
                nodes = read_fleet(r, model)
            except (redis.RedisError, OSError) as e:
                raise UnavailableError(f"cannot read the fleet from Redis: {e}") from e
            heads: dict[str, int | None] = {}
            for n in nodes:
                if n.model not in heads:
                    try:
                        heads[n.model] = client.head(n.model)
                    except ParamServerError:
                        heads[n.model] = None
            if as_json:
                click.echo(
                    json.dumps(
                        {
                            "heads": heads,
                            "nodes": [dataclasses.asdict(n) for n in nodes],
                        },
                        indent=2,
                    )
                )
            else:
                click.echo(_fleet_table(nodes, heads, time.time()))
            if watch is None:
                return
            time.sleep(watch)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    return f"{seconds / 60:.0f}m ago"


def _fleet_table(nodes: list[Any], heads: dict[str, int | None], now: float) -> str:
    if not nodes:
        return "no live nodes"
    rows = [
        (
            "NODE",
            "MODEL",
            "VERSION",
            "HEAD",
            "STATE",
            "LAST SWAP",
            "EXPERTS",
            "RESIDENT",
            "HIT RATE",
            "ERRORS",
            "SEEN",
        )
    ]
    for n in nodes:
        head = heads.get(n.model)
        if now - n.updated > 2 * n.heartbeat_interval:
            state = "stale"
        elif n.pinned_version is not None:
            state = f"pinned {n.pinned_version}"
        elif head is None:
            state = "head unknown"
        elif n.applied_version == head:
            state = "current"
        elif n.pending_version == head:
            state = "swapping"
        else:
            state = f"lagging (head {head})"
        rows.append(
            (
                n.node,
                n.model,
                str(n.applied_version),
                "?" if head is None else str(head),
                state,
                _ago(now - n.last_swap if n.last_swap else None),
                str(n.resident_experts),
                f"{_size(n.resident_bytes)}/{_size(n.budget_bytes)}",
                f"{100 * n.hit_rate:.0f}%",
                str(n.errors),
                _ago(now - n.updated),
            )
        )
    cells = [[_printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in cells
    )


@main.command()
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store directory (default: a temporary one, removed afterwards).",
)
@click.option("--layers", default=4, show_default=True)
@click.option("--experts", default=8, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option(
    "--rounds",
    default=3,
    show_default=True,
    help="Federated rounds at the end (0 skips the federation part).",
)
@engine_option("simulation")
@click.pass_context
@_handle_errors
def demo(
    ctx: click.Context,
    store: Path | None,
    layers: int,
    experts: int,
    hidden: int,
    rounds: int,
    engine: str,
) -> None:
    """The whole loop on this machine: daemon, import, lazy fetches, live hot
    swaps, then institutions training together while live nodes swap each round in.

    It prints each step; `param-server -v demo` shows the libraries' logs too.
    """
    from param_server.launch.demo import run_demo

    run_demo(
        store,
        layers=layers,
        experts=experts,
        hidden=hidden,
        rounds=rounds,
        engine=engine,
        verbose=bool((ctx.obj or {}).get("verbose")),
    )


@main.command("fed-data")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--institutions",
    default="hospital-a,hospital-b,hospital-c",
    show_default=True,
    help="Comma-separated institution names.",
)
@click.option("--train-docs", default=384, show_default=True)
@click.option("--test-docs", default=128, show_default=True)
@click.option(
    "--own-share",
    default=0.9,
    show_default=True,
    help="Share of an institution's documents from its own domains (non-IID-ness).",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--model-out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write a freshly initialised tiny MoE for the task here "
    "(a Hugging Face folder for `param-server import`).",
)
@_handle_errors
def fed_data(
    dest: Path,
    institutions: str,
    train_docs: int,
    test_docs: int,
    own_share: float,
    seed: int,
    model_out: Path | None,
) -> None:
    """Generate the non-IID learning task (one data file per institution)."""
    from fed_clients.task import make_task, write_initial_checkpoint

    names = tuple(n.strip() for n in institutions.split(",") if n.strip())
    task = make_task(  # its TaskError is an InvalidInputError: exit 4
        dest,
        names,
        train_docs=train_docs,
        test_docs=test_docs,
        own_share=own_share,
        seed=seed,
    )
    for name in task.institutions:
        click.echo(f"{name}: {task.data_path(name)}")
    if model_out is not None:
        write_initial_checkpoint(task, model_out, seed=seed)
        click.echo(f"initial model: {model_out}")


def _run_config_options(fn: F) -> F:
    for opt in reversed(
        [
            click.option("--model", required=True, help="Model name in the store."),
            click.option(
                "--server",
                default=DEFAULT_LISTEN,
                show_default=True,
                metavar="HOST:PORT",
                help="The param-server daemon the rounds commit to.",
            ),
            click.option("--rounds", default=3, show_default=True),
            click.option(
                "--strategy",
                type=click.Choice(STRATEGIES),
                default=SPARSE_FEDAVG,
                show_default=True,
            ),
            click.option(
                "--min-clients",
                default=2,
                show_default=True,
                help="Valid updates a round needs to commit.",
            ),
            click.option("--local-steps", default=20, show_default=True),
            click.option(
                "--trainable",
                default="experts",
                show_default=True,
                help="experts, experts+router, all, or a regex over parameter names.",
            ),
            click.option(
                "--max-update-norm",
                default=0.0,
                show_default=True,
                help="Reject updates farther than this from the global model (0: off).",
            ),
            click.option(
                "--dp-clipping-norm",
                default=0.0,
                show_default=True,
                help="> 0: client-side fixed-clipping DP (dense strategies only).",
            ),
            click.option("--dp-noise-multiplier", default=0.0, show_default=True),
        ]
    ):
        fn = opt(fn)
    return fn


def _run_config(**kw: Any) -> dict[str, Any]:
    cfg = {
        "model": kw["model"],
        "param-server": kw["server"],
        "num-rounds": kw["rounds"],
        "strategy": kw["strategy"],
        "min-clients": kw["min_clients"],
        "min-available": kw["min_clients"],
        "local-steps": kw["local_steps"],
        "trainable": kw["trainable"],
        "max-update-norm": kw["max_update_norm"],
        "dp-clipping-norm": kw["dp_clipping_norm"],
        "dp-noise-multiplier": kw["dp_noise_multiplier"],
    }
    from param_server.federation.config import FederationConfig

    FederationConfig.from_run_config(cfg)  # refuse bad settings before any launch
    return cfg


@main.command("fed-app")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@_run_config_options
@_handle_errors
def fed_app(dest: Path, **kw: Any) -> None:
    """Write the Flower App folder for `flwr run` (our ServerApp and ClientApp)."""
    from param_server.launch.deploy import write_app

    write_app(dest, _run_config(**kw))
    click.echo(f"wrote {dest / 'pyproject.toml'}")
    click.echo(f"run it with: flwr run {dest} <superlink-connection>")


@main.command()
@_run_config_options
@click.option(
    "--data",
    "data_root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Task folder from `param-server fed-data` (one institution per data file).",
)
@engine_option("deployment")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("./flower-run"),
    show_default=True,
    help="Logs and Flower state of the deployment.",
)
@pem_option(
    "--flower-cert",
    "Deployment: serve the SuperLink with TLS using this certificate (PEM, "
    "for 'localhost'); needs --flower-key and --flower-ca.",
)
@pem_option(
    "--flower-key",
    "The private key (PEM) of --flower-cert.",
)
@pem_option(
    "--flower-ca",
    "The CA (PEM) SuperNodes and flwr trust for the SuperLink.",
)
@click.option(
    "--node-auth/--no-node-auth",
    default=True,
    show_default=True,
    help="With TLS: admit only SuperNodes whose key was registered "
    "(each institution gets a fresh key, registered before it starts).",
)
@_handle_errors
@client_options
def federate(
    data_root: Path,
    engine: str,
    workdir: Path,
    credentials: Credentials,
    flower_cert: Path | None,
    flower_key: Path | None,
    flower_ca: Path | None,
    node_auth: bool,
    **kw: Any,
) -> None:
    """Run federated rounds on this machine; each round commits a version."""
    from fed_clients.task import load_task
    from param_server.federation.config import FederationConfig

    # The ServerApp (in this process, or under the SuperLink) reads them
    # from the environment; see Credentials.from_env.
    ctx = click.get_current_context()
    for param, var in (
        ("token", "PARAM_SERVER_TOKEN"),
        ("ca_cert", "PARAM_SERVER_CA"),
        ("client_cert", "PARAM_SERVER_CLIENT_CERT"),
        ("client_key", "PARAM_SERVER_CLIENT_KEY"),
    ):
        value = ctx.params.get(param)
        if value:
            os.environ[var] = str(value.absolute() if param != "token" else value)
    run_config = _run_config(**kw)
    task = load_task(data_root)

    def show(version: int | None, rnd: int, names: str, note: str) -> None:
        if version is None:
            click.echo(f"round {rnd}: nothing committed ({note})")
        else:
            click.echo(f"round {rnd}: committed {kw['model']}@{version} from {names}")

    if engine == "simulation":
        from param_server.launch.simulation import run_simulation_rounds

        cfg = FederationConfig.from_run_config(run_config)
        run_simulation_rounds(
            cfg,
            str(data_root.absolute()),
            len(task.institutions),
            on_round=lambda r: show(
                r.version,
                r.round,
                ", ".join(c["institution"] for c in r.contributors),
                r.note,
            ),
        )
        return
    from param_server.client import ParamClient
    from param_server.launch.deploy import (
        FlowerSecurity,
        LocalDeployment,
        write_app,
    )

    tls_files = (flower_cert, flower_key, flower_ca)
    if any(tls_files) and not all(tls_files):
        raise click.UsageError(
            "Flower TLS needs --flower-cert, --flower-key and --flower-ca"
        )
    security = (
        FlowerSecurity(
            ca=flower_ca.absolute(),
            cert=flower_cert.absolute(),
            key=flower_key.absolute(),
            node_auth=node_auth,
        )
        if flower_cert and flower_key and flower_ca
        else None
    )
    app = write_app(workdir / "app", run_config)
    institutions = {n: str(task.data_path(n)) for n in task.institutions}
    with (
        ParamClient.from_url(kw["server"], credentials) as client,
        LocalDeployment(workdir / "flower", institutions, security=security) as flower,
    ):
        client.wait_ready()
        before = client.head(kw["model"])
        run_id = flower.submit(app)
        click.echo(f"submitted Flower run {run_id}; logs in {workdir / 'flower'}")
        flower.wait_for_run(run_id, timeout=24 * 3600)
        for info in client.list_versions(kw["model"]):
            if info.version > before:
                fed = client.get_manifest(kw["model"], info.version).metadata.get(
                    "federation", {}
                )
                show(
                    info.version,
                    int(fed.get("round", 0)),
                    ", ".join(c["institution"] for c in fed.get("contributors", [])),
                    "",
                )
        click.echo(f"run {run_id} finished:completed")


def _size(n: int) -> str:
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


def _printable(text: str) -> str:
    """`text` with control and format characters escaped, so stored strings
    (commit messages, authors, node names) cannot move the cursor, recolour
    or reorder a terminal; what is stored stays as it was."""
    return "".join(
        ch
        if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
        else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


if __name__ == "__main__":
    main()

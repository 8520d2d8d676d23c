"""`param-server status`: the live nodes and the versions they serve."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import click

from param_server.cli.common import (
    DEFAULT_LISTEN,
    client_options,
    handle_errors,
    human_size,
    printable,
)
from param_server.cli.main import main
from param_server.core.errors import (
    InvalidInputError,
    ParamServerError,
    UnavailableError,
)

if TYPE_CHECKING:
    from param_server.core.auth import Credentials


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
@handle_errors
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
                f"{human_size(n.resident_bytes)}/{human_size(n.budget_bytes)}",
                f"{100 * n.hit_rate:.0f}%",
                str(n.errors),
                _ago(now - n.updated),
            )
        )
    cells = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in cells
    )

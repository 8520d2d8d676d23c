"""Store administration: import, export, versions, rollback, pin, gc, fsck."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from param_server.cli.common import (
    client_options,
    handle_errors,
    human_size,
    open_admin,
    parse_size,
    printable,
    server_option,
    store_option,
)
from param_server.cli.main import main
from param_server.core.errors import (
    ExitCode,
)

if TYPE_CHECKING:
    from param_server.core.auth import Credentials


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
@handle_errors
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
        f"{r.blobs_written} new blobs ({human_size(r.bytes_written)})"
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
@handle_errors
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
@handle_errors
@client_options
def versions(
    model: str,
    store: Path,
    server: str | None,
    as_json: bool,
    credentials: Credentials,
) -> None:
    """List a model's live versions."""
    with open_admin(store, server, credentials) as admin:
        rows = admin.list_versions(model)
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
            f"{printable(r.created_at):<27} {printable(r.author[:12]):<12} "
            f"{printable(r.message)}"
        )
    click.echo("(* HEAD, p pinned)")


@main.command()
@click.argument("model")
@click.argument("version", type=int)
@store_option
@server_option
@click.option("--message", default="", help="Why (recorded in history).")
@handle_errors
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
    with open_admin(store, server, credentials) as admin:
        prev, head = admin.rollback(model, version, author=author, message=message)
    click.echo(f"{model}: HEAD {prev} -> {head}")


@main.command()
@click.argument("model")
@click.argument("version", type=int)
@store_option
@server_option
@click.option("--unpin", is_flag=True, help="Remove the pin instead.")
@handle_errors
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
    with open_admin(store, server, credentials) as admin:
        pins = list(admin.set_pin(model, version, not unpin))
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
@handle_errors
@client_options
def gc(
    store: Path,
    server: str | None,
    keep_last: int,
    dry_run: bool,
    credentials: Credentials,
) -> None:
    """Drop old versions and delete blobs nothing retained references."""
    with open_admin(store, server, credentials) as admin:
        g = admin.collect_garbage(keep_last, dry_run)
    dropped = [f"{m}@{v}" for m, v in g.dropped_versions]
    blobs, freed = g.blobs_deleted, g.bytes_freed
    verb = "would drop" if dry_run else "dropped"
    click.echo(
        f"{verb} {len(dropped)} versions {dropped}, {blobs} blobs ({human_size(freed)})"
    )


@main.command()
@store_option
@handle_errors
def fsck(store: Path) -> None:
    """Verify every live version's blobs exist and match their digests."""
    from param_server.store import Store

    problems = Store(store, create=False).fsck()
    for p in problems:
        click.echo(p, err=True)
    if problems:
        sys.exit(ExitCode.INTEGRITY)
    click.echo("store is consistent")

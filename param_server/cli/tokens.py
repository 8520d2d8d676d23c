"""`param-server token`: the bearer tokens a daemon accepts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from param_server.cli.common import (
    handle_errors,
)
from param_server.cli.main import main
from param_server.core.errors import (
    InvalidInputError,
)


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
@handle_errors
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

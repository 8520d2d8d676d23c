"""The `param-server` command group; each command group lives in its own module."""

from __future__ import annotations

import logging
import os

import click

from param_server.cli.common import setup_logging

logger = logging.getLogger(__name__)


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
    setup_logging(log_level)
    ctx.obj = {"verbose": verbose}

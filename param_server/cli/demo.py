"""`param-server demo`: the whole loop on this machine."""

from __future__ import annotations

from pathlib import Path

import click

from param_server.cli.common import (
    engine_option,
    handle_errors,
)
from param_server.cli.main import main


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
@click.option(
    "--lora-rank",
    default=8,
    show_default=True,
    help="Rank of the adapters institutions train and send (0: whole tensors).",
)
@engine_option("simulation")
@click.pass_context
@handle_errors
def demo(
    ctx: click.Context,
    store: Path | None,
    layers: int,
    experts: int,
    hidden: int,
    rounds: int,
    lora_rank: int,
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
        lora_rank=lora_rank,
        verbose=bool((ctx.obj or {}).get("verbose")),
    )

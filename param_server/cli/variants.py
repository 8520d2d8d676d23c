"""`param-server check-variant`: an 8-bit variant's quality, measured on
text before a fleet uses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from param_server.cli.common import (
    DEFAULT_LISTEN,
    client_options,
    handle_errors,
    human_size,
)
from param_server.cli.main import main
from param_server.core.errors import InvalidInputError

if TYPE_CHECKING:
    from param_server.core.auth import Credentials


@main.command("check-variant")
@click.argument("model")
@click.option(
    "--width",
    type=click.Choice(["int8", "fp8"]),
    default="fp8",
    show_default=True,
    help="The variant to check.",
)
@click.option(
    "--text",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Held-out text to measure on (JSON Lines, Parquet, CSV or a folder of "
    ".txt files), tokenized with the model's own tokenizer from the store.",
)
@click.option("--text-field", default="text", show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option(
    "--max-sequences",
    default=64,
    show_default=True,
    help="Sequences of the text to measure on (the first ones).",
)
@click.option("--version", type=int, default=None, help="Default: HEAD.")
@click.option(
    "--max-kl",
    default=0.01,
    show_default=True,
    help="Fail when the mean KL divergence (nats per token) is larger.",
)
@click.option(
    "--min-top1",
    default=0.99,
    show_default=True,
    help="Fail when fewer positions predict the same next token.",
)
@click.option(
    "--server", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT"
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
@client_options
def check_variant(
    model: str,
    width: str,
    text: Path,
    text_field: str,
    seq_len: int,
    max_sequences: int,
    version: int | None,
    max_kl: float,
    min_top1: float,
    server: str,
    device: str,
    as_json: bool,
    credentials: Credentials,
) -> None:
    """Serve MODEL at full width and as its int8 or fp8 expert variant, compare
    their next-token predictions on held-out text, and exit 1 when the
    variant is worse than the thresholds (KL divergence, top-1 agreement).
    The daemon makes the variant on first request."""
    from fed_clients.data import pack, read_documents, tokenizer_from_files
    from loaders.quality import variant_quality
    from param_server.client import ParamClient
    from param_server.federation.protocol import TOKENIZER_FILES

    with ParamClient.from_url(server, credentials) as client:
        m = client.get_manifest(model, version)
        names = [n for n in TOKENIZER_FILES if n in m.files]
        files = client.fetch_blobs(m, [], files=names) if names else {}
        tokenizer = tokenizer_from_files({n: bytes(b) for n, b in files.items()})
        cfg = json.loads(
            bytes(client.fetch_blobs(m, [], files=["config.json"])["config.json"])
        )
        limit = cfg.get("max_position_embeddings")
        if limit and seq_len > int(limit):
            raise InvalidInputError(
                f"--seq-len {seq_len} is longer than {model} takes ({limit}); lower it"
            )
        docs = read_documents(text, text_field, tokenizer)
        ids = pack(docs, tokenizer, seq_len, str(text))[:max_sequences]
        q = variant_quality(client, model, width, ids, version=m.version, device=device)
    ok = q.kl <= max_kl and q.top1 >= min_top1
    if as_json:
        click.echo(
            json.dumps({**{f: getattr(q, f) for f in q.__dataclass_fields__}, "ok": ok})
        )
    else:
        click.echo(
            f"{model}@{m.version} {width} experts: "
            f"{human_size(q.expert_bytes_variant)} against "
            f"{human_size(q.expert_bytes_full)} "
            f"({q.expert_bytes_variant / q.expert_bytes_full:.1%}); on {q.tokens} "
            f"tokens of {text}: KL {q.kl:.5f} nats/token (max {max_kl}), top-1 "
            f"agreement {q.top1:.2%} (min {min_top1:.0%}), held-out loss "
            f"{q.loss_full:.4f} -> {q.loss_variant:.4f}"
        )
        click.echo(
            "OK: fit for the fleet" if ok else "FAILED: keep this fleet at full width"
        )
    if not ok:
        raise SystemExit(1)

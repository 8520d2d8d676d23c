"""Federated rounds: the task, the Flower App, and running rounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from param_server.cli.common import (
    DEFAULT_LISTEN,
    F,
    client_options,
    engine_option,
    handle_errors,
    pem_option,
)
from param_server.cli.main import main

if TYPE_CHECKING:
    from param_server.core.auth import Credentials
from param_server.federation.config import SPARSE_FEDAVG, STRATEGIES


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
@handle_errors
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
            click.option(
                "--lora-rank",
                default=0,
                show_default=True,
                help="> 0: institutions train and send rank-r adapters (LoRA).",
            ),
            click.option(
                "--lora-alpha",
                default=16.0,
                show_default=True,
                help="Adapters' scale is alpha / rank.",
            ),
            click.option(
                "--lora-targets",
                default="experts",
                show_default=True,
                help="experts, experts+attention, or a regex over further "
                "nn.Linear names.",
            ),
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
        "lora-rank": kw["lora_rank"],
        "lora-alpha": kw["lora_alpha"],
        "lora-targets": kw["lora_targets"],
    }
    from param_server.federation.config import FederationConfig

    FederationConfig.from_run_config(cfg)  # refuse bad settings before any launch
    return cfg


@main.command("fed-app")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@_run_config_options
@handle_errors
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
    default=None,
    help="Task folder from `param-server fed-data` (one institution per data file).",
)
@click.option(
    "--institution",
    "institutions",
    multiple=True,
    metavar="NAME=PATH",
    help="An institution and its own text (JSON Lines, Parquet, CSV or a folder "
    "of .txt files); repeat for each. Instead of --data.",
)
@click.option(
    "--node-config",
    "node_config",
    multiple=True,
    metavar="KEY=VALUE",
    help="Text options every institution gets (seq-len, text-field, "
    "eval-fraction, micro-batch-size, ...); repeatable.",
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
@handle_errors
@client_options
def federate(
    data_root: Path | None,
    institutions: tuple[str, ...],
    node_config: tuple[str, ...],
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
    options = dict(_pair(o, "--node-config", "KEY=VALUE") for o in node_config)
    if (data_root is None) == (not institutions):
        raise click.UsageError(
            "give the institutions' data: --data TASK_FOLDER, or --institution "
            "NAME=PATH for each institution's own text"
        )
    if institutions:
        data_root = _text_task(workdir / "institutions", institutions, options)
    assert data_root is not None
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
    with (
        ParamClient.from_url(kw["server"], credentials) as client,
        LocalDeployment(workdir / "flower", {}, security=security) as flower,
    ):
        for name in task.institutions:
            flower.add_supernode(
                name, str(task.data_path(name)), node_config=task.options
            )
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


def _pair(text: str, option: str, form: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise click.UsageError(f"{option} takes {form}, got {text!r}")
    return key.strip(), value.strip()


def _text_task(
    dest: Path, institutions: tuple[str, ...], options: dict[str, str]
) -> Path:
    """A task folder naming each institution's own text file (what the
    simulation engine's partitions and the SuperNodes read)."""
    from fed_clients.data import is_text
    from fed_clients.task import Task, check_institution

    files: dict[str, str] = {}
    for item in institutions:
        name, path = _pair(item, "--institution", "NAME=PATH")
        check_institution(name)
        if name in files:
            raise click.UsageError(f"institution {name!r} is given twice")
        where = Path(path).absolute()
        if not where.exists():
            raise click.UsageError(f"{name}: {path} does not exist")
        if not is_text(where):
            raise click.UsageError(
                f"{name}: {path} is not text (.jsonl, .json, .parquet, .csv or a "
                "folder of .txt files)"
            )
        files[name] = str(where)
    dest.mkdir(parents=True, exist_ok=True)
    task = Task(
        str(dest.absolute()),
        tuple(files),
        vocab_size=0,
        seq_len=int(options.get("seq-len", 128)),
        domains=len(files),
        train_docs=0,
        test_docs=0,
        own_share=1.0,
        seed=0,
        data_files=files,
        options=options,
    )
    task.save()
    return dest

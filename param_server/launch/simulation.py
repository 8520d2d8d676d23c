"""Flower's simulation engine: many institutions on one machine, one call."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from param_server.federation.config import FederationConfig
from param_server.federation.server import RoundResult, make_server_app

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

logger = logging.getLogger(__name__)


def _start_ray(init_args: dict[str, str | bool], attempts: int = 3) -> None:
    """Starts Ray for the simulation engine (which then reuses it), retrying.

    On a small, loaded machine Ray's head node sometimes misses its fixed
    30 s start-up deadline; that is worth another try, not a failed run.
    Flower's backend shuts Ray down when the simulation ends.
    """
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                include_dashboard=False,
                **init_args,  # type: ignore[arg-type]
            )
            return
        except Exception as e:  # Ray raises a bare Exception on start-up timeout
            ray.shutdown()
            if attempt == attempts:
                raise
            logger.warning(
                "Ray did not start (%s); retrying (%d/%d)", e, attempt, attempts
            )


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_flower(enabled: bool = True) -> Iterator[None]:
    """Keeps Flower's own chatter (its DEBUG/INFO lines, which the simulation
    engine turns on, and `run_simulation`'s deprecation notice) out of the
    output while enabled; its errors still show.

    A filter on Flower's logger, not a level: the engine resets the level.
    """
    flwr_logger = logging.getLogger("flwr")
    if enabled:
        flwr_logger.addFilter(_below_error)
    try:
        yield
    finally:
        flwr_logger.removeFilter(_below_error)


def run_simulation_rounds(
    config: FederationConfig,
    data_root: str,
    num_institutions: int,
    *,
    on_round: Callable[[RoundResult], None] | None = None,
    cpus_per_client: float = 1.0,
    client_app: ClientApp | None = None,
) -> list[RoundResult]:
    """Runs `config.num_rounds` rounds with `num_institutions` virtual SuperNodes.

    Each virtual SuperNode is the institution of the task at `data_root`
    that its partition id picks (`client_app` replaces our ClientApp, e.g. to
    inject faults). Returns what each round did. Flower's own log lines show
    only when the root logger is at INFO or below.

    This uses Flower's in-process `run_simulation`, which Flower marks as
    deprecated in favour of `flwr run` against a SuperLink started with
    `--simulation`. That path runs the ServerApp in a subprocess, which would
    lose `on_round` and `client_app` (the hooks the demo and the fault tests
    use); `flwr run` is what the deployment engine (`deploy.LocalDeployment`)
    runs.
    """
    from flwr.simulation import run_simulation

    from fed_clients.app import make_client_app

    results: list[RoundResult] = []

    def note(r: RoundResult) -> None:
        results.append(r)
        if on_round is not None:
            on_round(r)

    # Ray warns on every start that it will stop overriding accelerator
    # variables when no GPU is asked for; we ask for none, so say so.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_args: dict[str, str | bool] = {
        "logging_level": "ERROR",
        "log_to_driver": False,
    }
    _start_ray(init_args)
    with quiet_flower(logging.getLogger().getEffectiveLevel() > logging.INFO):
        run_simulation(
            server_app=make_server_app(config, on_round=note),
            client_app=client_app or make_client_app(data_root),
            num_supernodes=num_institutions,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                "init_args": {**init_args},
            },
        )
    if len(results) != config.num_rounds:
        raise RuntimeError(
            f"the simulation ran {len(results)} of {config.num_rounds} rounds; "
            "see the log above for the ServerApp's error"
        )
    return results

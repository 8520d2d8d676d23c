"""Does federation learn? Federated vs centralized vs local-only, same total steps.

On the generated non-IID task, from one initial model:
- federated: R rounds of our sparse FedAvg through Flower's simulation
  engine and a real param-server, each institution S local steps per round;
- centralized: R*S*N steps on the union of all institutions' training data;
- local-only: each institution alone, R*S*N steps on its own data.
Every model is scored on the union of the institutions' held-out sets (mean
next-token cross-entropy, nats).

    python bench/fed_learning_bench.py                     # R=10, S=20, N=3
    python bench/fed_learning_bench.py --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from fed_clients.task import load_split, make_task, write_initial_checkpoint
from fed_clients.train import TrainConfig, build_model, evaluate, train_local
from param_server.federation.config import FederationConfig
from param_server.federation.server import load_state
from param_server.launch.simulation import run_simulation_rounds
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="local steps per round")
    p.add_argument("--institutions", type=int, default=3)
    p.add_argument("--trainable", default="all")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("flwr", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    names = tuple(f"inst-{chr(97 + i)}" for i in range(a.institutions))
    with tempfile.TemporaryDirectory(prefix="fed-learning-") as tmp:
        work = Path(tmp)
        task = make_task(work / "task", names)
        ckpt = write_initial_checkpoint(task, work / "ckpt")
        import_checkpoint(Store(work / "store"), ckpt, "m")
        srv, port, _ = create_server(
            ServerConfig(store=work / "store", listen="127.0.0.1:0", announce=False)
        )
        srv.start()
        try:
            from param_server.client import ParamClient

            with ParamClient(f"127.0.0.1:{port}") as c:
                init = load_state(c, "m", dense=False)
            held_out = torch.cat([load_split(task.data_path(n), "test") for n in names])
            total = a.rounds * a.steps * a.institutions

            def score(tensors: dict[str, torch.Tensor]) -> float:
                return evaluate(build_model(init.config_json, tensors), held_out)

            def alone(data: torch.Tensor) -> float:
                cfg = TrainConfig(
                    steps=total,
                    batch_size=a.batch_size,
                    lr=a.lr,
                    trainable=a.trainable,
                    seed=1,
                )
                return score(
                    train_local(init.config_json, init.tensors, data, cfg).tensors
                )

            t0 = time.perf_counter()
            fed_cfg = FederationConfig(
                model="m",
                param_server=f"127.0.0.1:{port}",
                num_rounds=a.rounds,
                min_clients=a.institutions,
                min_available=a.institutions,
                local_steps=a.steps,
                batch_size=a.batch_size,
                lr=a.lr,
                trainable=a.trainable,
                round_timeout=300,
            )
            run_simulation_rounds(fed_cfg, task.root, a.institutions)
            fed_s = time.perf_counter() - t0
            with ParamClient(f"127.0.0.1:{port}") as c:
                final = load_state(c, "m", dense=False)
            fed = score(final.tensors)
        finally:
            srv.stop(0)
        start = score(init.tensors)
        union = torch.cat([load_split(task.data_path(n), "train") for n in names])
        central = alone(union)
        local = {n: alone(load_split(task.data_path(n), "train")) for n in names}

    print(
        f"\nnon-IID task, {a.institutions} institutions (own-share {task.own_share}), "
        f"R={a.rounds} rounds x S={a.steps} local steps; total steps {total} each"
    )
    print(f"{'model':<26}{'held-out loss':>14}{'vs centralized':>16}")
    rows = [
        ("initial", start),
        ("federated (sparse-fedavg)", fed),
        ("centralized (union)", central),
    ]
    rows += [(f"local-only {n}", v) for n, v in local.items()]
    for name, v in rows:
        print(f"{name:<26}{v:>14.4f}{(v / central - 1) * 100:>15.1f}%")
    print(
        f"\nfederated within 10% of centralized: {fed <= central * 1.10} "
        f"({(fed / central - 1) * 100:+.1f}%)"
    )
    print(f"federated better than every local-only: {fed < min(local.values())}")
    print(f"federated run took {fed_s:.0f} s (simulation engine, incl. start-up)")


if __name__ == "__main__":
    main()

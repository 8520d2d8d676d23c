"""Wall time per federated round through Flower's deployment engine, and how much
of it is Flower (polling, transport, a fresh ClientApp process per message)
rather than our work.

A SuperLink and one SuperNode per institution on loopback, a param-server in
this process, R rounds of sparse FedAvg. Per round, from the committed
versions' provenance: the wait from sending the round to the last reply, the
slowest institution's own handler time (build the model, train, pack the
update), and the server's validation + aggregation time.

    python bench/fed_round_bench.py                 # 3 institutions, 4 rounds
    python bench/fed_round_bench.py --lora-rank 8   # institutions send adapters

Also the ClientApp's start-up on its own: a fresh interpreter importing
`fed_clients.app` (and, for comparison, torch, transformers and Flower's
ClientApp alone), as `flwr-clientapp` does for every message.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fed_clients.task import make_task, write_initial_checkpoint
from param_server.client import ParamClient
from param_server.launch.deploy import LocalDeployment, write_app
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint


def import_seconds(module: str, repeat: int = 3) -> float:
    """Median wall time of a fresh interpreter importing `module`."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--institutions", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--lora-rank", type=int, default=0, help="> 0: LoRA mode (adapters only)"
    )
    a = p.parse_args()
    startup = {
        m: import_seconds(m)
        for m in ("torch", "transformers", "flwr.clientapp", "fed_clients.app")
    }
    names = tuple(f"inst-{chr(97 + i)}" for i in range(a.institutions))
    with tempfile.TemporaryDirectory(prefix="fed-round-") as tmp:
        work = Path(tmp)
        task = make_task(work / "task", names)
        import_checkpoint(
            Store(work / "store"), write_initial_checkpoint(task, work / "ckpt"), "m"
        )
        srv, port, _ = create_server(
            ServerConfig(store=work / "store", listen="127.0.0.1:0", announce=False)
        )
        srv.start()
        target = f"127.0.0.1:{port}"
        app = write_app(
            work / "app",
            {
                "model": "m",
                "param-server": target,
                "num-rounds": a.rounds,
                "min-clients": a.institutions,
                "min-available": a.institutions,
                "local-steps": a.steps,
                "trainable": "experts" if a.lora_rank else "all",
                "lora-rank": a.lora_rank,
                "lora-targets": "experts+attention",
            },
        )
        try:
            with LocalDeployment(
                work / "flower", {n: str(task.data_path(n)) for n in names}
            ) as flower:
                t0 = time.monotonic()
                run_id = flower.submit(app)
                run = flower.wait_for_run(run_id, timeout=3600)
                total = time.monotonic() - t0
            with ParamClient(target) as c:
                feds = [
                    c.get_manifest("m", v.version).metadata["federation"]
                    for v in c.list_versions("m")
                    if v.author == "federation"
                ]
        finally:
            srv.stop(0)
    print(
        f"\n{a.institutions} institutions, {a.rounds} rounds, {a.steps} local steps"
        + (f", LoRA rank {a.lora_rank}" if a.lora_rank else ", every tensor")
        + f" (deployment engine, loopback); run {run['status']} in {total:.0f} s "
        "(submit to finish)"
    )
    print(
        "ClientApp start-up, a fresh interpreter importing (median of 3): "
        + ", ".join(f"{m} {s:.2f} s" for m, s in startup.items())
    )
    print(
        f"{'round':>5}{'wait s':>9}{'client s':>10}{'server s':>10}{'Flower s':>10}"
        f"{'Flower %':>10}"
    )
    shares = []
    for f in feds:
        wait = f["timing"]["wait_seconds"]
        client = max(c["train_seconds"] or 0.0 for c in f["contributors"])
        server = f["timing"]["aggregate_seconds"]
        flwr = wait - client
        shares.append(flwr / (wait + server))
        print(
            f"{f['round']:>5}{wait:>9.1f}{client:>10.1f}{server:>10.2f}{flwr:>10.1f}"
            f"{flwr / (wait + server) * 100:>9.0f}%"
        )
    print(
        f"median share of a round that is Flower rather than our work: "
        f"{statistics.median(shares) * 100:.0f}%"
    )


if __name__ == "__main__":
    main()

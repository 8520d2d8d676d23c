"""Commits, rolls back and collects garbage in a loop until killed.

Run as `python -m tests.integration.crash_child STORE SEED`. Before each
operation it prints `begin <op> <head it will set>`, after it `ack <head>`,
so the parent knows what was acknowledged when it sends SIGKILL.
"""

from __future__ import annotations

import random
import sys

from param_server.core.errors import StaleParentError
from param_server.store import Store
from tests.helpers import raw_safetensors

KEYS = [f"layers.{i // 4}.experts.{i % 4}" for i in range(8)] + ["global"]
SIZE = 48 * 1024


def shard(rng: random.Random) -> bytes:
    return raw_safetensors({"w": rng.randbytes(SIZE)})


def main(root: str, seed: int) -> None:
    rng = random.Random(seed)
    store = Store(root)
    out = sys.stdout
    if "m" not in store.list_models():
        out.write("begin commit 1\n")
        out.flush()
        with store.staging() as s:
            for k in KEYS:
                s.add(k, shard(rng))
            store.commit("m", 0, s)
        out.write("ack 1\n")
        out.flush()
    while True:
        st = store.state("m")
        op = rng.random()
        if op < 0.85:
            out.write(f"begin commit {st.next_version}\n")
            out.flush()
            with store.staging() as s:
                for k in rng.sample(KEYS, rng.randint(1, 3)):
                    s.add(k, shard(rng))
                try:
                    head = store.commit(
                        "m", st.head, s, message=f"seed {seed}"
                    ).manifest.version
                except StaleParentError:
                    continue
        elif op < 0.93:
            target = rng.choice(st.versions)
            out.write(f"begin rollback {target}\n")
            out.flush()
            head = store.rollback("m", target)[1]
        else:
            out.write(f"begin gc {st.head}\n")
            out.flush()
            store.gc(keep_last=4)
            head = st.head
        out.write(f"ack {head}\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

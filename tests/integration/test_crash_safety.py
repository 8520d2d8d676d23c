"""A committing process killed with SIGKILL at random moments never corrupts
the store."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from param_server.store import Store

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def kill_at_random(
    store_dir: Path, seed: int, rng: random.Random
) -> tuple[int, int | None]:
    """Runs the child until a random moment.

    Returns (last acknowledged head, head of the operation in flight or None).
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.crash_child",
            str(store_dir),
            str(seed),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=False,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    buf = b""
    acked = 0
    deadline = time.monotonic() + 60
    kill_after: float | None = None
    while True:
        if kill_after is not None and time.monotonic() >= kill_after:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child made no progress in 60s")
        ready, _, _ = select.select([proc.stdout], [], [], 0.005)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"child exited early: {err}")
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [d.decode() for d in done]
            if kill_after is None and any(line.startswith("ack") for line in lines):
                acked_once = time.monotonic()
                kill_after = acked_once + rng.uniform(0.0, 0.25)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Lines already written before the kill still count as acknowledged.
    rest = os.read(proc.stdout.fileno(), 1 << 20) if proc.stdout else b""
    lines += [d.decode() for d in (buf + rest).split(b"\n") if d]
    proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()
    in_flight: int | None = None
    for line in lines:
        word, _, value = line.partition(" ")
        if word == "ack":
            acked, in_flight = int(value), None
        elif word == "begin":
            in_flight = int(value.split()[1])
    return acked, in_flight


def check_store(store_dir: Path, acked: int, in_flight: int | None) -> None:
    store = Store(store_dir)
    st = store.state("m")
    assert st.head in st.versions, f"HEAD {st.head} is not a live version"
    allowed = {acked} | ({in_flight} if in_flight is not None else set())
    assert st.head in allowed, (
        f"HEAD {st.head}, acknowledged {acked}, in flight {in_flight}"
    )
    problems = store.fsck()  # every live manifest parses; its blobs exist and match
    assert problems == [], problems
    assert store.get_manifest("m").version == st.head


def run_kills(tmp_path: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    store_dir = tmp_path / "store"
    for i in range(kills):
        acked, in_flight = kill_at_random(store_dir, seed * 1000 + i, rng)
        check_store(store_dir, acked, in_flight)
    # After all that, the store still takes commits and cleans up after crashes.
    store = Store(store_dir)
    store.gc(keep_last=2)
    assert store.fsck() == []
    assert list((store_dir / "tmp").iterdir()) == []


def test_sigkill_during_commits_50_times(tmp_path: Path) -> None:
    run_kills(tmp_path, kills=50, seed=1)


@pytest.mark.slow
def test_sigkill_during_commits_300_times(tmp_path: Path) -> None:
    run_kills(tmp_path, kills=300, seed=2)

"""What a new user meets first: the README's commands with their default,
relative paths, a read-only store, a second daemon on one store, a Redis
that will not start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from param_server.client import ParamClient
from param_server.core.errors import ReadOnlyStoreError
from param_server.launch.daemon import spawn_daemon
from param_server.store import Store
from tests.conftest import remount_read_only, tmpfs
from tests.helpers import raw_safetensors, wait_until

pytestmark = pytest.mark.integration


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "param_server.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def relative_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`param-server serve` started as the README says: no --store (so the
    relative default ./param-store), from a fresh directory."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "param_server.cli",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--port-file",
            "port",
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port_file = tmp_path / "port"
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"serve exited {proc.returncode}: {proc.stderr.read()}"  # type: ignore[union-attr]
                )
            assert time.monotonic() < deadline, "serve did not start within 60 s"
            time.sleep(0.05)
        yield proc, int(port_file.read_text())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_serve_with_the_default_relative_store_starts_and_announces(
    tmp_path: Path, relative_daemon: tuple[subprocess.Popen[str], int]
) -> None:
    _, port = relative_daemon
    assert (tmp_path / "param-store" / "STORE_ID").is_file()
    with ParamClient(f"127.0.0.1:{port}") as c:
        url = c.announce_url()
    assert url is not None and url.startswith("redis://127.0.0.1:")
    # Redis's working files live outside the store (which may be read-only).
    assert sorted(p.name for p in (tmp_path / "param-store" / "redis").iterdir()) == [
        "port"
    ]


def test_a_second_daemon_on_one_store_is_refused_with_its_own_status(
    tmp_path: Path, relative_daemon: tuple[subprocess.Popen[str], int]
) -> None:
    t0 = time.monotonic()
    p = cli("serve", "--listen", "127.0.0.1:0", cwd=tmp_path, timeout=60)
    assert p.returncode == 14, p.stderr
    assert "another param-server daemon is already serving the store" in p.stderr
    assert str(tmp_path / "param-store") in p.stderr
    assert time.monotonic() - t0 < 30  # refused up front, not after retries
    # The first one is untouched.
    with ParamClient(f"127.0.0.1:{relative_daemon[1]}") as c:
        assert c.list_models() == []


def test_a_redis_that_will_not_start_is_named_as_the_cause(tmp_path: Path) -> None:
    """Not 'pick another --listen address': what redis-server itself said."""
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir()
    # It writes two older lines to its log, then the real cause to stderr.
    fake.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --logfile ] && log="$2"; shift; done\n'
        'printf "starting\\nloading\\n" > "$log"\n'
        "echo 'FATAL: cannot open the log file: boom' >&2\n"
    )
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    p = cli("serve", "--listen", "127.0.0.1:0", cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 9, p.stderr
    assert "redis-server did not start" in p.stderr
    assert "cannot open the log file: boom" in p.stderr
    assert "--listen" not in p.stderr


def test_demo_store_may_be_relative(tmp_path: Path) -> None:
    p = cli(
        "demo",
        "--store",
        "./x",
        "--layers",
        "1",
        "--experts",
        "2",
        "--hidden",
        "32",
        "--rounds",
        "0",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert Store(tmp_path / "x").list_models() == ["tiny-mixtral"]


def _shard(data: bytes) -> dict[str, torch.Tensor]:
    return {"w": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def test_read_only_flag_serves_reads_and_refuses_writes(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with spawn_daemon(store) as d, ParamClient(d.target) as c:
        c.commit("m", 0, {"global": _shard(b"abc")})
    with (
        spawn_daemon(store, args=["--read-only"]) as d,
        ParamClient(d.target) as c,
    ):
        assert c.get_manifest("m").version == 1
        assert bytes(c.fetch_shards("m", ["global"])["global"]["w"].numpy()) == b"abc"
        with pytest.raises(ReadOnlyStoreError, match=r"FAILED_PRECONDITION.*read-only"):
            c.commit("m", 1, {"global": _shard(b"abd")})
        for call in (
            lambda: c.rollback("m", 1),
            lambda: c.set_pin("m", 1, True),
            lambda: c.collect_garbage(0, False),
        ):
            with pytest.raises(ReadOnlyStoreError):
                call()
    assert Store(store).head("m") == 1


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        yield mnt


def test_a_store_on_a_read_only_file_system_is_served(read_only_mount: Path) -> None:
    store = Store(read_only_mount / "store")
    with store.staging() as s:
        s.add("global", raw_safetensors({"w": b"abc"}))
        store.commit("m", 0, s)
    store.close()
    remount_read_only(read_only_mount)
    with spawn_daemon(store.root) as d, ParamClient(d.target, same_host=False) as c:
        assert c.get_manifest("m").version == 1
        assert c.fetch_shards("m", ["global"])["global"]["w"].tolist() == [97, 98, 99]
        assert c.announce_url() is not None  # its private Redis runs elsewhere
        with pytest.raises(ReadOnlyStoreError, match="read-only"):
            c.commit("m", 1, {"global": _shard(b"abd")})


def test_federate_with_relative_workdir_and_data_as_the_readme_says(
    tmp_path: Path,
) -> None:
    """`param-server federate --data ./fed-task` from the task's folder, with
    the default --workdir ./flower-run, through the deployment engine."""
    data = cli("fed-data", "./fed-task", "--model-out", "./fed-init", cwd=tmp_path)
    assert data.returncode == 0, data.stderr
    with spawn_daemon(tmp_path / "store") as d:
        imp = cli(
            "import",
            "./fed-init",
            "--model",
            "fed-moe",
            "--store",
            "./store",
            "--no-progress",
            cwd=tmp_path,
        )
        assert imp.returncode == 0, imp.stderr
        p = cli(
            "federate",
            "--model",
            "fed-moe",
            "--data",
            "./fed-task",
            "--rounds",
            "1",
            "--local-steps",
            "2",
            "--server",
            d.target,
            cwd=tmp_path,
            timeout=280,
        )
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "round 1: committed fed-moe@2" in p.stdout
        assert (tmp_path / "flower-run" / "flower" / "superlink.log").is_file()
        wait_until(lambda: Store(tmp_path / "store").head("fed-moe") == 2, 5, "HEAD")


def test_federate_institutions_own_text_files_in_lora_mode(tmp_path: Path) -> None:
    """`federate --institution NAME=PATH` for each institution's own text
    (relative paths, JSON Lines and CSV), text options for all of them with
    --node-config, LoRA from the command line, under the simulation engine."""
    import json

    from fed_clients.task import make_task, write_initial_checkpoint
    from tests.unit.test_text_data import _docs, _tokenizer_files

    task = make_task(tmp_path / "task", ("a",), train_docs=8, test_docs=4)
    ckpt = write_initial_checkpoint(task, tmp_path / "init", hidden=32)
    for name, data in _tokenizer_files(tmp_path).items():
        (ckpt / name).write_bytes(data)
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in _docs(30))
    )
    (tmp_path / "b.csv").write_text("text\n" + "".join(f"{d}\n" for d in _docs(30)))
    with spawn_daemon(tmp_path / "store") as d:
        imp = cli(
            *("import", "./init", "--model", "m", "--store", "./store"),
            "--no-progress",
            cwd=tmp_path,
        )
        assert imp.returncode == 0, imp.stderr
        args = ["federate", "--model", "m", "--server", d.target, "--rounds", "1"]
        p = cli(
            *args,
            *("--institution", "lab-a=./a.jsonl", "--institution", "lab-b=./b.csv"),
            *("--node-config", "seq-len=16", "--engine", "simulation"),
            *("--local-steps", "2", "--lora-rank", "4"),
            cwd=tmp_path,
            timeout=280,
        )
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "round 1: committed m@2 from lab-a, lab-b" in p.stdout
        with ParamClient(d.target) as c:
            fed = c.get_manifest("m", 2).metadata["federation"]
        assert fed["update_mode"] == "lora" and fed["lora"]["rank"] == 4
        bad = cli(*args, "--institution", "lab-c=./missing.jsonl", cwd=tmp_path)
        assert bad.returncode != 0 and "missing.jsonl does not exist" in bad.stderr
        both = cli(*args, cwd=tmp_path)
        assert both.returncode != 0 and "--institution NAME=PATH" in both.stderr

"""The param-server command line, run as a real process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from param_server.client import ParamClient
from param_server.launch.daemon import DaemonProcess, spawn_daemon
from tests.conftest import Checkpoint

pytestmark = pytest.mark.integration
COMMANDS = [
    "serve",
    "import",
    "export",
    "versions",
    "rollback",
    "pin",
    "gc",
    "fsck",
    "status",
    "demo",
    "fed-data",
    "fed-app",
    "federate",
    "check-variant",
]


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "param_server.cli", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}: {p.stderr}")
    return p


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_everywhere(command: str | None) -> None:
    p = cli(*([command] if command else []), "--help")
    assert p.returncode == 0 and "Usage:" in p.stdout
    if command is None:
        assert all(c in p.stdout for c in COMMANDS)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    store = tmp_path / "store"
    with spawn_daemon(store, log_level="info", stderr=subprocess.PIPE) as d:
        yield d, store


def test_serve_stops_gracefully_on_sigterm(daemon: tuple[DaemonProcess, Path]) -> None:
    d, _ = daemon
    with ParamClient(d.target) as c:
        assert c.list_models() == []
    assert d.stop() == 0  # SIGTERM, then a clean exit
    err = d.proc.stderr.read() if d.proc.stderr else ""
    assert "listening on 127.0.0.1:" in err and "received SIGTERM" in err


def test_serve_on_a_busy_port_exits_with_its_own_status(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = cli(
            "serve", "--store", str(tmp_path / "s"), "--listen", f"127.0.0.1:{port}"
        )
    assert p.returncode == 10, p.stderr
    assert "cannot listen on" in p.stderr


def test_bad_listen_address_is_a_usage_error(tmp_path: Path) -> None:
    p = cli("serve", "--store", str(tmp_path / "s"), "--listen", "nonsense")
    assert p.returncode == 2 and "host:port" in p.stderr


def test_admin_flow_offline_and_through_the_daemon(
    daemon: tuple[DaemonProcess, Path],
    checkpoints: dict[str, Checkpoint],
    tmp_path: Path,
) -> None:
    d, store = daemon
    target = d.target
    src = checkpoints["qwen3_moe-bfloat16"].path
    imp = ["import", str(src), "--model", "q", "--store", str(store), "--no-progress"]
    p = cli(*imp, "--message", "first", check=True)
    assert "q@1:" in p.stdout and "new blobs" in p.stdout
    cli(*imp, check=True)
    rows = json.loads(
        cli("versions", "q", "--server", target, "--json", check=True).stdout
    )
    assert [(r["version"], r["head"]) for r in rows] == [(1, False), (2, True)]
    assert rows[0]["message"] == "first"
    assert (
        "HEAD 2 -> 1"
        in cli("rollback", "q", "1", "--server", target, check=True).stdout
    )
    assert "*" in cli("versions", "q", "--store", str(store), check=True).stdout
    assert "[2]" in cli("pin", "q", "2", "--store", str(store), check=True).stdout
    assert (
        "would drop 0 versions"
        in cli(
            "gc", "--server", target, "--keep-last", "1", "--dry-run", check=True
        ).stdout
    )
    out = tmp_path / "exported"
    cli("export", "q", str(out), "--store", str(store), "--no-progress", check=True)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert "consistent" in cli("fsck", "--store", str(store), check=True).stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["versions", "ghost"], 3, "unknown model 'ghost'"),
        (["rollback", "ghost", "1"], 3, "unknown model"),
        (["versions", "../x"], 4, "invalid model name"),
        (["gc", "--keep-last", "0"], 4, "keep_last must be >= 1"),
        (["export", "ghost", "out"], 3, "unknown model"),
    ],
)
def test_errors_have_clear_messages_and_statuses(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    store = tmp_path / "store"
    from param_server.store import Store

    Store(store)
    p = cli(*args, "--store", str(store))
    assert p.returncode == code, p.stderr
    assert p.stderr.startswith("error: ") and message in p.stderr
    assert "Traceback" not in p.stderr


def test_gc_keep_last_zero_is_refused_the_same_offline_and_through_the_daemon(
    daemon: tuple[DaemonProcess, Path],
) -> None:
    d, store = daemon
    with ParamClient(d.target) as c:
        for data in (b"a", b"b", b"c"):
            head = c.head("m") if c.list_models() else 0
            w = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            c.commit("m", head, {"global": {"w": w}})
    for where in (["--store", str(store)], ["--server", d.target]):
        p = cli("gc", "--keep-last", "0", *where)
        assert p.returncode == 4, (where, p.stderr)
        assert "keep_last must be >= 1" in p.stderr
    with ParamClient(d.target) as c:
        assert [v.version for v in c.list_versions("m")] == [1, 2, 3]
        # Unset still means the documented default (10), not 0.
        from param_server.api.v1 import param_server_pb2 as pb

        r = c._conn.stubs[0].CollectGarbage(pb.CollectGarbageRequest(dry_run=True))
        assert list(r.dropped_versions) == []


def test_versions_escapes_control_characters_but_keeps_them_stored(
    daemon: tuple[DaemonProcess, Path],
) -> None:
    d, store = daemon
    message = "fine\nFAKE   99  line\x1b[31mred\x1b[0m\u202egnp.exe\r"
    with ParamClient(d.target) as c:
        w = torch.zeros(2)
        c.commit("m", 0, {"global": {"w": w}}, author="ev\x07il", message=message)
    for where in (["--store", str(store)], ["--server", d.target]):
        out = cli("versions", "m", *where, check=True).stdout
        assert not any(ch in out for ch in "\x1b\x07\r\u202e")
        assert out.count("\n") == 3  # the title, one version, the legend
        assert r"fine\nFAKE" in out and r"\x1b[31mred" in out and r"ev\x07il" in out
        rows = json.loads(cli("versions", "m", "--json", *where, check=True).stdout)
        assert rows[0]["message"] == message and rows[0]["author"] == "ev\x07il"


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("1e300GB", "cannot read"),
        ("infGB", "cannot read"),
        ("nan", "cannot read"),
        ("-5GB", "cannot read"),
        ("0", "from 1MB to 1024TiB"),
        ("10KB", "from 1MB to 1024TiB"),
        ("2048TiB", "from 1MB to 1024TiB"),
        ("5 parsecs", "cannot read"),
    ],
)
def test_bad_shard_sizes_are_usage_errors(tmp_path: Path, size: str, why: str) -> None:
    p = cli("export", "m", str(tmp_path / "out"), "--max-shard-size", size)
    assert p.returncode == 2, p.stderr
    assert why in p.stderr and "Traceback" not in p.stderr


def test_shard_sizes_take_decimal_and_binary_units() -> None:
    from param_server.cli import parse_size

    assert parse_size("1TB") == 10**12
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("2000000") == 2 * 10**6


def test_commands_print_their_result_once(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    src = checkpoints["mixtral-float32"].path
    store = str(tmp_path / "s")
    p = subprocess.run(  # default log level, as a user types it
        [
            *(sys.executable, "-m", "param_server.cli", "import", str(src)),
            *("--model", "m", "--store", store, "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("m@1: ") and p.stderr == ""


def test_import_of_a_corrupt_checkpoint(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    import shutil

    src = tmp_path / "broken"
    shutil.copytree(checkpoints["mixtral-float32"].path, src)
    victim = sorted(src.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-7])
    p = cli("import", str(src), "--model", "m", "--store", str(tmp_path / "s"))
    assert p.returncode == 4 and victim.name in p.stderr and "Traceback" not in p.stderr


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = cli("versions", "m", "--server", f"127.0.0.1:{port}")
    assert p.returncode == 8 and "UNAVAILABLE" in p.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end() -> None:
    # As a newcomer runs it: no --log-level, output piped.
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "param_server.cli",
            "demo",
            "--layers",
            "2",
            "--experts",
            "4",
            "--hidden",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # The story and nothing else: no library logs, bars or colour codes.
    assert p.stderr == "", p.stderr[-3000:]
    assert "\x1b[" not in p.stdout and "DEPRECATED" not in p.stdout
    steps = [ln.split(".")[0] for ln in p.stdout.splitlines() if ln[:1].isdigit()]
    assert steps == [str(i) for i in range(1, 15)]
    assert (
        "logits are identical" in p.stdout
        and "bit-exact to the checkpoint: True" in p.stdout
    )
    assert "the node swapped to it" in p.stdout and "the node followed" in p.stdout
    # The federated part: three rounds, both live nodes on each, loss down
    # (the demo exits non-zero otherwise).
    assert "3 rounds committed" in p.stdout
    assert p.stdout.count("node-2 serves @") == 3
    # Institutions' own text in LoRA mode: adapters, their bytes and each
    # institution's held-out loss in every round.
    assert "as JSON Lines" in p.stdout and "rank-8 adapters" in p.stdout
    assert p.stdout.count("KiB sent (") == 9
    assert p.stdout.count("held-out loss") >= 9 + 3


def test_fed_data_and_fed_app_write_a_task_and_a_flower_app(tmp_path: Path) -> None:
    import tomllib

    p = cli(
        "fed-data",
        str(tmp_path / "task"),
        "--institutions",
        "a,b",
        "--train-docs",
        "16",
        "--test-docs",
        "8",
        "--model-out",
        str(tmp_path / "init"),
        check=True,
    )
    assert "a: " in p.stdout and (tmp_path / "task" / "b" / "data.safetensors").exists()
    assert (tmp_path / "init" / "config.json").exists()
    assert "Writing model shards" not in p.stderr  # transformers' bar: -v only
    cli(
        "fed-app",
        str(tmp_path / "app"),
        "--model",
        "m",
        "--rounds",
        "5",
        "--strategy",
        "fedprox",
        check=True,
    )
    doc = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "param_server.federation.server:app",
        "clientapp": "fed_clients.app:app",
    }
    cfg = doc["tool"]["flwr"]["app"]["config"]
    assert cfg["num-rounds"] == 5 and cfg["strategy"] == "fedprox"
    # Bad settings are refused before anything is launched, with the reason.
    p = cli(
        "fed-app", str(tmp_path / "bad"), "--model", "m", "--dp-clipping-norm", "1.0"
    )
    assert p.returncode == 4 and "needs dense updates" in p.stderr
    p = cli("fed-data", str(tmp_path / "t2"), "--institutions", "../x")
    assert p.returncode == 4 and "invalid institution" in p.stderr


def test_check_variant_measures_a_variant_on_text(tmp_path: Path) -> None:
    """`check-variant` serves the model at full width and as its fp8 and int8
    experts, measures them on held-out text with the model's tokenizer, and
    exits 1 when the variant is worse than the thresholds asked for."""
    from fed_clients.task import make_task, write_initial_checkpoint
    from param_server.launch.daemon import spawn_daemon
    from param_server.store import Store
    from param_server.store.checkpoints import import_checkpoint
    from tests.unit.test_text_data import _docs, _tokenizer_files

    task = make_task(tmp_path / "task", ("a",), train_docs=8, test_docs=4)
    ckpt = write_initial_checkpoint(
        task, tmp_path / "ckpt", dtype="bfloat16", hidden=32
    )
    for name, data in _tokenizer_files(tmp_path).items():
        (ckpt / name).write_bytes(data)
    import_checkpoint(Store(tmp_path / "store"), ckpt, "m")
    text = tmp_path / "held.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(20)))
    with spawn_daemon(tmp_path / "store") as d:
        args = ("check-variant", "m", "--text", str(text), "--seq-len", "16")
        for width in ("fp8", "int8"):
            p = cli(*args, "--width", width, "--server", d.target, "--json")
            assert p.returncode in (0, 1), p.stderr
            q = json.loads(p.stdout)
            assert q["width"] == width and q["tokens"] > 0
            assert 0 < q["kl"] < 0.05 and q["top1"] > 0.8
            assert q["expert_bytes_variant"] < q["expert_bytes_full"]
            assert q["ok"] == (p.returncode == 0)
        strict = cli(*args, "--max-kl", "0", "--server", d.target)
        assert strict.returncode == 1 and "FAILED" in strict.stdout
        assert "KL" in strict.stdout and "top-1 agreement" in strict.stdout

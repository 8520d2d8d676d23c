"""Flower's deployment engine on one machine: a SuperLink, one SuperNode per
institution, `flwr run`, and a run status that is checked, not assumed.

What this automates is what an operator types (see the README):

    flower-superlink --insecure --disable-runtime-dependency-installation --port 9093
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \\
        --node-config "institution='hospital-a' data-path='/data/a.safetensors'"
    param-server fed-app ./moe-federation
    flwr run ./moe-federation local --run-config "model='tiny' num-rounds=3"

`flwr run` exits 0 even when the run fails, so `wait_for_run` reads the
run's status from `flwr ls --format json` and raises unless it finished
successfully.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from param_server.core.errors import ParamServerError
from param_server.server.redis_server import free_port

logger = logging.getLogger(__name__)

APP_NAME = "moe-federation"
SERVERAPP = "param_server.federation.server:app"
CLIENTAPP = "fed_clients.app:app"
CONNECTION = "local"


class FlowerRunError(ParamServerError):
    """A Flower run failed, or the SuperLink/SuperNodes could not be started."""


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def write_app(dest: str | os.PathLike[str], run_config: Mapping[str, Any]) -> Path:
    """Writes the Flower App folder `flwr run` packages: a pyproject.toml naming
    our ServerApp and ClientApp (installed with this package) and the run
    config defaults. Returns the folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "1.0.0"',
        'license = "Apache-2.0"',
        'description = "Federated rounds of an MoE model, committed to a param-server"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "moe-param-server"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVERAPP}"',
        f'clientapp = "{CLIENTAPP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f'"{k}" = {_toml_value(v)}' for k, v in run_config.items()]
    (dest / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return dest


def _bin(name: str) -> str:
    """The console script next to this interpreter, else one on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FlowerRunError(
            f"{name} not found; install Flower with `pip install 'flwr[simulation]"
            ">=1.42,<1.43'` (it comes with this package)"
        )
    return found


@dataclass(frozen=True, kw_only=True, slots=True)
class FlowerSecurity:
    """TLS on the SuperLink and, optionally, Flower's key-based SuperNode
    authentication (only SuperNodes whose public key was registered with
    `flwr supernode register` may connect)."""

    ca: Path
    """PEM CA certificate SuperNodes and the flwr CLI trust."""
    cert: Path
    """PEM certificate of the SuperLink (for the address SuperNodes dial)."""
    key: Path
    """PEM private key of `cert`."""
    node_auth: bool = True
    """Start the SuperLink with --enable-supernode-auth."""


def write_node_keypair(path: Path) -> Path:
    """Writes a SuperNode key pair (OpenSSH ECDSA P-384, what Flower accepts):
    the private key at `path` (mode 0600) and the public key at `path`.pub.
    Returns the public key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return pub


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes started as child processes on loopback.

    With `security`, the SuperLink serves TLS and (with node_auth) admits only
    registered SuperNodes: each institution's SuperNode gets a fresh key pair
    whose public key is registered before it starts.
    """

    workdir: Path
    institutions: Mapping[str, str]
    """Institution name -> its data path."""
    superlink_port: int = 0
    security: FlowerSecurity | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    """More environment for the SuperLink (and so the ServerApp), SuperNodes
    and flwr: e.g. PARAM_SERVER_TOKEN and PARAM_SERVER_CA for the ServerApp's
    connection to a secured param-server."""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Flower's processes run inside the work dir: every path they are
        # given must not depend on where the caller stands.
        self.workdir = Path(self.workdir).absolute()
        self.institutions = {
            name: os.path.abspath(path) for name, path in self.institutions.items()
        }

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ) | dict(self.extra_env)
        env["FLWR_HOME"] = str(self.workdir / "flwr-home")
        # The SuperLink and SuperNodes start Flower's other executables by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - kept open
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )

    def start(self) -> LocalDeployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        self.superlink_port = self.superlink_port or free_port()
        sec = self.security
        transport = (
            f"root-certificates = {json.dumps(str(sec.ca))}\n"
            if sec
            else "insecure = true\n"
        )
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n{transport}'
        )
        tls = (
            ["--ssl-certfile", str(sec.cert), "--ssl-keyfile", str(sec.key)]
            + ["--ssl-ca-certfile", str(sec.ca)]
            + (["--enable-supernode-auth"] if sec.node_auth else [])
            if sec
            else ["--insecure"]
        )
        self._spawn(
            "superlink",
            [
                _bin("flower-superlink"),
                *tls,
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.superlink_port),
                "--database",
                str(self.workdir / "superlink.db"),
            ],
        )
        for name, data in self.institutions.items():
            self.add_supernode(name, data)
        return self

    @property
    def address(self) -> str:
        """Where SuperNodes and the flwr CLI reach the SuperLink (the name
        its TLS certificate must carry)."""
        host = "localhost" if self.security else "127.0.0.1"
        return f"{host}:{self.superlink_port}"

    def register(self, public_key: Path, name: str, timeout: float = 60) -> None:
        """`flwr supernode register --name NAME`: lets the SuperNode with this
        key in; rounds record its updates under `name`.

        Raises:
            FlowerRunError: the SuperLink refused or did not answer in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            r = self.flwr(
                "supernode",
                "register",
                str(Path(public_key).absolute()),
                CONNECTION,
                "--name",
                name,
                "--format",
                "json",
            )
            try:
                if json.loads(r.stdout).get("success"):
                    return
            except json.JSONDecodeError:
                pass
            if time.monotonic() > deadline:
                raise FlowerRunError(
                    f"could not register SuperNode key {public_key}: "
                    f"{r.stdout.strip()} {r.stderr.strip()[-2000:]}"
                )
            time.sleep(0.5)  # the SuperLink may still be starting

    def add_supernode(
        self,
        institution: str,
        data_path: str,
        *,
        registered: bool = True,
        node_config: Mapping[str, str] | None = None,
    ) -> None:
        """Starts a SuperNode for `institution`. Under node authentication it
        gets a fresh key, registered under that name first unless `registered`
        is False (a stranger the SuperLink must refuse). `node_config` adds to
        (or overrides) its `institution` and `data-path` node config."""
        sec = self.security
        auth: list[str] = ["--insecure"]
        if sec is not None:
            auth = ["--root-certificates", str(sec.ca)]
            if sec.node_auth:
                key = self.workdir / "keys" / institution
                pub = write_node_keypair(key)
                if registered:
                    self.register(pub, institution)
                auth += ["--auth-supernode-private-key", str(key)]
        config = {"institution": institution, "data-path": os.path.abspath(data_path)}
        config |= dict(node_config or {})
        self._spawn(
            f"supernode-{institution}",
            [
                _bin("flower-supernode"),
                *auth,
                "--superlink",
                self.address,
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                " ".join(f"{k}={_toml_value(v)}" for k, v in config.items()),
            ],
        )

    def supernodes(self) -> list[dict[str, Any]]:
        """`flwr supernode ls`: the SuperNodes the SuperLink knows, with status."""
        r = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError as e:
            raise FlowerRunError(f"flwr supernode ls gave no JSON: {r.stderr}") from e
        nodes: list[dict[str, Any]] = doc.get("nodes", [])
        return nodes

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kills one of our processes (e.g. a SuperNode, to test a dying client)."""
        p = self.procs[name]
        if p.poll() is None:
            os.killpg(p.pid, sig)
            p.wait(10)

    def flwr(
        self, *args: str, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_bin("flwr"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            cwd=self.workdir,
        )

    def submit(self, app_dir: Path, run_config: Mapping[str, Any] | None = None) -> int:
        """`flwr run`; returns the run id."""
        args = ["run", str(Path(app_dir).absolute()), CONNECTION, "--format", "json"]
        if run_config:
            args += [
                "--run-config",
                " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items()),
            ]
        deadline = time.monotonic() + 60
        while True:
            r = self.flwr(*args)
            try:
                doc = json.loads(r.stdout)
            except json.JSONDecodeError:
                doc = {}
            if doc.get("success") and "run-id" in doc:
                return int(doc["run-id"])
            if time.monotonic() > deadline:
                raise FlowerRunError(
                    f"flwr run failed (exit {r.returncode}): {r.stdout.strip()} "
                    f"{r.stderr.strip()[-2000:]}"
                )
            time.sleep(0.5)  # the SuperLink may still be starting

    def run_status(self, run_id: int) -> dict[str, Any]:
        r = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            doc = json.loads(r.stdout)
        except json.JSONDecodeError as e:
            raise FlowerRunError(f"flwr ls gave no JSON: {r.stdout} {r.stderr}") from e
        runs = doc.get("runs") or []
        if not doc.get("success", False) or not runs:
            raise FlowerRunError(f"flwr ls failed: {doc}")
        run: dict[str, Any] = runs[0]
        return run

    def wait_for_run(self, run_id: int, timeout: float = 600) -> dict[str, Any]:
        """Waits until the run finishes; raises FlowerRunError unless it succeeded."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run_status(run_id)
            status = str(run.get("status", ""))
            if status.startswith("finished"):
                if status != "finished:completed":
                    raise FlowerRunError(
                        f"run {run_id} ended as {status!r}; see "
                        f"{self.workdir / 'superlink.log'} and `flwr log {run_id}`"
                    )
                return run
            if time.monotonic() > deadline:
                raise FlowerRunError(
                    f"run {run_id} still {status!r} after {timeout:g}s"
                )
            for name, p in self.procs.items():
                if name == "superlink" and p.poll() is not None:
                    raise FlowerRunError(
                        f"the SuperLink exited with status {p.returncode}; see "
                        f"{self.workdir / 'superlink.log'}"
                    )
            time.sleep(0.5)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        for log in self._logs:
            log.close()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

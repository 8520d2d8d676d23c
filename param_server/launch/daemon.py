"""Running the param-server daemon as a child process (demo, benchmarks, tests)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from param_server.core.errors import UnavailableError


class DaemonProcess:
    """A `param-server serve` child listening on a free loopback port.

    Use as a context manager: leaving it stops the daemon with SIGTERM (and
    kills it if it does not stop within `grace` seconds).
    """

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_daemon(
    store: str | Path,
    *,
    log_level: str = "warning",
    stderr: int | IO[str] | None = None,
    timeout: float = 60.0,
    redis_url: str | None = None,
    announce: bool = True,
    port: int = 0,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> DaemonProcess:
    """Starts `param-server serve --listen 127.0.0.1:PORT` and waits until it serves.

    Versions are announced on `redis_url`, or on a private redis-server when
    None (unless `announce` is off). `args` are more `serve` options
    (--tokens-file, --tls-cert, ...); `env` replaces the environment.

    Raises:
        UnavailableError: it exited or did not start within `timeout` seconds.
    """
    tmp = Path(tempfile.mkdtemp(prefix="param-server-port-"))
    port_file = tmp / "port"
    cmd = [
        sys.executable,
        "-m",
        "param_server.cli",
        "--log-level",
        log_level,
        "serve",
        "--store",
        str(Path(store).absolute()),
        "--listen",
        f"127.0.0.1:{port}",
        "--port-file",
        str(port_file),
    ]
    if not announce:
        cmd.append("--no-announce")
    elif redis_url is not None:
        cmd += ["--redis", redis_url]
    cmd += list(args)
    proc = subprocess.Popen(
        cmd, stderr=stderr, text=True, env=dict(env) if env is not None else None
    )
    try:
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if proc.poll() is not None:
                raise UnavailableError(
                    f"the daemon exited with status {proc.returncode} before serving"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise UnavailableError(
                    f"the daemon did not start within {timeout:.0f}s"
                )
            time.sleep(0.02)
        return DaemonProcess(proc, int(port_file.read_text()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""A private `redis-server` on a free loopback port, started and supervised."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from param_server.core.backoff import Backoff
from param_server.core.errors import RedisMissingError, RedisStartError

__all__ = ["EmbeddedRedis", "RedisMissingError", "RedisStartError", "free_port"]

logger = logging.getLogger(__name__)


def _die_with_parent() -> None:
    """Runs in the child: SIGTERM it when the process that started it dies
    (even by SIGKILL), so a private Redis never outlives its daemon."""
    # Not on Linux, stop() still ends it.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # below: the well-known and most registered service ports


def _ephemeral_ports() -> range:
    """The ports the kernel hands out as source ports of outgoing connections."""
    try:
        lo, hi = (int(x) for x in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999  # Linux's default
    return range(lo, hi + 1)


def free_port(rng: random.Random | None = None) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the kernel's
    ephemeral range when there is room.

    A server that is restarted on the same port (a supervised Redis, a daemon
    that comes back where its clients look) must not sit in that range: while
    it is down, any outgoing connection may be given its port as a source
    port, and a client retrying against it may even connect to itself (TCP
    simultaneous open), so the restart finds the port taken.
    """
    rng = rng or random.SystemRandom()
    eph = _ephemeral_ports()
    spans = [r for r in (range(_LOWEST, eph.start), range(eph.stop, 65536)) if r]
    for _ in range(64 if spans else 0):
        span = rng.choices(spans, weights=[len(r) for r in spans])[0]
        port = rng.choice(span)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): try another
            return port
    with socket.socket() as s:  # no room outside it: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A `redis-server` child bound to 127.0.0.1, without persistence.

    With `supervise` a thread restarts it on the same port if it dies, so
    clients reconnect to the same URL.

    Args:
        port: the port (0 picks a free one).
        supervise: restart the server when it exits unexpectedly.
        binary: the executable (found on PATH by default).
        password: require this password (AUTH) from clients.
        workdir: its working directory and log (kept; made absolute, since
            redis-server changes into it before opening its log); default a
            temporary directory, removed on `stop`.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        supervise: bool = True,
        binary: str | None = None,
        password: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisMissingError(
                "redis-server is not installed; install it (Debian/Ubuntu: "
                "apt-get install redis-server) or give the URL of a running Redis "
                "with --redis redis://host:port"
            )
        self.binary = found
        self._password = password
        self.port = port
        self.supervise = supervise
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._own_dir = workdir is None
        self._dir = (
            workdir or Path(tempfile.mkdtemp(prefix="param-server-redis-"))
        ).absolute()
        self._stderr = ""
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        auth = f":{self._password}@" if self._password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Starts the server and waits until it answers PING.

        Raises:
            RedisStartError: it did not come up (three ports tried when the
                port was picked here); the message has what it reported.
        """
        self._stopping.clear()
        tries = 3 if self.port == 0 else 1
        for attempt in range(tries):
            port = self.port or free_port()
            if self._spawn(port, timeout):
                self.port = port
                break
            if attempt == tries - 1:
                raise RedisStartError(
                    f"redis-server did not start on 127.0.0.1:{port}"
                    f"{self._log_tail()}; see its log in "
                    f"{self._dir / 'redis.log'}"
                )
        if self.supervise and self._watch is None:
            self._watch = threading.Thread(
                target=self._supervise, name="redis-supervisor", daemon=True
            )
            self._watch.start()
        return self

    def _log_tail(self) -> str:
        """What redis-server said last (e.g. that the port is in use), or ''.

        Its stderr last: that is where it writes when it cannot open its log,
        so it must not be hidden behind older log lines.
        """
        try:
            lines = (self._dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        lines += self._stderr.splitlines()
        said = [ln.strip() for ln in lines if ln.strip()]
        return f" ({' / '.join(ln[-200:] for ln in said[-2:])})" if said else ""

    def _spawn(self, port: int, timeout: float) -> bool:
        cmd = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--protected-mode",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self._dir),
            "--logfile",
            str(self._dir / "redis.log"),
        ]
        self._dir.mkdir(parents=True, exist_ok=True)
        conf = None
        if self._password:
            # In a private file, not on the command line (where ps shows it).
            conf = self._dir / "redis.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f'requirepass "{self._password}"\n')
            cmd.insert(1, str(conf))
        # Its stderr goes to an anonymous file, read only if it fails (a
        # pipe nobody drains could block it).
        with tempfile.TemporaryFile() as err:
            with self._lock:
                self._proc = subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=_die_with_parent,
                )
                proc = self._proc
            if self._wait_ready(proc, port, timeout):
                return True
            err.seek(0)
            self._stderr = err.read(8192).decode(errors="replace")
            return False

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], port: int, timeout: float
    ) -> bool:
        """Waits until it answers PING; kills it if it does not in time."""
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self._password,
            socket_connect_timeout=0.5,
            socket_timeout=1,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        logger.info("redis-server (pid %d) on port %d", proc.pid, port)
                        return True
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.02)
        finally:
            client.close()
        proc.kill()
        proc.wait()
        return False

    def _supervise(self) -> None:
        backoff = Backoff(0.05, 5.0)
        while not self._stopping.wait(0.1):
            with self._lock:
                proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            logger.warning(
                "redis-server exited with status %s; restarting it on port %d",
                proc.returncode,
                self.port,
            )
            try:
                if self._spawn(self.port, 10.0):
                    self.restarts += 1
                    backoff.reset()
                    continue
            except OSError as e:
                logger.error("cannot restart redis-server: %s", e)
            backoff.sleep(self._stopping)

    def kill(self) -> None:
        """SIGKILLs the server (tests of outages; the supervisor restarts it)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGKILL)
                self._proc.wait()

    def stop(self) -> None:
        """Stops the server and its supervisor; removes its directory."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.join(timeout=10)
            self._watch = None
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        if self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

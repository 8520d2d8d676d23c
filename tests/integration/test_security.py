"""Tokens, roles, TLS, mutual TLS and stream limits on a real gRPC server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import param_server.client.channel
from param_server.api.convert import SERVICE_NAME
from param_server.api.v1 import param_server_pb2 as pb
from param_server.client import ParamClient
from param_server.core.auth import Credentials
from param_server.core.errors import (
    AuthenticationError,
    BusyError,
    InvalidInputError,
    PermissionDeniedError,
    UnavailableError,
)
from param_server.launch.daemon import spawn_daemon
from param_server.server.config import ServerConfig
from param_server.server.security import TokenTable, hash_token, new_token
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint
from tests.conftest import Checkpoint
from tests.helpers import raw_safetensors, wait_until
from tests.tls import Pki, make_pki

pytestmark = pytest.mark.integration

ROLES = ("reader", "writer", "admin")


@dataclass
class Secure:
    target: str
    store: Store
    tokens: dict[str, str]
    pki: Pki | None
    servicer: object

    def client(self, token: str | None, **kw: object) -> ParamClient:
        creds = kw.pop("credentials", None) or (
            Credentials.from_files(token=token, ca=self.pki.ca)
            if self.pki
            else Credentials(token=token)
        )
        return ParamClient(
            self.target,
            credentials=creds,  # type: ignore[arg-type]
            same_host=False,
            retries=0,
            **kw,  # type: ignore[arg-type]
        )


def start(tmp_path: Path, pki: Pki | None = None, **cfg: object) -> Iterator[Secure]:
    tokens = {r: new_token() for r in ROLES} | {"m1-admin": new_token()}
    entries = [
        {"name": r, "role": r, "sha256": hash_token(tokens[r])} for r in ROLES
    ] + [
        {
            "name": "m1-admin",
            "role": "admin",
            "models": ["m1"],
            "sha256": hash_token(tokens["m1-admin"]),
        }
    ]
    config = ServerConfig(
        store=tmp_path / "store",
        listen="127.0.0.1:0",
        tokens=TokenTable(entries, "test"),
        tls_cert=pki.cert if pki else None,
        tls_key=pki.key if pki else None,
        **cfg,  # type: ignore[arg-type]
    )
    srv, port, _ = create_server(config)
    srv.start()
    store = Store(tmp_path / "store")
    for m in ("m1", "m2"):
        with store.staging() as s:
            s.add("global", raw_safetensors({"w": b"\x01" * 64}))
            store.commit(m, 0, s)
    try:
        yield Secure(f"127.0.0.1:{port}", store, tokens, pki, srv)
    finally:
        srv.stop(0).wait()


@pytest.fixture
def secure(tmp_path: Path) -> Iterator[Secure]:
    yield from start(tmp_path)


def shard(b: int) -> dict[str, bytes]:
    return {"global": raw_safetensors({"w": bytes([b]) * 64})}


def test_every_call_needs_a_valid_token(secure: Secure) -> None:
    for token in (None, new_token()):
        with secure.client(token) as c:
            for call in (
                c.list_models,
                lambda c=c: c.get_manifest("m1"),
                lambda c=c: c.fetch_shards("m1", ["global"]),
                lambda c=c: c.commit("m1", 1, shard(2)),
                lambda c=c: c.rollback("m1", 1),
                lambda c=c: c.collect_garbage(dry_run=True),
            ):
                with pytest.raises(AuthenticationError, match="UNAUTHENTICATED"):
                    call()
    assert secure.store.head("m1") == 1


def test_each_role_may_do_its_part_and_no_more(secure: Secure) -> None:
    t = secure.tokens
    with secure.client(t["reader"]) as c:
        assert c.list_models() == ["m1", "m2"]
        assert c.fetch_shards("m1", ["global"])["global"]["w"].numel() == 64
        with pytest.raises(PermissionDeniedError, match="needs the writer role"):
            c.commit("m1", 1, shard(2))
    with secure.client(t["writer"]) as c:
        assert c.commit("m1", 1, shard(2)).manifest.version == 2
        with pytest.raises(PermissionDeniedError, match="needs the admin role"):
            c.rollback("m1", 1)
        with pytest.raises(PermissionDeniedError):
            c.set_pin("m1", 1)
    with secure.client(t["admin"]) as c:
        assert c.rollback("m1", 1) == (2, 1)
        c.collect_garbage(dry_run=True)
    assert secure.store.head("m1") == 1


def test_a_token_limited_to_one_model(secure: Secure) -> None:
    with secure.client(secure.tokens["m1-admin"]) as c:
        assert c.list_models() == ["m1"]  # the other model is not even listed
        c.commit("m1", 1, shard(3))
        c.rollback("m1", 1)
        with pytest.raises(PermissionDeniedError, match=r"limited to \['m1'\]"):
            c.get_manifest("m2")
        with pytest.raises(PermissionDeniedError, match=r"limited to \['m1'\]"):
            c.commit("m2", 1, shard(3))
        with pytest.raises(PermissionDeniedError, match="without a model limit"):
            c.collect_garbage(dry_run=True)
    assert secure.store.head("m2") == 1


def test_commit_is_refused_before_its_payload_is_read(secure: Secure) -> None:
    """A reader streaming a commit is stopped at the first message: nothing
    is staged, whatever it sends after."""
    with grpc.insecure_channel(secure.target) as ch:
        call = ch.stream_unary(
            f"/{SERVICE_NAME}/Commit",
            request_serializer=pb.CommitRequest.SerializeToString,
            response_deserializer=pb.CommitResponse.FromString,
        )
        sent = []

        def requests() -> Iterator[pb.CommitRequest]:
            for i in range(1000):
                sent.append(i)
                yield pb.CommitRequest(data=b"x" * 65536)

        with pytest.raises(grpc.RpcError) as e:
            call(
                requests(),
                metadata=[("authorization", f"Bearer {secure.tokens['reader']}")],
                timeout=10,
            )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(sent) < 1000
    assert list((secure.store.root / "tmp").iterdir()) == []


def test_a_token_is_never_sent_in_plaintext_to_another_host() -> None:
    with pytest.raises(InvalidInputError, match="plaintext"):
        ParamClient("10.255.255.1:50051", credentials=Credentials(token="t"))
    with pytest.raises(InvalidInputError, match="plaintext"):
        ParamClient.from_url("grpc://example.com:443", Credentials(token="t"))
    # With TLS (no connection is made until the first call).
    ParamClient.from_url("grpcs://example.com:443", Credentials(token="t")).close()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def test_tls_with_tokens(tmp_path: Path, pki: Pki) -> None:
    for srv in start(tmp_path, pki):
        with srv.client(srv.tokens["writer"]) as c:
            assert c.list_models() == ["m1", "m2"]
            c.commit("m1", 1, shard(4))
            m = c.get_manifest("m1")
            assert bytes(c.fetch_blobs(m, ["global"])["global"])[-64:] == b"\x04" * 64
        # A plaintext client cannot talk to the TLS port.
        with (
            ParamClient(srv.target, retries=0, timeout=3) as plain,
            pytest.raises(UnavailableError),
        ):
            plain.list_models()
        # A client that does not trust the server's CA refuses it.
        other = make_pki(tmp_path, "other")
        creds = Credentials.from_files(token=srv.tokens["reader"], ca=other.ca)
        with (
            srv.client(None, credentials=creds, timeout=3) as c,
            pytest.raises(UnavailableError),
        ):
            c.list_models()


def test_mutual_tls_needs_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    for srv in start(tmp_path, pki, tls_client_ca=pki.ca):
        tok = srv.tokens["reader"]
        with srv.client(tok, timeout=3) as c, pytest.raises(UnavailableError):
            c.list_models()  # no client certificate
        other = make_pki(tmp_path, "other")
        wrong = Credentials.from_files(
            token=tok, ca=pki.ca, cert=other.client_cert, key=other.client_key
        )
        with (
            srv.client(None, credentials=wrong, timeout=3) as c,
            pytest.raises(UnavailableError),
        ):
            c.list_models()  # a certificate from a CA the server does not trust
        good = Credentials.from_files(
            token=tok, ca=pki.ca, cert=pki.client_cert, key=pki.client_key
        )
        with srv.client(None, credentials=good) as c:
            assert c.list_models() == ["m1", "m2"]


def test_daemon_with_tls_and_tokens_through_the_cli(tmp_path: Path, pki: Pki) -> None:
    """`token create`, `serve --tokens-file --tls-*`, and the admin commands
    with --token/--ca-cert; the token never shows in the daemon's log."""
    tokens_file = tmp_path / "tokens.toml"
    cli = [sys.executable, "-m", "param_server.cli"]
    made = {}
    for role in ("reader", "admin"):
        r = subprocess.run(
            [
                *cli,
                "token",
                "create",
                "--name",
                f"ops-{role}",
                "--role",
                role,
                "--tokens-file",
                str(tokens_file),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        made[role] = r.stdout.strip()
        assert "shown only now" in r.stderr
    assert tokens_file.stat().st_mode & 0o077 == 0
    assert made["reader"] not in tokens_file.read_text()
    dup = subprocess.run(
        [
            *cli,
            "token",
            "create",
            "--name",
            "ops-reader",
            "--role",
            "reader",
            "--tokens-file",
            str(tokens_file),
        ],
        capture_output=True,
        text=True,
    )
    assert dup.returncode == 4 and "already has a token named" in dup.stderr

    store = Store(tmp_path / "store")
    with store.staging() as s:
        s.add("global", raw_safetensors({"w": b"\x01" * 8}))
        store.commit("m", 0, s)
    with store.staging() as s:
        s.add("global", raw_safetensors({"w": b"\x02" * 8}))
        store.commit("m", 1, s)
    log = tmp_path / "daemon.log"
    args = ["--tokens-file", str(tokens_file), "--tls-cert", str(pki.cert)]
    args += ["--tls-key", str(pki.key)]
    with (
        log.open("w") as err,
        spawn_daemon(
            tmp_path / "store", announce=False, log_level="info", stderr=err, args=args
        ) as d,
    ):
        target = f"localhost:{d.port}"
        base = [*cli, "rollback", "m", "1", "--server", target]
        base += ["--ca-cert", str(pki.ca)]
        denied = subprocess.run(
            [*base, "--token", made["reader"]], capture_output=True, text=True
        )
        assert denied.returncode == 13, denied.stderr
        assert "needs the admin role" in denied.stderr
        anon = subprocess.run(base, capture_output=True, text=True)
        assert anon.returncode == 12 and "needs a token" in anon.stderr
        ok = subprocess.run(
            base,
            capture_output=True,
            text=True,
            env=dict(os.environ, PARAM_SERVER_TOKEN=made["admin"]),
        )
        assert ok.returncode == 0, ok.stderr
        assert "HEAD 2 -> 1" in ok.stdout
    text = log.read_text()
    assert "TLS, 2 tokens" in text and "denied ops-reader" in text
    assert made["reader"] not in text and made["admin"] not in text


def test_non_loopback_without_auth_needs_an_explicit_flag(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "param_server.cli",
            "serve",
            "--no-announce",
            "--store",
            str(tmp_path / "s"),
            "--listen",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "without tokens" in r.stderr and "--allow-unauthenticated" in r.stderr


def test_streams_beyond_the_limit_are_refused_as_busy_then_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one stream slot taken by a client that stopped reading, another
    fetch is refused as busy (retried, then given up); once the stalled stream
    is cancelled for idleness the slot is free again."""
    srv, port, _ = create_server(
        ServerConfig(
            store=tmp_path / "store",
            listen="127.0.0.1:0",
            max_workers=4,
            max_streams=1,
            idle_timeout=1.5,
        )
    )
    srv.start()
    try:
        store = Store(tmp_path / "store")
        with store.staging() as s:
            s.add("big", raw_safetensors({"w": b"\x07" * (64 << 20)}))
            store.commit("m", 0, s)
        target = f"127.0.0.1:{port}"
        ch = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 8 << 20)]
        )
        stalled = ch.unary_stream(
            f"/{SERVICE_NAME}/FetchShards",
            request_serializer=pb.FetchShardsRequest.SerializeToString,
            response_deserializer=None,
        )(pb.FetchShardsRequest(model="m", shard_keys=["big"]), timeout=60)
        next(stalled)  # the header; then it reads nothing more
        monkeypatch.setattr(param_server.client.channel, "BUSY_PATIENCE", 0.3)
        with ParamClient(target, same_host=False, retries=0) as c:
            with pytest.raises(BusyError, match="server busy"):
                c.fetch_shards("m", ["big"])
            # The idle stream is cancelled, and the next fetch gets the slot.
            monkeypatch.setattr(param_server.client.channel, "BUSY_PATIENCE", 10.0)
            t0 = time.monotonic()
            got = c.fetch_shards("m", ["big"])["big"]["w"]
            assert got.numel() == 64 << 20
            assert 1.0 < time.monotonic() - t0 < 10
            with pytest.raises(grpc.RpcError) as e:
                list(stalled)  # what was in flight, then the cancellation
            assert e.value.code() == grpc.StatusCode.CANCELLED
        ch.close()
    finally:
        srv.stop(0).wait()


def test_a_stalled_commit_is_cancelled_and_stages_nothing(tmp_path: Path) -> None:
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "store", listen="127.0.0.1:0", idle_timeout=1.0)
    )
    srv.start()
    try:
        stop = threading.Event()

        def requests() -> Iterator[pb.CommitRequest]:
            yield pb.CommitRequest(header=pb.CommitHeader(model="m"))
            yield pb.CommitRequest(begin=pb.UploadBegin(key="global", size=1 << 20))
            yield pb.CommitRequest(data=b"x" * 1000)
            stop.wait(30)  # then says nothing

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.stream_unary(
                f"/{SERVICE_NAME}/Commit",
                request_serializer=pb.CommitRequest.SerializeToString,
                response_deserializer=pb.CommitResponse.FromString,
            )
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                call(requests(), timeout=60)
            stop.set()
        assert e.value.code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - t0 < 10
        store = Store(tmp_path / "store")
        assert store.list_models() == []
        wait_until(
            lambda: list((tmp_path / "store" / "tmp").iterdir()) == [],
            5,
            "staging to be cleaned",
        )
    finally:
        srv.stop(0).wait()


def test_checkpoint_import_then_tls_fetch_is_bit_exact(
    tmp_path: Path, pki: Pki, checkpoints: dict[str, Checkpoint]
) -> None:
    for srv in start(tmp_path, pki):
        import_checkpoint(srv.store, checkpoints["mixtral-bfloat16"].path, "mx")
        with srv.client(srv.tokens["reader"], streams=2) as c:
            m = c.get_manifest("mx")
            got = c.fetch_blobs(m, list(m.shards))
        for key, buf in got.items():
            stored = srv.store.blob_path(m.shards[key].digest).read_bytes()
            assert bytes(buf) == stored


def test_a_slow_durable_commit_is_not_taken_for_an_idle_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the client has sent everything, the server's own work (fsyncs of
    a large commit) does not count as idleness."""
    real = Store.commit

    def slow_commit(self: Store, *a: object, **kw: object):  # type: ignore[no-untyped-def]
        time.sleep(2.5)
        return real(self, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "commit", slow_commit)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "store", listen="127.0.0.1:0", idle_timeout=0.5)
    )
    srv.start()
    try:
        with ParamClient(f"127.0.0.1:{port}", same_host=False) as c:
            r = c.commit("m", 0, shard(5))
            assert r.manifest.version == 1 and c.head("m") == 1
    finally:
        srv.stop(0).wait()


def test_tokens_are_revoked_and_added_on_sighup(tmp_path: Path) -> None:
    old, new = new_token(), new_token()

    def entry(name: str, tok: str) -> str:
        digest = hash_token(tok)
        return f'[[token]]\nname = "{name}"\nrole = "reader"\nsha256 = "{digest}"\n'

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry("old", old))
    Store(tmp_path / "store")
    log = tmp_path / "daemon.log"
    with (
        log.open("w") as err,
        spawn_daemon(
            tmp_path / "store",
            announce=False,
            log_level="info",
            stderr=err,
            args=["--tokens-file", str(tokens)],
        ) as d,
    ):

        def works(tok: str) -> bool:
            with ParamClient(d.target, credentials=Credentials(token=tok)) as c:
                try:
                    c.list_models()
                    return True
                except AuthenticationError:
                    return False

        assert works(old) and not works(new)
        tokens.write_text(entry("new", new))  # "old" revoked
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: not works(old), 10, "the old token to be refused")
        assert works(new)
        tokens.write_text('[[token]]\nname = "x"\ntoken = "plain"\n')
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "kept the tokens in use" in log.read_text(), 10, "the log")
        assert works(new) and d.proc.poll() is None

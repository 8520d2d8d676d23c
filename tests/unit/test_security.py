"""Tokens, roles, model limits and the daemon's start-up rules, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from param_server.core.auth import Credentials, Role
from param_server.core.errors import (
    AuthenticationError,
    InvalidInputError,
    PermissionDeniedError,
)
from param_server.server.config import ServerConfig
from param_server.server.security import (
    ANY_MODEL,
    Authorizer,
    TokenTable,
    bearer_token,
    hash_token,
    is_local_peer,
    new_token,
)


def table(*entries: dict[str, object]) -> TokenTable:
    return TokenTable(list(entries), "test")


def entry(name: str, role: str, token: str, **kw: object) -> dict[str, object]:
    return {"name": name, "role": role, "sha256": hash_token(token), **kw}


def md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


LOCAL = "ipv4:127.0.0.1:5000"


def test_tokens_are_random_and_kept_only_as_hashes(tmp_path: Path) -> None:
    a, b = new_token(), new_token()
    assert a != b and len(a) > 40
    f = tmp_path / "tokens.toml"
    f.write_text(
        f'[[token]]\nname = "n"\nrole = "reader"\nsha256 = "{hash_token(a)}"\n'
    )
    t = TokenTable.load(f)
    p = t.authenticate(a)
    assert p is not None and p.name == "n" and p.role == Role.READER
    assert t.authenticate(b) is None
    assert t.authenticate(hash_token(a)) is None  # the hash is not the token
    assert a not in repr(Credentials(token=a))


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([{"name": "x", "role": "reader", "token": "secret"}], "plain token"),
        ([{"name": "x", "role": "root", "sha256": "0" * 64}], "unknown role"),
        ([{"name": "x", "role": "reader", "sha256": "abc"}], "64 hex"),
        ([{"name": "", "role": "reader", "sha256": "0" * 64}], "unique, non-empty"),
        (
            [
                {"name": "x", "role": "reader", "sha256": "0" * 64},
                {"name": "x", "role": "admin", "sha256": "1" * 64},
            ],
            "unique",
        ),
        (
            [{"name": "x", "role": "reader", "sha256": "0" * 64, "models": ["../a"]}],
            "invalid model name",
        ),
        ([{"name": "x", "role": "reader", "sha256": "0" * 64, "extra": 1}], "unknown"),
        ([], "no tokens"),
    ],
)
def test_bad_tokens_files_are_refused(
    entries: list[dict[str, object]], why: str
) -> None:
    with pytest.raises(InvalidInputError, match=why):
        TokenTable(entries, "tokens.toml")


def test_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    tok = new_token()
    monkeypatch.setenv("PARAM_SERVER_TOKENS", json.dumps([entry("a", "admin", tok)]))
    t = TokenTable.from_env()
    assert t is not None and t.authenticate(tok) is not None
    monkeypatch.setenv("PARAM_SERVER_TOKENS", "{not json")
    with pytest.raises(InvalidInputError, match="not JSON"):
        TokenTable.from_env()
    monkeypatch.delenv("PARAM_SERVER_TOKENS")
    assert TokenTable.from_env() is None


def test_roles_include_lower_ones_and_model_limits_apply() -> None:
    r, w, a, lim = new_token(), new_token(), new_token(), new_token()
    auth = Authorizer(
        table(
            entry("r", "reader", r),
            entry("w", "writer", w),
            entry("a", "admin", a),
            entry("lim", "admin", lim, models=["m1"]),
        ),
        plaintext=True,
    )
    assert auth.check(md(r), LOCAL, Role.READER, "m").name == "r"
    with pytest.raises(PermissionDeniedError, match="needs the writer role"):
        auth.check(md(r), LOCAL, Role.WRITER, "m")
    auth.check(md(w), LOCAL, Role.WRITER, "m")
    with pytest.raises(PermissionDeniedError, match="admin"):
        auth.check(md(w), LOCAL, Role.ADMIN, "m")
    auth.check(md(a), LOCAL, Role.ADMIN, None)  # store-wide
    auth.check(md(lim), LOCAL, Role.ADMIN, "m1")
    with pytest.raises(PermissionDeniedError, match=r"limited to \['m1'\]"):
        auth.check(md(lim), LOCAL, Role.READER, "m2")
    with pytest.raises(PermissionDeniedError, match="without a model limit"):
        auth.check(md(lim), LOCAL, Role.ADMIN, None)
    # Calls about no model in particular need only the role.
    assert auth.check(md(lim), LOCAL, Role.ADMIN, ANY_MODEL).name == "lim"
    with pytest.raises(PermissionDeniedError, match="this server"):
        auth.check(md(r), LOCAL, Role.WRITER, ANY_MODEL)


@pytest.mark.parametrize(
    ("metadata", "why"),
    [
        ([], "needs a token"),
        ([("authorization", "Basic dXNlcjpwdw==")], "expected Bearer"),
        ([("authorization", "Bearer")], "expected Bearer"),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "Bearer"),
        ([("authorization", "Bearer " + "x" * 600)], "not valid"),
    ],
)
def test_malformed_authorization_headers(
    metadata: list[tuple[str, str]], why: str
) -> None:
    with pytest.raises(AuthenticationError, match=why):
        bearer_token(metadata)


def test_unknown_tokens_and_plaintext_from_afar_are_unauthenticated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tok = new_token()
    auth = Authorizer(table(entry("r", "reader", tok)), plaintext=True)
    with pytest.raises(AuthenticationError, match="not valid"):
        auth.check(md(new_token()), LOCAL, Role.READER, "m")
    with pytest.raises(AuthenticationError, match="only from this host"):
        auth.check(md(tok), "ipv4:10.1.2.3:4000", Role.READER, "m")
    assert tok not in caplog.text
    tls = Authorizer(table(entry("r", "reader", tok)), plaintext=False)
    assert tls.check(md(tok), "ipv4:10.1.2.3:4000", Role.READER, "m").name == "r"


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:1", True),
        ("ipv6:[::1]:1", True),
        ("ipv6:%5B::1%5D:1", True),
        ("unix:/run/p.sock", True),
        ("ipv4:10.0.0.1:1", False),
        ("ipv6:[2001:db8::1]:1", False),
        ("something", False),
    ],
)
def test_local_peers(peer: str, local: bool) -> None:
    assert is_local_peer(peer) is local


def test_start_up_rules(tmp_path: Path) -> None:
    tok = table(entry("a", "admin", new_token()))
    store = tmp_path / "s"
    ServerConfig(store=store, listen="127.0.0.1:0")  # loopback may stay open
    with pytest.raises(ValueError, match="without tokens"):
        ServerConfig(store=store, listen="0.0.0.0:0")
    c = ServerConfig(store=store, listen="0.0.0.0:0", allow_unauthenticated=True)
    assert not c.local_only
    with pytest.raises(ValueError, match="plaintext"):
        ServerConfig(store=store, listen="0.0.0.0:0", tokens=tok)
    ServerConfig(
        store=store,
        listen="0.0.0.0:0",
        tokens=tok,
        tls_cert=tmp_path / "c",
        tls_key=tmp_path / "k",
    )
    with pytest.raises(ValueError, match="both a certificate and its key"):
        ServerConfig(store=store, tls_cert=tmp_path / "c")
    with pytest.raises(ValueError, match="client CA"):
        ServerConfig(store=store, tls_client_ca=tmp_path / "ca")
    with pytest.raises(ValueError, match="max_streams"):
        ServerConfig(store=store, max_workers=4, max_streams=4)


def test_credentials_need_consistent_tls_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="needs its key"):
        Credentials(tls=True, cert=b"x")
    with pytest.raises(InvalidInputError, match="tls=True"):
        Credentials(ca=b"x")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(InvalidInputError, match="not a PEM"):
        Credentials.from_files(ca=tmp_path / "bad.pem")
    with pytest.raises(InvalidInputError, match="cannot read"):
        Credentials.from_files(ca=tmp_path / "missing.pem")

"""Limits on what one request may carry; malformed bytes never hurt the server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from param_server.api.convert import SERVICE_NAME
from param_server.api.v1 import param_server_pb2 as pb
from param_server.client import ParamClient
from param_server.core import safetensors_format
from param_server.core.errors import InvalidInputError
from param_server.core.framing import MAX_MESSAGE_BYTES
from tests.conftest import Server
from tests.helpers import header_bytes, raw_safetensors

pytestmark = pytest.mark.integration

METHODS = (
    "ListModels",
    "GetManifest",
    "ListVersions",
    "FetchShards",
    "Rollback",
    "SetPin",
    "CollectGarbage",
    "GetStoreInfo",
    "GetVariants",
)


@pytest.fixture
def seeded(server: Server) -> Server:
    store = server.store()
    with store.staging() as s:
        s.add("global", raw_safetensors({"w": b"\x01" * 64}))
        store.commit("m", 0, s)
    return server


def raw_unary(ch: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    call = ch.unary_unary(
        f"/{SERVICE_NAME}/{method}",
        request_serializer=None,
        response_deserializer=None,
    )
    try:
        if method == "FetchShards":
            list(
                ch.unary_stream(f"/{SERVICE_NAME}/{method}")(payload, timeout=10)  # type: ignore[arg-type]
            )
        else:
            call(payload, timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS)
def test_malformed_protobuf_is_refused_and_the_server_goes_on(
    seeded: Server, method: str
) -> None:
    with grpc.insecure_channel(seeded.target) as ch:
        # A length-delimited field that claims more bytes than follow.
        code = raw_unary(ch, method, b"\x0a\xff\xff\xff\x0fabc")
        assert code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    with ParamClient(seeded.target, same_host=False) as c:
        assert c.head("m") == 1
    assert seeded.store().fsck() == []


def test_a_malformed_commit_stream_commits_nothing(seeded: Server) -> None:
    with grpc.insecure_channel(seeded.target) as ch:
        call = ch.stream_unary(
            f"/{SERVICE_NAME}/Commit",
            request_serializer=None,
            response_deserializer=None,
        )
        header = pb.CommitRequest(
            header=pb.CommitHeader(model="m", parent_version=1)
        ).SerializeToString()
        with pytest.raises(grpc.RpcError) as e:
            call(iter([header, b"\x12\xff\xff\xff\x0f"]), timeout=10)
        assert e.value.code() in (
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    assert seeded.store().head("m") == 1


def test_oversized_messages_are_refused_before_they_are_read(seeded: Server) -> None:
    with grpc.insecure_channel(
        seeded.target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        big = pb.GetManifestRequest(model="m" * (MAX_MESSAGE_BYTES + 10))
        call = ch.unary_unary(
            f"/{SERVICE_NAME}/GetManifest",
            request_serializer=pb.GetManifestRequest.SerializeToString,
            response_deserializer=pb.Manifest.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            call(big, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with ParamClient(seeded.target, same_host=False) as c:
        assert c.head("m") == 1


def test_a_commit_with_too_many_blobs_is_refused(tmp_path: Path) -> None:
    from param_server.server.config import ServerConfig
    from param_server.server.service import create_server

    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "store", listen="127.0.0.1:0", max_commit_blobs=3)
    )
    srv.start()
    try:
        with ParamClient(f"127.0.0.1:{port}", same_host=False) as c:
            shards = {f"s{i}": raw_safetensors({"w": bytes([i]) * 8}) for i in range(4)}
            with pytest.raises(InvalidInputError, match="limit of 3 blobs"):
                c.commit("m", 0, shards)
            assert c.list_models() == []
            c.commit("m", 0, dict(list(shards.items())[:3]))
    finally:
        srv.stop(0).wait()


def test_too_many_tensors_or_too_large_a_header_in_one_shard(
    seeded: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safetensors_format, "MAX_TENSORS", 4)
    many = raw_safetensors({f"t{i}": b"\x00" for i in range(5)})
    with ParamClient(seeded.target, same_host=False) as c:
        with pytest.raises(InvalidInputError, match="5 tensors exceed the limit of 4"):
            c.commit("m", 1, {"global": many})
        monkeypatch.setattr(safetensors_format, "MAX_HEADER_BYTES", 64)
        long_names = raw_safetensors({"x" * 100: b"\x00"})
        with pytest.raises(InvalidInputError, match="exceeds the 64 limit"):
            c.commit("m", 1, {"global": long_names})
        assert c.head("m") == 1


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("x" * 300, "invalid shard key"),
        ("layers/0", "invalid shard key"),
        ("..", "invalid shard key"),
        ("\u00e9t\u00e9", "invalid shard key"),
        ("", "invalid shard key"),
    ],
)
def test_names_are_limited_in_length_and_characters(
    seeded: Server, key: str, why: str
) -> None:
    blob = raw_safetensors({"w": b"\x02" * 8})
    with ParamClient(seeded.target, same_host=False) as c:
        with pytest.raises(InvalidInputError, match=why):
            c.commit("m", 1, {key: blob})
        with pytest.raises(InvalidInputError, match="invalid model name"):
            c.commit("m" * 200, 0, {"global": blob})
        assert c.head("m") == 1


def test_a_header_whose_tensor_runs_past_the_blob_is_refused(seeded: Server) -> None:
    hostile = header_bytes(
        {"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4 << 40]}},
        b"\x00" * 16,
    )
    with ParamClient(seeded.target, same_host=False) as c:
        with pytest.raises(InvalidInputError, match="outside"):
            c.commit("m", 1, {"global": hostile})
        assert c.head("m") == 1


def _stream(h: pb.CommitHeader, size: int, data: bytes) -> Iterator[pb.CommitRequest]:
    yield pb.CommitRequest(header=h)
    yield pb.CommitRequest(
        begin=pb.UploadBegin(
            key="global", size=size, digest=hashlib.sha256(data).hexdigest()
        )
    )
    yield pb.CommitRequest(data=data)


def test_a_blob_claiming_a_huge_size_is_refused_before_any_write(
    seeded: Server,
) -> None:
    with grpc.insecure_channel(seeded.target) as ch:
        call = ch.stream_unary(
            f"/{SERVICE_NAME}/Commit",
            request_serializer=pb.CommitRequest.SerializeToString,
            response_deserializer=pb.CommitResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            call(_stream(pb.CommitHeader(model="m", parent_version=1), 1 << 60, b"x"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limit" in (e.value.details() or "")
    assert seeded.store().head("m") == 1

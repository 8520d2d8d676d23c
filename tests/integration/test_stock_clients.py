"""Stock gRPC clients with default options: what they receive fits gRPC's
default 4 MiB limit, and reflection answers both protocol versions."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2

from param_server.api.convert import manifest_to_proto
from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from param_server.client import ParamClient
from tests.conftest import Server
from tests.helpers import raw_safetensors

pytestmark = pytest.mark.integration

DEFAULT_LIMIT = 4 * 1024 * 1024


def test_a_plain_channel_with_default_options_fetches_a_shard_over_4_mib(
    server: Server, client: ParamClient
) -> None:
    big = torch.arange(3 * 2**20, dtype=torch.int32)  # 12 MiB: three chunks
    client.commit("m", 0, {"layers.0.experts.0": {"w": big}})
    digest = client.get_manifest("m").shards["layers.0.experts.0"].digest
    sizes: list[int] = []
    with grpc.insecure_channel(server.target) as channel:  # gRPC's defaults
        stub = pb_grpc.ParamServerStub(channel)
        data = bytearray()
        for chunk in stub.FetchShards(
            pb.FetchShardsRequest(model="m", shard_keys=["layers.0.experts.0"])
        ):
            sizes.append(chunk.ByteSize())
            if chunk.WhichOneof("payload") == "header":
                assert chunk.header.digest == digest
            else:
                data += chunk.data
    assert hashlib.sha256(data).hexdigest() == digest
    assert len(sizes) >= 4 and max(sizes) < DEFAULT_LIMIT


def _reflect(
    target: str, service: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([request])))
        return response


@pytest.mark.parametrize(
    "service",
    ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"],
)
def test_server_reflection_answers_v1_and_v1alpha(server: Server, service: str) -> None:
    listed = _reflect(
        server.target, service, reflection_pb2.ServerReflectionRequest(list_services="")
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "paramserver.v1.ParamServer",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    described = _reflect(
        server.target,
        service,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="paramserver.v1.ParamServer"
        ),
    )
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and any(b"FetchShards" in f for f in files)


def _many_tensors(n: int, tag: str) -> bytes:
    """A shard of `n` one-byte tensors with long names: a large manifest entry."""
    return raw_safetensors({f"{tag}.{'x' * 180}.{i:06d}": b"\0" for i in range(n)})


def test_a_manifest_over_4_mib_comes_in_pages_to_stock_clients_and_whole_to_ours(
    server: Server, client: ParamClient
) -> None:
    store = server.store()
    with store.staging() as s:
        for e in range(3):
            s.add(f"layers.0.experts.{e}", _many_tensors(9000, f"e{e}"))
        s.add("global", raw_safetensors({"w": b"abc"}))
        store.commit("big", 0, s)
    want = store.get_manifest("big")
    assert (
        manifest_to_proto(want).ByteSize() > DEFAULT_LIMIT
    )  # too large for one message
    pages = []
    with grpc.insecure_channel(server.target) as channel:  # gRPC's defaults
        stub = pb_grpc.ParamServerStub(channel)
        req = pb.GetManifestRequest(model="big")
        while True:
            page = stub.GetManifest(req)
            assert page.ByteSize() < DEFAULT_LIMIT and page.version == 1
            pages.append(page)
            if not page.next_page_token:
                break
            req = pb.GetManifestRequest(model="big", page_token=page.next_page_token)
    assert len(pages) >= 2
    keys = [s.key for p in pages for s in p.shards]
    assert keys == sorted(want.shards)  # each shard once, in key order
    assert sorted(k for p in pages for k in p.changed) == sorted(want.changed)
    # Our client reassembles it, from GetManifest and from a commit's reply.
    assert client.get_manifest("big") == want
    w = torch.frombuffer(bytearray(b"abd"), dtype=torch.uint8)
    result = client.commit("big", 1, {"global": {"w": w}})
    assert result.manifest == store.get_manifest("big", 2)


def test_manifest_pages_of_a_chosen_size_and_bad_tokens(
    server: Server, client: ParamClient
) -> None:
    shards = {f"layers.0.experts.{e}": {"w": torch.zeros(2)} for e in range(5)}
    client.commit("m", 0, shards)
    client.commit("m", 1, {"layers.0.experts.3": {"w": torch.ones(2)}})
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ParamServerStub(channel)
        first = stub.GetManifest(pb.GetManifestRequest(model="m", page_size=2))
        assert [s.key for s in first.shards] == [
            "layers.0.experts.0",
            "layers.0.experts.1",
        ]
        assert list(first.changed) == [] and first.next_page_token
        # HEAD moves; the token keeps the pages on version 2.
        client.commit("m", 2, {"layers.0.experts.4": {"w": torch.ones(2)}})
        second = stub.GetManifest(
            pb.GetManifestRequest(
                model="m", page_size=2, page_token=first.next_page_token
            )
        )
        assert second.version == 2 and list(second.changed) == ["layers.0.experts.3"]
        for token, version in (
            ("garbage", 0),
            ("2:../../x", 0),
            (first.next_page_token, 3),
        ):
            with pytest.raises(grpc.RpcError) as e:
                stub.GetManifest(
                    pb.GetManifestRequest(model="m", page_token=token, version=version)
                )
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

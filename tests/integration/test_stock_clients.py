"""Stock gRPC clients with default options: what they receive fits gRPC's
default 4 MiB limit, and reflection answers both protocol versions."""

from __future__ import annotations

import hashlib

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2

from loaders.client import ParamClient
from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from tests.conftest import Server

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

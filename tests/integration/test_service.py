"""The gRPC service and ParamClient against a real server on port 0."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from safetensors.torch import load_file

from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from param_server.client import ParamClient
from param_server.core import tensor_codec
from param_server.core.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StaleParentError,
    UnavailableError,
)
from param_server.server.config import ServerConfig
from param_server.server.redis_server import free_port
from param_server.server.service import create_server
from param_server.store.checkpoints import import_checkpoint
from tests.conftest import Checkpoint, Server
from tests.helpers import header_bytes, raw_safetensors

pytestmark = pytest.mark.integration


def source_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {n: t for f in path.glob("*.safetensors") for n, t in load_file(f).items()}


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.ParamServerStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield pb_grpc.ParamServerStub(ch)


@pytest.fixture
def imported(server: Server, checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    ck = checkpoints["mixtral-float32"]
    import_checkpoint(server.store(), ck.path, "mx")
    return ck


def status_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        r = call()
        if hasattr(r, "__iter__"):
            list(r)
    return e.value.code()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "tag",
    ["mixtral-float32", "qwen3_moe-float32", "mixtral-bfloat16", "qwen3_moe-bfloat16"],
)
@pytest.mark.parametrize("streams", [1, 4])
def test_import_then_fetch_is_bit_exact(
    server: Server, checkpoints: dict[str, Checkpoint], tag: str, streams: int
) -> None:
    ck = checkpoints[tag]
    import_checkpoint(server.store(), ck.path, "m")
    with ParamClient(server.target, streams=streams, same_host=False) as c:
        manifest = c.get_manifest("m")
        shards = c.fetch_shards("m", list(manifest.shards), manifest=manifest)
        assert (
            c.stats.blobs_streamed == len(manifest.shards) and c.stats.blobs_mapped == 0
        )
    src = source_tensors(ck.path)
    got = {n: t for ts in shards.values() for n, t in ts.items()}
    assert got.keys() == src.keys()
    for name, t in src.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name


def test_same_host_path_maps_verified_blobs(
    server: Server, imported: Checkpoint
) -> None:
    with ParamClient(server.target, same_host=True) as c:
        m = c.get_manifest("mx")
        keys = ["layers.0.experts.1", "layers.1.experts.3", "global"]
        shards = c.fetch_shards("mx", keys, manifest=m)
        assert (c.stats.blobs_mapped, c.stats.blobs_streamed) == (3, 0)
        src = source_tensors(imported.path)
        for ts in shards.values():
            for n, t in ts.items():
                assert torch.equal(t, src[n])
                t.add_(1)  # copy-on-write: the stored blob must not change
        assert server.store().fsck() == []
        # A blob corrupted on disk is noticed by the mapping client (not used)
        # and by the server, which refuses to serve it.
        path = server.store().blob_path(m.shards["global"].digest)
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match=r"DATA_LOSS.*corrupt"):
            c.fetch_shards("mx", ["global"], manifest=m)


def test_fetch_files_and_versions(client: ParamClient, imported: Checkpoint) -> None:
    m = client.get_manifest("mx")
    blobs = client.fetch_blobs(m, [], files=["config.json"])
    assert bytes(blobs["config.json"]) == (imported.path / "config.json").read_bytes()
    assert client.list_models() == ["mx"]
    [v] = client.list_versions("mx")
    assert (v.version, v.head, v.num_changed) == (1, True, len(m.shards))


def test_commit_rollback_pin_gc_through_the_api(
    client: ParamClient, imported: Checkpoint, server: Server
) -> None:
    m1 = client.get_manifest("mx")
    key = "layers.1.experts.2"
    tensors = client.fetch_shards("mx", [key], manifest=m1)[key]
    new = {n: t * 2 for n, t in tensors.items()}
    r = client.commit(
        "mx", 1, {key: new}, author="trainer", message="double", metadata={"round": 1}
    )
    assert (r.manifest.version, r.manifest.changed, r.blobs_written) == (2, (key,), 1)
    got = client.fetch_shards("mx", [key])[key]  # HEAD is now 2
    assert all(torch.equal(got[n], new[n]) for n in new)
    assert client.get_manifest("mx").metadata == {"round": 1}
    with pytest.raises(
        StaleParentError, match=r"ABORTED.*based on version 1 but HEAD is version 2"
    ):
        client.commit("mx", 1, {key: tensors})
    assert client.rollback("mx", 1, message="bad round") == (2, 1)
    assert client.get_manifest("mx").version == 1
    assert client.set_pin("mx", 2) == [2]
    gc = client.collect_garbage(keep_last=1)
    assert gc.dropped_versions == [] and server.store().fsck() == []
    assert client.set_pin("mx", 2, pinned=False) == []
    # The newest version (2) is kept even though HEAD was rolled back to 1.
    assert client.collect_garbage(keep_last=1, dry_run=True).dropped_versions == []
    other = "layers.0.experts.0"
    t0 = client.fetch_shards("mx", [other])[other]
    r3 = client.commit("mx", 1, {other: {n: v * 3 for n, v in t0.items()}})
    assert (r3.manifest.version, r3.manifest.parent) == (3, 1)
    gc = client.collect_garbage(keep_last=1)
    # v2's doubled expert and v1's replaced expert are unreferenced now.
    assert gc.dropped_versions == [("mx", 1), ("mx", 2)] and gc.blobs_deleted == 2
    assert server.store().fsck() == []
    assert torch.equal(
        client.fetch_shards("mx", [key])[key][next(iter(tensors))],
        tensors[next(iter(tensors))],
    )


def test_schema_mismatch_names_the_tensor(
    client: ParamClient, imported: Checkpoint
) -> None:
    key = "layers.0.experts.0"
    t = client.fetch_shards("mx", [key])[key]
    bad = {n: v.to(torch.bfloat16) for n, v in t.items()}
    with pytest.raises(
        SchemaMismatchError,  # its own class, not a plain InvalidInputError
        match=r"INVALID_ARGUMENT.*tensor "
        r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w\d\.weight' "
        r"is BF16 \[\d+, \d+\] but the parent has F32",
    ):
        client.commit("mx", 1, {key: bad})
    r = client.commit("mx", 1, {key: bad}, allow_schema_change=True)
    assert r.manifest.version == 2


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.GetManifestRequest(model="nope"), grpc.StatusCode.NOT_FOUND),
        (pb.GetManifestRequest(model="mx", version=99), grpc.StatusCode.NOT_FOUND),
        (pb.GetManifestRequest(model="../mx"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GetManifestRequest(model="a/b"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_manifest_errors(
    stub: pb_grpc.ParamServerStub,
    imported: Checkpoint,
    request_: pb.GetManifestRequest,
    code: grpc.StatusCode,
) -> None:
    assert status_of(lambda: stub.GetManifest(request_)) == code


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (
            pb.FetchShardsRequest(model="mx", shard_keys=["layers.9.experts.0"]),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            pb.FetchShardsRequest(model="mx", shard_keys=["../../STORE_ID"]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            pb.FetchShardsRequest(model="mx", file_names=["../LOCK"]),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            pb.FetchShardsRequest(model="mx", version=7, shard_keys=["global"]),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            pb.FetchShardsRequest(model="..", shard_keys=["global"]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_fetch_errors(
    stub: pb_grpc.ParamServerStub,
    imported: Checkpoint,
    request_: pb.FetchShardsRequest,
    code: grpc.StatusCode,
) -> None:
    assert status_of(lambda: stub.FetchShards(request_)) == code


def test_corrupt_blob_is_never_served(
    stub: pb_grpc.ParamServerStub, server: Server, imported: Checkpoint
) -> None:
    store = server.store()
    digest = store.get_manifest("mx").shards["layers.0.experts.2"].digest
    path = store.blob_path(digest)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    chunks: list[pb.FetchChunk] = []
    with pytest.raises(grpc.RpcError) as e:
        for c in stub.FetchShards(
            pb.FetchShardsRequest(model="mx", shard_keys=["layers.0.experts.2"])
        ):
            chunks.append(c)
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    assert digest in e.value.details() and "corrupt" in e.value.details()
    assert chunks == []  # not one byte of it left the server


def commit_stream(
    header: pb.CommitHeader, *blobs: tuple[str, bytes, str]
) -> Iterator[pb.CommitRequest]:
    yield pb.CommitRequest(header=header)
    for key, data, digest in blobs:
        yield pb.CommitRequest(
            begin=pb.UploadBegin(key=key, size=len(data), digest=digest)
        )
        yield pb.CommitRequest(data=data)


def expert0(server: Server) -> bytes:
    s = server.store()
    return s.blob_path(
        s.get_manifest("mx").shards["layers.0.experts.0"].digest
    ).read_bytes()


@pytest.mark.parametrize(
    ("case", "code", "detail"),
    [
        ("stale", grpc.StatusCode.ABORTED, "HEAD is version 1"),
        ("bad_model", grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
        ("bad_key", grpc.StatusCode.INVALID_ARGUMENT, "invalid shard key"),
        (
            "not_safetensors",
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a valid safetensors",
        ),
        ("hostile_header", grpc.StatusCode.INVALID_ARGUMENT, "overlaps"),
        ("digest", grpc.StatusCode.DATA_LOSS, "the upload was corrupted"),
        (
            "no_header",
            grpc.StatusCode.INVALID_ARGUMENT,
            "must start with a CommitHeader",
        ),
        ("short", grpc.StatusCode.INVALID_ARGUMENT, "stream ended after"),
        ("long", grpc.StatusCode.INVALID_ARGUMENT, "more than the announced"),
        ("unknown_model", grpc.StatusCode.NOT_FOUND, "commit with parent 0"),
        ("bad_metadata", grpc.StatusCode.INVALID_ARGUMENT, "metadata_json"),
        ("duplicate", grpc.StatusCode.INVALID_ARGUMENT, "sent twice"),
    ],
)
def test_commit_errors_commit_nothing(
    stub: pb_grpc.ParamServerStub,
    server: Server,
    imported: Checkpoint,
    case: str,
    code: grpc.StatusCode,
    detail: str,
) -> None:
    good = expert0(server)
    digest = hashlib.sha256(good).hexdigest()
    h = pb.CommitHeader(model="mx", parent_version=1)
    key = "layers.0.experts.0"
    reqs: Iterator[pb.CommitRequest]
    if case == "stale":
        reqs = commit_stream(
            pb.CommitHeader(model="mx", parent_version=0), (key, good, "")
        )
    elif case == "bad_model":
        reqs = commit_stream(
            pb.CommitHeader(model="../x", parent_version=0), (key, good, "")
        )
    elif case == "bad_key":
        reqs = commit_stream(h, ("../../blobs/x", good, ""))
    elif case == "not_safetensors":
        reqs = commit_stream(h, (key, b"\x00" * 64, ""))
    elif case == "hostile_header":
        reqs = commit_stream(
            h,
            (
                key,
                header_bytes(
                    {
                        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                        "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
                    },
                    b"\0" * 6,
                ),
                "",
            ),
        )
    elif case == "digest":
        reqs = commit_stream(h, (key, good, "0" * 64))
    elif case == "no_header":
        reqs = iter([pb.CommitRequest(data=b"xx")])
    elif case == "short":
        reqs = iter(
            [
                pb.CommitRequest(header=h),
                pb.CommitRequest(begin=pb.UploadBegin(key=key, size=len(good) + 5)),
                pb.CommitRequest(data=good),
            ]
        )
    elif case == "long":
        reqs = iter(
            [
                pb.CommitRequest(header=h),
                pb.CommitRequest(begin=pb.UploadBegin(key=key, size=10)),
                pb.CommitRequest(data=good),
            ]
        )
    elif case == "unknown_model":
        reqs = commit_stream(
            pb.CommitHeader(model="other", parent_version=3), (key, good, "")
        )
    elif case == "bad_metadata":
        reqs = commit_stream(
            pb.CommitHeader(model="mx", parent_version=1, metadata_json="{nope"),
            (key, good, ""),
        )
    else:
        reqs = commit_stream(h, (key, good, digest), (key, good, digest))
    with pytest.raises(grpc.RpcError) as e:
        stub.Commit(reqs)
    assert e.value.code() == code, e.value.details()
    assert detail in e.value.details()
    store = server.store()
    assert store.head("mx") == 1 and [v.version for v in store.list_versions("mx")] == [
        1
    ]
    assert wait_until(lambda: not any((store.root / "tmp").iterdir()))


def wait_until(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def test_stream_cut_mid_commit_commits_nothing(
    stub: pb_grpc.ParamServerStub, server: Server, imported: Checkpoint
) -> None:
    sent = threading.Event()
    payload = raw_safetensors({"w": b"x" * (3 * 1024 * 1024)})

    def requests() -> Iterator[pb.CommitRequest]:
        yield pb.CommitRequest(
            header=pb.CommitHeader(
                model="mx", parent_version=1, allow_schema_change=True
            )
        )
        yield pb.CommitRequest(begin=pb.UploadBegin(key="global", size=len(payload)))
        yield pb.CommitRequest(data=payload[: len(payload) // 2])
        sent.set()
        time.sleep(30)  # the client goes away before finishing

    fut = stub.Commit.future(requests())
    assert sent.wait(10)
    store = server.store()
    assert wait_until(
        lambda: any((store.root / "tmp").iterdir())
    )  # staging in progress
    fut.cancel()
    assert wait_until(lambda: not any((store.root / "tmp").iterdir()))
    assert store.head("mx") == 1 and store.fsck() == []


def test_health_and_reflection(server: Server) -> None:
    with grpc.insecure_channel(server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "paramserver.v1.ParamServer"):
            r = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "paramserver.v1.ParamServer" in services
        assert "grpc.health.v1.Health" in services
        desc = db.FindFileContainingSymbol("paramserver.v1.ParamServer")
        assert desc.package == "paramserver.v1"


def test_client_retries_until_the_server_comes_up(tmp_path: Path) -> None:
    port = free_port()
    srv_holder: list[grpc.Server] = []

    def start_later() -> None:
        time.sleep(0.5)
        srv, _, _ = create_server(
            ServerConfig(store=tmp_path / "s", listen=f"127.0.0.1:{port}")
        )
        srv.start()
        srv_holder.append(srv)

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with ParamClient(f"127.0.0.1:{port}", retries=8, backoff=0.2) as c:
            assert c.list_models() == []
            assert c.stats.retries >= 1
    finally:
        t.join()
        for s in srv_holder:
            s.stop(0)


def test_unreachable_server_gives_a_clear_error() -> None:
    port = free_port()
    with ParamClient(f"127.0.0.1:{port}", retries=2, backoff=0.01, timeout=2) as c:
        with pytest.raises(UnavailableError, match="UNAVAILABLE"):
            c.list_models()
        with pytest.raises(
            UnavailableError, match="did not answer within 1s; is it running"
        ):
            c.wait_ready(timeout=1)


def test_from_url() -> None:
    assert ParamClient.from_url("grpc://localhost:123").target == "localhost:123"
    assert ParamClient.from_url("127.0.0.1:9").target == "127.0.0.1:9"
    assert ParamClient.from_url("grpc://[::1]:9").target == "[::1]:9"
    with pytest.raises(InvalidInputError, match="expected grpc://host:port"):
        ParamClient.from_url("http://x")


def test_unknown_model_from_client(client: ParamClient) -> None:
    with pytest.raises(NotFoundError, match="unknown model 'ghost'"):
        client.get_manifest("ghost")


def test_second_daemon_on_the_same_port_is_refused(
    server: Server, tmp_path: Path
) -> None:
    port = server.target.rpartition(":")[2]
    with pytest.raises(OSError, match="cannot listen on"):
        create_server(
            ServerConfig(store=tmp_path / "other", listen=f"127.0.0.1:{port}")
        )


def test_manifest_of_another_model_is_refused(
    client: ParamClient, imported: Checkpoint
) -> None:
    m = client.get_manifest("mx")
    with pytest.raises(InvalidInputError, match="passed the manifest of mx@1"):
        client.fetch_shards("other", ["global"], manifest=m)


def test_daemon_start_removes_staging_left_by_a_crash(tmp_path: Path) -> None:
    stale = tmp_path / "s" / "tmp" / "crashed"
    stale.mkdir(parents=True)
    (stale / ".lock").touch()
    (stale / "0-partial").write_bytes(b"x" * 100)
    srv, _, _ = create_server(ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0"))
    srv.stop(0)
    assert not stale.exists()


def test_large_fetch_shows_progress(
    server: Server, imported: Checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    with ParamClient(server.target, same_host=False) as c:
        m = c.get_manifest("mx")
        c.fetch_shards("mx", list(m.shards), manifest=m, progress=True)
    err = capsys.readouterr().err
    assert "fetch mx@1" in err and "100%" in err


def test_bytes_failing_the_manifest_digest_are_refetched_once_then_refused(
    client: ParamClient, imported: Checkpoint
) -> None:
    import dataclasses

    m = client.get_manifest("mx")
    key = "layers.1.experts.1"
    forged = dataclasses.replace(
        m,
        shards={**m.shards, key: dataclasses.replace(m.shards[key], digest="0" * 64)},
    )
    with pytest.raises(IntegrityError, match=r"failed digest 0{64} twice"):
        client.fetch_blobs(forged, [key])
    assert client.stats.digest_failures == 2 and client.stats.blobs_streamed == 0


def test_commit_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    config = ServerConfig(
        store=tmp_path / "s", listen="127.0.0.1:0", max_commit_bytes=1000
    )
    srv, port, _ = create_server(config)
    srv.start()
    try:
        with ParamClient(f"127.0.0.1:{port}") as c:
            with pytest.raises(InvalidInputError, match="limit of 1000 bytes"):
                c.commit("m", 0, {"global": raw_safetensors({"w": b"x" * 2000})})
            c.commit("m", 0, {"global": raw_safetensors({"w": b"x" * 100})})
            assert c.get_manifest("m").version == 1
    finally:
        srv.stop(0)


@pytest.mark.parametrize("width", ["int8", "fp8"])
def test_experts_fetched_at_8_bits(
    server: Server, checkpoints: dict[str, Checkpoint], width: str
) -> None:
    """A bf16 model's experts over gRPC and the same-host path at 8 bits:
    fewer bytes, verified against the variants' own digests,
    dequantized to bf16 close to the stored values; dense shards only at
    their stored width; a corrupt variant is made again, never served."""
    ck = checkpoints["qwen3_moe-bfloat16"]
    import_checkpoint(server.store(), ck.path, "m")
    src = source_tensors(ck.path)
    experts = ["layers.0.experts.1", "layers.1.experts.3"]
    for same_host in (False, True):
        with ParamClient(server.target, same_host=same_host, retries=1) as c:
            m = c.get_manifest("m")
            got = c.fetch_shards("m", experts, manifest=m, width=width)
            moved = c.stats.bytes_streamed + c.stats.bytes_mapped
            # Tiny experts: headers and scales weigh; at real sizes a variant
            # is ~0.5 x bf16 (see test_variants and BENCHMARKS.md).
            assert moved < sum(m.shards[k].size for k in experts)
            assert (c.stats.blobs_mapped > 0) == same_host
            for tensors in got.values():
                for name, t in tensors.items():
                    assert t.dtype == torch.bfloat16 and t.shape == src[name].shape
                    scale = float(src[name].float().abs().max())
                    err = float((t.float() - src[name].float()).abs().max())
                    assert 0 < err <= 0.07 * scale, name
            again = c.fetch_shards("m", experts, manifest=m, width=width)
            assert all(torch.equal(again[k][n], got[k][n]) for k in got for n in got[k])
            with pytest.raises(InvalidInputError, match="not an expert shard"):
                c.fetch_shards("m", ["global"], manifest=m, width=width)
            with pytest.raises(InvalidInputError, match="unknown width"):
                c.fetch_shards("m", experts, manifest=m, width="int4")
    store = server.store()
    digest, _ = store.variant(m.shards[experts[0]].digest, width)
    path = store.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with ParamClient(server.target, same_host=False, retries=1) as c:
        fresh = c.fetch_shards("m", experts[:1], manifest=m, width=width)
    assert torch.equal(
        fresh[experts[0]][next(iter(got[experts[0]]))],
        got[experts[0]][next(iter(got[experts[0]]))],
    )


def test_a_commit_makes_its_experts_variants_in_the_widths_in_use(
    server: Server, checkpoints: dict[str, Checkpoint]
) -> None:
    """Once a node has fetched an expert as int8, a commit that changes it
    starts making the new bytes' int8 variant before anyone asks; an expert
    nobody fetched at 8 bits, and widths nobody used, are left alone."""
    ck = checkpoints["qwen3_moe-bfloat16"]
    import_checkpoint(server.store(), ck.path, "m")
    used, unused = "layers.0.experts.1", "layers.1.experts.3"
    store = server.store()
    with ParamClient(server.target, same_host=False, retries=1) as c:
        m = c.get_manifest("m")
        c.fetch_shards("m", [used], manifest=m, width="int8")
        shards = {
            k: {n: t * 1.5 for n, t in tensor_codec.decode(buf, k).items()}
            for k, buf in c.fetch_blobs(m, [used, unused]).items()
        }
        m2 = c.commit("m", m.version, shards).manifest
    new, other = m2.shards[used].digest, m2.shards[unused].digest
    assert new != m.shards[used].digest

    def made(digest: str, kind: str) -> bool:
        return (store.root / "variants" / kind / digest).exists()

    assert wait_until(lambda: made(new, "int8"))
    digest, _ = store.variant(new, "int8")  # the one made ahead, verified
    assert store.verify_blob(digest)
    assert not made(other, "int8")
    assert not made(new, "fp8")

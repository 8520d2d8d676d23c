"""Property-based fuzzing of request validation and of safetensors parsing on
commit and import, against a real gRPC server and store.

Each property runs FUZZ_EXAMPLES cases (default 40, so the suite stays
quick); `bench/fuzz_run.py` runs them with many more.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from param_server.core.errors import InvalidInputError, SchemaMismatchError
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint
from tests.conftest import Checkpoint
from tests.helpers import raw_safetensors

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
# Every refusal of bad input is one of these; anything else (INTERNAL,
# UNKNOWN, DATA_LOSS from our own bytes) would be a bug.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ABORTED,
}
# Outcome counts per property, written to $FUZZ_REPORT (JSON) when set.
OUTCOMES: dict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter
)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if path := os.environ.get("FUZZ_REPORT"):
        Path(path).write_text(json.dumps(OUTCOMES, indent=1, sort_keys=True))


KEYS = ["global", "layers.0.experts.0", "layers.0.experts.1", "layers.0.dense"]


@contextlib.contextmanager
def running(root: Path) -> Iterator[tuple[pb_grpc.ParamServerStub, Store]]:
    srv, port, _ = create_server(ServerConfig(store=root, listen="127.0.0.1:0"))
    srv.start()
    store = Store(root)
    with store.staging() as s:
        for i, k in enumerate(KEYS):
            s.add(k, raw_safetensors({"w": bytes([i]) * 32, "b": bytes([i]) * 8}))
        store.commit("m", 0, s)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield pb_grpc.ParamServerStub(ch), store  # type: ignore[no-untyped-call]
    finally:
        srv.stop(0).wait()


def mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


names = st.one_of(
    st.sampled_from(["m", "other", "", "..", "../m", "m/x", "M" * 129, "m\x00"]),
    st.text(max_size=40),
)
keys = st.one_of(st.sampled_from([*KEYS, "../x", "", "a" * 300]), st.text(max_size=20))
flips = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)
blob = st.fixed_dictionaries(
    {
        "key": keys,
        "shape": st.integers(1, 64),
        "flips": flips,
        "cut": st.one_of(st.none(), st.integers(0, 200)),
        "size_delta": st.sampled_from([0, 0, 0, -1, 1, 1 << 40]),
        "digest": st.sampled_from(["right", "right", "wrong", "none"]),
        "dtype": st.sampled_from(["U8", "U8", "F32", "BF16", "Q9"]),
    }
)


def commit_requests(
    model: str, parent: int, blobs: list[dict[str, object]]
) -> Iterator[pb.CommitRequest]:
    yield pb.CommitRequest(header=pb.CommitHeader(model=model, parent_version=parent))
    for b in blobs:
        n = int(b["shape"])  # type: ignore[call-overload]
        dtype = str(b["dtype"])
        width = {"U8": 1, "F32": 4, "BF16": 2}.get(dtype, 1)
        good = raw_safetensors({"w": b"\x07" * (n * width)}, dtype=dtype)
        data = mutate(good, b["flips"], b["cut"])  # type: ignore[arg-type]
        digest = {
            "right": hashlib.sha256(data).hexdigest(),
            "wrong": "0" * 64,
            "none": "",
        }[str(b["digest"])]
        yield pb.CommitRequest(
            begin=pb.UploadBegin(
                key=str(b["key"]),
                size=max(0, len(data) + int(b["size_delta"])),  # type: ignore[call-overload]
                digest=digest,
            )
        )
        yield pb.CommitRequest(data=data)


def test_fuzzed_commit_streams_never_corrupt_the_store(tmp_path: Path) -> None:
    with running(tmp_path / "store") as (stub, store):

        @FUZZ
        @given(
            model=st.one_of(st.just("m"), names),
            parent=st.sampled_from(["head", "head", "stale", "zero", "huge"]),
            blobs=st.lists(blob, max_size=4),
            allow=st.booleans(),
        )
        def prop(
            model: str, parent: str, blobs: list[dict[str, object]], allow: bool
        ) -> None:
            head = store.head("m")
            p = {"head": head, "stale": head - 1, "zero": 0, "huge": 2**62}[parent]
            reqs = list(commit_requests(model, p, blobs))
            reqs[0].header.allow_schema_change = allow
            try:
                r = stub.Commit(iter(reqs), timeout=30)
            except grpc.RpcError as e:
                # DATA_LOSS: the bytes did not match the digest the sender
                # declared (a corrupted upload; retrying it is the fix).
                assert e.code() in REFUSALS | {grpc.StatusCode.DATA_LOSS}, (
                    e.code(),
                    e.details(),
                )
                assert store.head("m") == head
                OUTCOMES["commit"][e.code().name] += 1
            else:
                OUTCOMES["commit"]["OK"] += 1
                assert r.manifest.model == model
                assert store.head(model) == r.manifest.version
            assert not any((store.root / "tmp").iterdir())

        prop()
        assert store.fsck() == []


def test_fuzzed_read_requests_are_refused_cleanly(tmp_path: Path) -> None:
    with running(tmp_path / "store") as (stub, store):

        @FUZZ
        @given(
            model=names,
            version=st.one_of(st.integers(0, 3), st.integers(0, 2**63 - 1)),
            shard_keys=st.lists(keys, max_size=3),
            file_names=st.lists(keys, max_size=2),
        )
        def prop(
            model: str, version: int, shard_keys: list[str], file_names: list[str]
        ) -> None:
            for call in (
                lambda: stub.GetManifest(
                    pb.GetManifestRequest(model=model, version=version), timeout=10
                ),
                lambda: stub.ListVersions(
                    pb.ListVersionsRequest(model=model), timeout=10
                ),
                lambda: list(
                    stub.FetchShards(
                        pb.FetchShardsRequest(
                            model=model,
                            version=version,
                            shard_keys=shard_keys,
                            file_names=file_names,
                        ),
                        timeout=10,
                    )
                ),
                lambda: stub.SetPin(
                    pb.SetPinRequest(model=model, version=version), timeout=10
                ),
            ):
                try:
                    call()
                    OUTCOMES["read"]["OK"] += 1
                except grpc.RpcError as e:
                    assert e.code() in REFUSALS, (e.code(), e.details())
                    OUTCOMES["read"][e.code().name] += 1

        prop()
        assert store.fsck() == []


def test_fuzzed_checkpoint_files_import_or_are_refused(
    tmp_path: Path, checkpoints: dict[str, Checkpoint]
) -> None:
    src = checkpoints["mixtral-float32"].path
    store = Store(tmp_path / "store")
    import_checkpoint(store, src, "mx")
    files = sorted(p.name for p in src.glob("*.safetensors"))

    @FUZZ
    @given(
        which=st.integers(0, len(files) - 1),
        flips=st.lists(
            st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6
        ),
        cut=st.one_of(st.none(), st.integers(0, 2000)),
    )
    def prop(which: int, flips: list[tuple[int, int]], cut: int | None) -> None:
        head = store.head("mx")
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            work = Path(d) / "ckpt"
            shutil.copytree(src, work)
            f = work / files[which]
            f.write_bytes(mutate(f.read_bytes(), flips, cut))
            try:
                r = import_checkpoint(store, work, "mx")
            except (InvalidInputError, SchemaMismatchError) as e:
                assert str(e)  # says what was wrong
                assert store.head("mx") == head
                OUTCOMES["import"][type(e).__name__] += 1
            else:
                OUTCOMES["import"]["OK"] += 1
                # Only the data section changed: same tensors, new values.
                assert r.manifest.parent == head and store.head("mx") > head
                store.rollback("mx", head)

    prop()
    assert store.fsck() == []

"""The on-disk blob cache: a restarted node warms from disk, verified and bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from loaders.cache import LazyExpertLoader
from param_server.client import ParamClient
from param_server.client.disk_cache import DiskBlobCache
from param_server.server.config import ServerConfig
from param_server.server.service import create_server
from param_server.store import Store
from param_server.store.checkpoints import import_checkpoint
from tests.conftest import Checkpoint
from tests.helpers import raw_safetensors

pytestmark = pytest.mark.integration
TAG = "mixtral-float32"


@pytest.fixture
def served(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> Iterator[tuple[grpc.Server, str]]:
    """A real server on port 0 whose store holds the tiny Mixtral."""
    import_checkpoint(Store(tmp_path / "s"), checkpoints[TAG].path, TAG)
    srv, port, _ = create_server(
        ServerConfig(store=tmp_path / "s", listen="127.0.0.1:0")
    )
    srv.start()
    yield srv, f"127.0.0.1:{port}"
    srv.stop(0)


def test_restarted_node_warms_from_disk_without_the_server(
    served: tuple[grpc.Server, str], tmp_path: Path
) -> None:
    srv, target = served
    cache_dir = tmp_path / "node-cache"
    with ParamClient(
        target, same_host=False, disk_cache=DiskBlobCache(cache_dir, 10**9)
    ) as c:
        manifest = c.get_manifest(TAG)
        loader = LazyExpertLoader(c, manifest, budget_bytes=10**9)
        with loader.acquire(0, [0, 1, 2, 3]) as first:
            want = {e: {n: t.clone() for n, t in ts.items()} for e, ts in first.items()}
        assert c.stats.blobs_streamed == 4 and c.stats.blobs_from_disk == 0
        loader.close()
    srv.stop(0).wait()  # the server is gone; the node restarts
    with ParamClient(
        target, same_host=False, retries=0, disk_cache=DiskBlobCache(cache_dir, 10**9)
    ) as c:
        loader = LazyExpertLoader(c, manifest, budget_bytes=10**9)
        with loader.acquire(0, [0, 1, 2, 3]) as again:
            for e, ts in again.items():
                assert all(torch.equal(ts[n], want[e][n]) for n in ts)
        assert c.stats.blobs_from_disk == 4 and c.stats.blobs_streamed == 0
        loader.close()


def test_corrupt_cached_blob_is_dropped_and_refetched(
    served: tuple[grpc.Server, str], tmp_path: Path
) -> None:
    _, target = served
    disk = DiskBlobCache(tmp_path / "c", 10**9)
    with ParamClient(target, same_host=False, disk_cache=disk) as c:
        m = c.get_manifest(TAG)
        key = "layers.1.experts.2"
        good = bytes(c.fetch_blobs(m, [key])[key])
        cached = tmp_path / "c" / m.shards[key].digest[:2] / m.shards[key].digest
        data = bytearray(cached.read_bytes())
        data[-1] ^= 1
        cached.write_bytes(bytes(data))
    fresh = DiskBlobCache(tmp_path / "c", 10**9)  # a restarted node
    with ParamClient(target, same_host=False, disk_cache=fresh) as c:
        assert bytes(c.fetch_blobs(m, [key])[key]) == good
        assert c.stats.blobs_from_disk == 0 and c.stats.blobs_streamed == 1
    assert cached.read_bytes() == good  # replaced by the verified copy


def test_size_bound_evicts_least_recently_used(tmp_path: Path) -> None:
    import hashlib
    import os
    import time

    blobs = [raw_safetensors({"w": bytes([i]) * 1000}) for i in range(5)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    disk = DiskBlobCache(tmp_path / "c", max_bytes=3 * len(blobs[0]))
    for i, (d, b) in enumerate(zip(digests, blobs, strict=True)):
        disk.put(d, b)
        path = tmp_path / "c" / d[:2] / d
        os.utime(path, ns=(time.time_ns(), time.time_ns() + i * 10**9))
        if i == 2:
            assert disk.get(digests[0], len(blobs[0])) is not None  # 0 used: keep it
            os.utime(
                tmp_path / "c" / digests[0][:2] / digests[0],
                ns=(time.time_ns(), time.time_ns() + 3 * 10**9),
            )
    assert disk.size_bytes <= 3 * len(blobs[0])
    present = [
        disk.get(d, len(b)) is not None for d, b in zip(digests, blobs, strict=True)
    ]
    assert present == [True, False, False, True, True]
    assert DiskBlobCache(tmp_path / "c", 10**9).size_bytes == disk.size_bytes


def test_bad_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        DiskBlobCache(tmp_path, 0)

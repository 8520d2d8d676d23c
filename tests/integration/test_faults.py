"""The fault suite at test size (bench/fault_suite.py runs it at full size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import faults
from tests.conftest import Checkpoint

pytestmark = pytest.mark.integration


def test_daemon_sigkilled_during_commits_keeps_every_acknowledged_version(
    tmp_path: Path,
) -> None:
    r = faults.daemon_kills(tmp_path, kills=8, seed=11, shard_bytes=64 * 1024)
    assert r.violations == []
    assert r.kills == 8 and r.acknowledged > 8


@pytest.mark.slow
@pytest.mark.timeout(900)  # 200 daemon starts: ~4 min on 2 cores; a hang guard
def test_daemon_sigkilled_200_times(tmp_path: Path) -> None:
    r = faults.daemon_kills(tmp_path, kills=200, seed=12)
    assert r.violations == []


def test_a_file_size_limit_fails_the_commit_clearly_and_the_daemon_goes_on(
    tmp_path: Path,
) -> None:
    r = faults.file_size_limit(tmp_path, limit=256 * 1024)
    assert r["error"] is not None and "file-size limit" in str(r["error"])
    assert "last committed version is intact" in str(r["error"])
    assert r["daemon_alive"] and r["head_after_failure"] == 1
    assert r["next_commit"] == 2
    assert r["fsck"] == [] and r["staging_left"] == []


def test_soak_500_commits_4_nodes_redis_restarted_3_times_daemon_once(
    tmp_path: Path, checkpoints: dict[str, Checkpoint]
) -> None:
    r = faults.soak(tmp_path, checkpoints["mixtral-float32"].path)
    assert r.commits == 500 and r.lost_acknowledged == []
    assert r.nodes_on_final == 4 and r.node_errors == 0
    assert r.logits_match  # every node serves exactly the final version
    assert sorted(f for f, _ in r.faults) == ["daemon", "redis", "redis", "redis"]


def test_many_concurrent_fetch_streams_while_commits_land(tmp_path: Path) -> None:
    rows = faults.concurrent_fetches(tmp_path, (4, 16), shards=8, shard_mib=2, rounds=1)
    for row in rows:
        assert row.errors == 0 and row.fetches == row.streams
        assert row.commits_landed > 0
        # Bounded: a few chunks per stream, never the blobs they stream.
        assert row.peak_rss_mib - row.idle_rss_mib < 64 + 12 * row.streams

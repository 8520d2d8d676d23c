"""The store on a real file system: commits, compare-and-set, history, GC, faults."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from param_server.core.errors import (
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StaleParentError,
)
from param_server.store import Store
from tests.conftest import remount_read_only, tmpfs
from tests.helpers import raw_safetensors

ROOT = Path(__file__).resolve().parents[2]


def shard(tag: bytes, n: int = 16, name: str = "w") -> bytes:
    return raw_safetensors({name: (tag * n)[:n]})


def commit(store: Store, model: str, parent: int, shards: dict[str, bytes], **kw):  # type: ignore[no-untyped-def]
    with store.staging() as s:
        for k, v in shards.items():
            s.add(k, v)
        return store.commit(model, parent, s, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def base(store: Store) -> Store:
    commit(
        store,
        "m",
        0,
        {
            "global": shard(b"g"),
            "layers.0.experts.0": shard(b"a"),
            "layers.0.experts.1": shard(b"b"),
        },
    )
    return store


def blob_count(store: Store) -> int:
    return sum(1 for d in store.blob_root.iterdir() for _ in d.iterdir())


def test_first_commit_writes_every_shard(base: Store) -> None:
    m = base.get_manifest("m")
    assert (m.version, m.parent) == (1, 0)
    assert sorted(m.changed) == ["global", "layers.0.experts.0", "layers.0.experts.1"]
    assert blob_count(base) == 3
    assert base.fsck() == []


def test_commit_of_k_changed_shards_writes_k_blobs(base: Store) -> None:
    r = commit(base, "m", 1, {"layers.0.experts.1": shard(b"c")}, message="one expert")
    assert (r.blobs_written, r.manifest.changed) == (1, ("layers.0.experts.1",))
    assert r.bytes_written == len(shard(b"c"))
    assert blob_count(base) == 4
    # Unchanged shards are shared with the parent, byte for byte.
    assert r.manifest.shards["global"] == base.get_manifest("m", 1).shards["global"]


def test_identical_bytes_are_stored_once(base: Store) -> None:
    r = commit(base, "m", 1, {"layers.0.experts.1": shard(b"a")})
    assert r.blobs_written == 0 and blob_count(base) == 3


def test_stale_parent_is_refused(base: Store) -> None:
    commit(base, "m", 1, {"global": shard(b"x")})
    with pytest.raises(
        StaleParentError, match="based on version 1 but HEAD is version 2"
    ):
        commit(base, "m", 1, {"global": shard(b"y")})
    assert (
        base.head("m") == 2
        and base.get_manifest("m").shards["global"].digest
        == base.get_manifest("m", 2).shards["global"].digest
    )


def test_concurrent_writers_one_wins(base: Store, tmp_path: Path) -> None:
    results: list[str] = []

    def writer(tag: bytes) -> None:
        other = Store(tmp_path / "store")  # its own instance, as another process would
        try:
            commit(other, "m", 1, {"global": shard(tag)})
            results.append("ok")
        except StaleParentError:
            results.append("stale")

    threads = [
        threading.Thread(target=writer, args=(bytes([65 + i]),)) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["stale"] * 7
    assert base.head("m") == 2


def test_new_model_needs_parent_zero(store: Store) -> None:
    with pytest.raises(NotFoundError, match="commit with parent 0"):
        commit(store, "new", 3, {"global": shard(b"x")})
    commit(store, "new", 0, {"global": shard(b"x")})
    with pytest.raises(StaleParentError):
        commit(store, "new", 0, {"global": shard(b"y")})


def test_schema_changes_need_permission(base: Store) -> None:
    with pytest.raises(
        SchemaMismatchError,
        match=r"tensor 'w' is U8 \[8\] but the parent "
        r"has U8 \[16\]",
    ):
        commit(base, "m", 1, {"global": shard(b"x", n=8)})
    with pytest.raises(SchemaMismatchError, match="tensor 'v' is new"):
        commit(base, "m", 1, {"global": shard(b"x", name="v")})
    with pytest.raises(SchemaMismatchError, match="does not exist in the parent"):
        commit(base, "m", 1, {"layers.9.dense": shard(b"x")})
    with pytest.raises(SchemaMismatchError, match="removing shard"):
        commit(base, "m", 1, {}, remove=["layers.0.experts.1"])
    assert base.head("m") == 1
    r = commit(
        base,
        "m",
        1,
        {"global": shard(b"x", n=8)},
        allow_schema_change=True,
        remove=["layers.0.experts.1"],
    )
    assert "layers.0.experts.1" not in r.manifest.shards
    assert r.manifest.shards["global"].tensors[0].shape == (8,)


def test_provenance_and_files_are_recorded(store: Store) -> None:
    with store.staging() as s:
        s.add("global", shard(b"g"))
        s.add("config.json", b'{"model_type": "x"}', is_file=True)
        r = store.commit(
            "m",
            0,
            s,
            author="alice",
            message="hello",
            metadata={"round": 3, "clients": ["a", "b"]},
        )
    m = store.get_manifest("m", r.manifest.version)
    assert (m.author, m.message, m.metadata) == (
        "alice",
        "hello",
        {"round": 3, "clients": ["a", "b"]},
    )
    assert m.files["config.json"].size == len(b'{"model_type": "x"}')
    assert m.created_at.endswith("Z")


def test_metadata_must_be_json(store: Store) -> None:
    with pytest.raises(InvalidInputError, match="JSON"):
        commit(store, "m", 0, {"global": shard(b"g")}, metadata={"x": object()})


def test_rollback_moves_head_and_is_recorded(base: Store) -> None:
    commit(base, "m", 1, {"global": shard(b"x")})
    commit(base, "m", 2, {"global": shard(b"y")})
    assert base.rollback("m", 1, author="ops", message="bad round") == (3, 1)
    assert base.get_manifest("m").version == 1
    # Commits continue from the rolled-back HEAD; later versions stay listed.
    r = commit(base, "m", 1, {"global": shard(b"z")})
    assert (r.manifest.version, r.manifest.parent) == (4, 1)
    assert [v.version for v in base.list_versions("m")] == [1, 2, 3, 4]
    actions = [(h["action"], h["version"]) for h in base.history("m")]
    assert actions == [
        ("commit", 1),
        ("commit", 2),
        ("commit", 3),
        ("rollback", 1),
        ("commit", 4),
    ]
    with pytest.raises(NotFoundError, match="live versions are 1-4"):
        base.rollback("m", 9)


def test_gc_keeps_last_n_pinned_and_head_and_never_referenced_blobs(
    base: Store,
) -> None:
    for i in range(5):
        commit(
            base, "m", base.head("m"), {"layers.0.experts.0": shard(bytes([70 + i]))}
        )
    base.set_pin("m", 2)
    base.rollback("m", 3)
    dry = base.gc(keep_last=2, dry_run=True)
    assert blob_count(base) == 8 and [v for _, v in dry.dropped_versions] == [1, 4]
    r = base.gc(keep_last=2)
    assert [v for _, v in r.dropped_versions] == [1, 4]
    assert [v.version for v in base.list_versions("m")] == [2, 3, 5, 6]
    # Every retained version's blobs survive and verify; only unreferenced ones went.
    assert base.fsck() == []
    assert r.blobs_deleted == 2  # expert-0 bytes of versions 1 and 4
    with pytest.raises(NotFoundError, match="no version 4"):
        base.get_manifest("m", 4)
    with pytest.raises(InvalidInputError):
        base.gc(keep_last=0)


def test_pins(base: Store) -> None:
    assert base.set_pin("m", 1) == (1,)
    assert base.list_versions("m")[0].pinned
    assert base.set_pin("m", 1, pinned=False) == ()
    with pytest.raises(NotFoundError):
        base.set_pin("m", 7)


def test_unknown_model_and_version(base: Store) -> None:
    with pytest.raises(
        NotFoundError, match="unknown model 'nope'; known models: \\['m'\\]"
    ):
        base.get_manifest("nope")
    with pytest.raises(NotFoundError, match="has no version 5"):
        base.get_manifest("m", 5)


def test_path_tricks_are_refused(store: Store) -> None:
    with pytest.raises(InvalidInputError):
        commit(store, "../evil", 0, {"global": shard(b"g")})
    with pytest.raises(InvalidInputError):
        commit(store, "m", 0, {"../../etc/passwd": shard(b"g")})
    with pytest.raises(InvalidInputError):
        store.blob_path("../" + "a" * 61)
    assert store.list_models() == []


def test_corrupt_shard_is_refused_before_commit(store: Store) -> None:
    with (
        pytest.raises(InvalidInputError, match="not a valid safetensors"),
        store.staging() as s,
    ):
        s.add("global", shard(b"g")[:-3])
    assert store.list_models() == []


def test_aborted_staging_leaves_nothing(store: Store) -> None:
    with store.staging() as s:
        w = s.writer("global", 100)
        w.write(b"x" * 10)
    assert list((store.root / "tmp").iterdir()) == []
    assert blob_count(store) == 0


def test_orphans_of_a_crashed_commit_are_invisible_and_collected(base: Store) -> None:
    # A crash after the manifest landed but before HEAD moved leaves a manifest
    # and a blob that no acknowledged version references.
    orphan = dataclasses.replace(base.get_manifest("m"), version=2).to_json()
    (base.root / "models/m/manifests/2.json").write_bytes(orphan)
    stale = base.root / "tmp" / "deadbeef"
    stale.mkdir()
    (stale / ".lock").touch()
    with pytest.raises(NotFoundError):
        base.get_manifest("m", 2)
    r = commit(base, "m", 1, {"global": shard(b"n")})
    assert r.manifest.version == 2  # the orphan's number is reused, its file replaced
    base.gc(keep_last=5)
    assert not stale.exists()


def test_blob_corruption_is_detected(base: Store) -> None:
    digest = base.get_manifest("m").shards["global"].digest
    path = base.verify_blob(digest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupt"):
        base.verify_blob(digest)
    assert any("corrupt" in p for p in base.fsck())


def test_file_size_limit_mid_commit_keeps_last_version(
    base: Store, tmp_path: Path
) -> None:
    """A commit hitting RLIMIT_FSIZE fails clearly; the previous version is intact."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from param_server.store import Store
        from param_server.core.errors import StoreIOError
        from tests.helpers import raw_safetensors
        store = Store({str(base.root)!r})
        try:
            with store.staging() as s:
                s.add("global", raw_safetensors({{"w": b"z" * 16}}))
                s.add("layers.0.experts.0", raw_safetensors({{"w": b"q" * 65536}}),
                      )
                store.commit("m", 1, s, allow_schema_change=True)
        except StoreIOError as e:
            print("ERR", e)
            sys.exit(3)
    """)
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 3, p.stderr
    assert (
        "file-size limit" in p.stdout and "last committed version is intact" in p.stdout
    )
    fresh = Store(base.root)
    assert fresh.head("m") == 1 and fresh.fsck() == []
    assert list((base.root / "tmp").iterdir()) == []
    assert os.path.exists(base.root / "models/m/HEAD")
    assert json.loads((base.root / "models/m/HEAD").read_text())["head"] == 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root; skipped otherwise)."""
    with tmpfs(tmp_path / "mnt", "256k") as mnt:
        yield mnt


def test_full_disk_fails_clearly_and_keeps_last_version(small_fs: Path) -> None:
    store = Store(small_fs / "store")
    commit(store, "m", 0, {"global": shard(b"g")})
    with pytest.raises(
        Exception, match=r"disk is full.*The last committed version is intact"
    ) as e:
        commit(
            store,
            "m",
            1,
            {"global": raw_safetensors({"w": b"x" * 512 * 1024})},
            allow_schema_change=True,
        )
    assert type(e.value).__name__ == "StoreIOError"
    assert store.head("m") == 1 and store.fsck() == []
    assert list((store.root / "tmp").iterdir()) == []
    # Space freed: the next commit works.
    commit(store, "m", 1, {"global": shard(b"h")})


def test_read_only_store_refuses_writes_and_still_reads(small_fs: Path) -> None:
    store = Store(small_fs / "store")
    commit(store, "m", 0, {"global": shard(b"g")})
    store.close()  # no file open for writing, or the remount is refused as busy
    remount_read_only(small_fs)
    with pytest.raises(Exception, match="read-only") as e:
        commit(store, "m", 1, {"global": shard(b"h")})
    assert type(e.value).__name__ == "StoreIOError"
    assert Store(store.root).get_manifest("m").version == 1


def test_readers_never_see_a_partial_version(base: Store, tmp_path: Path) -> None:
    """A reader in another process checks every version it sees while commits land."""
    reader = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from param_server.store import Store
        store = Store({str(base.root)!r})
        seen, checks = set(), 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = store.get_manifest("m")  # HEAD, as any reader gets it
            for d in m.digests():
                store.verify_blob(d)  # exists and matches, or raises
            assert set(m.shards) == {{"global", "layers.0.experts.0",
                                      "layers.0.experts.1"}}, m.shards
            seen.add(m.version)
            checks += 1
            if m.version >= 41:
                break
        print(len(seen), checks)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", reader],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for i in range(40):
        commit(
            base,
            "m",
            base.head("m"),
            {
                "layers.0.experts.0": shard(bytes([i % 251])),
                "layers.0.experts.1": shard(bytes([(i + 7) % 251])),
            },
        )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    versions_seen, checks = map(int, out.split())
    assert versions_seen >= 2 and checks >= versions_seen

"""Crash-safe store of content-addressed safetensors blobs and versioned manifests.

On disk (everything under one root directory)::

    STORE_ID                     random id; lets same-host clients recognise the store
    LOCK                         flock()ed by whoever writes (any process)
    blobs/ab/abcdef...           immutable blobs named by the SHA-256 of their bytes
    tmp/<id>/                    staging area of one commit in progress
    models/<model>/HEAD          the model's state: head version, live versions, pins
    models/<model>/manifests/<version>.json   immutable manifests
    models/<model>/history/<seq>.json         one record per HEAD move

Every file is written to a temporary name, fsynced, renamed into place and its
directory fsynced. A commit writes its blobs, then its manifest, then its
history record, and moves HEAD last, so a crash at any instant leaves the last
acknowledged state readable; a version is visible only once HEAD lists it.
The store is torch-free so it imports fast.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from param_server.core import widths
from param_server.core.blob_layout import STORE_ID_FILE, blob_path
from param_server.core.errors import (
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    SchemaMismatchError,
    StaleParentError,
    StoreIOError,
)
from param_server.core.manifest import (
    FileEntry,
    Manifest,
    ShardEntry,
    TensorInfo,
    VersionInfo,
)
from param_server.core.names import (
    check_digest,
    check_file_name,
    check_model_name,
    check_shard_key,
)
from param_server.core.results import CommitResult, GcResult
from param_server.core.safetensors_format import Header, read_header
from param_server.core.shards import is_expert_key

logger = logging.getLogger(__name__)

_HASH_BLOCK = 8 * 1024 * 1024


def utc_now() -> str:
    """The current time as RFC 3339 UTC with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """Writes `data` to `path` so that readers see the old or the new file, whole.

    With `sync_dir` False the caller fsyncs the directory itself (to batch it).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        _fsync_dir(path.parent)


@contextlib.contextmanager
def _io_errors(action: str, path: Path) -> Iterator[None]:
    """Turns OS errors of a write into StoreIOError with a useful hint."""
    try:
        yield
    except OSError as e:
        hint = {
            errno.ENOSPC: "the disk is full; free space or move the store",
            errno.EDQUOT: "the disk quota is exhausted; free space",
            errno.EFBIG: "a file-size limit was hit; raise the limit (ulimit -f)",
            errno.EACCES: "permission denied; check the store directory's owner",
            errno.EROFS: "the file system is read-only",
        }.get(e.errno or 0, "check the store directory")
        raise StoreIOError(
            f"could not {action} at {path}: {e.strerror or e}; {hint}. "
            "The last committed version is intact.",
            e.errno,
        ) from e


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ModelState:
    """Contents of a model's HEAD file."""

    head: int
    seq: int
    versions: tuple[int, ...]
    pinned: tuple[int, ...]
    next_version: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "head": self.head,
                "seq": self.seq,
                "versions": list(self.versions),
                "pinned": list(self.pinned),
                "next_version": self.next_version,
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelState:
        d = json.loads(data)
        return cls(
            d["head"],
            d["seq"],
            tuple(d["versions"]),
            tuple(d["pinned"]),
            d["next_version"],
        )


@dataclass(slots=True)
class StagedBlob:
    """A blob written to the staging area, not yet part of the store."""

    key: str
    path: Path
    digest: str
    size: int
    is_file: bool
    header: Header | None = None
    stacked: frozenset[str] = frozenset()


class BlobWriter:
    """Receives one blob's bytes in chunks, hashing them as they arrive."""

    def __init__(
        self,
        staging: Staging,
        key: str,
        size: int,
        is_file: bool,
        expected_digest: str | None,
        stacked: frozenset[str],
    ) -> None:
        self._staging, self.key, self.size, self.is_file = staging, key, size, is_file
        self._expected, self._stacked = expected_digest, stacked
        self.path = staging.dir / f"{len(staging.blobs)}-{uuid.uuid4().hex}"
        self._hash = hashlib.sha256()
        self._written = 0
        with _io_errors("create a staging file", self.path):
            self._f = open(self.path, "wb")  # noqa: SIM115 - closed in finish()

    def write(self, chunk: bytes | memoryview) -> None:
        if self._written + len(chunk) > self.size:
            self.abort()
            raise InvalidInputError(
                f"{self.key!r}: received more than the announced {self.size} bytes"
            )
        try:
            with _io_errors("write a staging file", self.path):
                self._f.write(chunk)
        except BaseException:
            self.abort()  # an open descriptor would keep the space in use
            raise
        self._hash.update(chunk)
        self._written += len(chunk)

    def abort(self) -> None:
        """Drops the partial blob (also when the disk is full)."""
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def finish(self) -> StagedBlob:
        """Completes the blob: checks its size and digest and validates shards."""
        if self._written != self.size:
            self.abort()
            raise InvalidInputError(
                f"{self.key!r}: stream ended after {self._written} of the announced "
                f"{self.size} bytes"
            )
        try:
            with _io_errors("write a staging file", self.path):
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
        except BaseException:
            self.abort()
            raise
        digest = self._hash.hexdigest()
        if self._expected is not None and digest != self._expected:
            self.path.unlink()
            raise IntegrityError(
                f"{self.key!r}: received bytes hash to {digest} but the sender "
                f"declared {self._expected}; the upload was corrupted, retry it"
            )
        header = None
        if not self.is_file:
            with open(self.path, "rb") as f:
                try:
                    header = read_header(f, self.size, f"shard {self.key!r}")
                except InvalidInputError:
                    self.path.unlink()
                    raise
            names = {t.name for t in header.tensors}
            unknown = sorted(self._stacked - names)
            if unknown:
                raise InvalidInputError(
                    f"shard {self.key!r}: stacked tensor {unknown[0]!r} is not in it"
                )
        blob = StagedBlob(
            self.key, self.path, digest, self.size, self.is_file, header, self._stacked
        )
        self._staging._add(blob)
        return blob


class Staging:
    """The changed shards and files of one commit, before it lands.

    Use as a context manager; whatever was not committed is deleted on exit.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = store.root / "tmp" / uuid.uuid4().hex
        with _io_errors("create a staging directory", self.dir):
            self.dir.mkdir(parents=True)
            # Held while the staging area is alive, so a cleaner in another
            # process can tell a live commit from a crashed one.
            self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.blobs: dict[tuple[bool, str], StagedBlob] = {}

    def _add(self, blob: StagedBlob) -> None:
        self.blobs[(blob.is_file, blob.key)] = blob

    def writer(
        self,
        key: str,
        size: int,
        *,
        is_file: bool = False,
        expected_digest: str | None = None,
        stacked: Iterable[str] = (),
    ) -> BlobWriter:
        """Starts a blob received in chunks (a streamed upload)."""
        (check_file_name if is_file else check_shard_key)(key)
        if (is_file, key) in self.blobs:
            raise InvalidInputError(
                f"{'file' if is_file else 'shard'} {key!r} sent twice"
            )
        if size < 0:
            raise InvalidInputError(f"{key!r}: negative size {size}")
        if expected_digest:
            check_digest(expected_digest)
        return BlobWriter(
            self, key, size, is_file, expected_digest or None, frozenset(stacked)
        )

    def add(
        self,
        key: str,
        data: bytes | memoryview,
        *,
        is_file: bool = False,
        stacked: Iterable[str] = (),
    ) -> StagedBlob:
        """Stages one whole blob (a shard's safetensors bytes, or a file)."""
        w = self.writer(key, len(data), is_file=is_file, stacked=stacked)
        w.write(data)
        return w.finish()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store:
    """A parameter store rooted at one directory; safe across threads and processes.

    Args:
        root: the store directory; created (with parents) when missing.
        create: when False, a missing store is an error instead.

    Raises:
        StoreIOError: the directory cannot be created or written.
        NotFoundError: `create` is False and there is no store at `root`.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        id_path = self.root / STORE_ID_FILE
        if not id_path.exists():
            if not create:
                raise NotFoundError(f"no parameter store at {self.root}")
            with _io_errors("create the store", self.root):
                for sub in ("blobs", "tmp", "models"):
                    (self.root / sub).mkdir(parents=True, exist_ok=True)
                _atomic_write(id_path, uuid.uuid4().hex.encode())
        self.store_id = id_path.read_text().strip()
        self.blob_root = self.root / "blobs"
        self._thread_lock = threading.RLock()
        self._lock_path = self.root / "LOCK"
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._manifests: dict[tuple[str, int], Manifest] = {}
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._verified_lock = threading.Lock()
        # One maker per (kind, source) at a time: the other requests for the
        # same variant (a fleet fetching a new expert) wait and reuse it.
        self._making: dict[tuple[str, str], threading.Lock] = {}
        self._making_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # --- locking ---------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Exclusive across threads (RLock) and processes (flock on LOCK)."""
        with self._thread_lock:
            if self._lock_depth == 0:
                if self._lock_fd is None:
                    with _io_errors("open the store lock", self._lock_path):
                        self._lock_fd = os.open(
                            self._lock_path, os.O_RDWR | os.O_CREAT, 0o644
                        )
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def writable(self) -> bool:
        """False when this process cannot write the store (a read-only mount,
        or no permission): it can still be read and served read-only."""
        try:
            if os.statvfs(self.root).f_flag & os.ST_RDONLY:
                return False
        except OSError:
            return False
        return all(os.access(p, os.W_OK) for p in (self.root, self.root / "models"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- paths -----------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob with this digest lives (it may not exist)."""
        check_digest(digest)
        return blob_path(self.blob_root, digest)

    def _model_dir(self, model: str) -> Path:
        return self.root / "models" / check_model_name(model)

    # --- reading ---------------------------------------------------------------

    def list_models(self) -> list[str]:
        """Names of the models that have at least one committed version."""
        models = self.root / "models"
        return sorted(p.name for p in models.iterdir() if (p / "HEAD").is_file())

    def state(self, model: str) -> ModelState:
        """The model's current state (head, live versions, pins).

        Raises:
            NotFoundError: the model has no committed version.
        """
        path = self._model_dir(model) / "HEAD"
        try:
            return ModelState.from_json(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(
                f"unknown model {model!r}; known models: {self.list_models()}"
            ) from None

    def head(self, model: str) -> int:
        """The model's HEAD version."""
        return self.state(model).head

    def get_manifest(self, model: str, version: int | None = None) -> Manifest:
        """The manifest of `version` (HEAD when None or 0).

        Raises:
            NotFoundError: unknown model, or a version that is not live.
        """
        st = self.state(model)
        v = version or st.head
        if v not in st.versions:
            raise NotFoundError(
                f"model {model!r} has no version {v}; live versions are "
                f"{_ranges(st.versions)} (HEAD is {st.head})"
            )
        cached = self._manifests.get((model, v))
        if cached is not None:
            return cached
        path = self._model_dir(model) / "manifests" / f"{v}.json"
        try:
            m = Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(
                f"model {model!r} version {v} was garbage-collected"
            ) from None
        self._manifests[(model, v)] = m
        return m

    def list_versions(self, model: str) -> list[VersionInfo]:
        """Live versions, oldest first, with provenance."""
        st = self.state(model)
        out = []
        for v in st.versions:
            try:
                m = self.get_manifest(model, v)
            except NotFoundError:
                continue  # collected between reading HEAD and the manifest
            out.append(
                VersionInfo(
                    v,
                    m.parent,
                    m.created_at,
                    m.author,
                    m.message,
                    v in st.pinned,
                    v == st.head,
                    len(m.changed),
                )
            )
        return out

    def history(self, model: str, since: int = 0) -> list[dict[str, Any]]:
        """Acknowledged HEAD moves (commits, rollbacks, pins, GC) with a sequence
        number above `since`, oldest first."""
        st = self.state(model)
        hist = self._model_dir(model) / "history"
        return [
            json.loads((hist / f"{s:012d}.json").read_bytes())
            for s in range(max(since, 0) + 1, st.seq + 1)
        ]

    def verify_blob(self, digest: str) -> Path:
        """Checks a blob's bytes against its digest; returns its path.

        A blob is re-hashed only when its size, mtime or inode changed since
        it was last verified by this process.

        Raises:
            NotFoundError: the blob is missing.
            IntegrityError: its bytes no longer match the digest.
        """
        path = self.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from the store") from None
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(digest) == sig:
            return path
        actual = sha256_file(path)
        if actual != digest:
            logger.error("blob %s is corrupt (hashes to %s)", digest, actual)
            raise IntegrityError(
                f"blob {digest} is corrupt: its bytes hash to {actual}; restore it "
                "from a backup or re-import the model"
            )
        with self._verified_lock:
            self._verified[digest] = sig
        return path

    # --- quantized variants ----------------------------------------------------

    def _variant_record(self, kind: str, digest: str) -> Path:
        return self.root / "variants" / kind / digest

    def variant(self, digest: str, kind: str) -> tuple[str, int]:
        """(digest, size) of the `kind` (int8 or fp8) variant of blob `digest`,
        a shard's safetensors bytes (see `quant.encode_variant`).

        Made on first request from the verified source, stored as a
        content-addressed blob and recorded against the source's digest
        (`variants/<kind>/<source digest>`), so it is made once per
        distinct shard, survives restarts, and goes when gc collects its
        source. A recorded variant that is missing or fails its digest is
        made again.

        Raises:
            InvalidInputError: an unknown kind, or a source with NaN/Inf.
            NotFoundError, IntegrityError: the source is missing or corrupt.
        """
        check_digest(digest)
        if kind not in (widths.INT8, widths.FP8):
            widths.check_width(kind)
            raise InvalidInputError(f"the stored width has no variant ({kind!r})")
        made = self._recorded_variant(kind, digest)
        if made is not None:
            return made
        with self._making_lock:
            maker = self._making.setdefault((kind, digest), threading.Lock())
        try:
            with maker:
                made = self._recorded_variant(kind, digest)  # made meanwhile?
                return made if made is not None else self._make_variant(kind, digest)
        finally:
            with self._making_lock:
                if not maker.locked():
                    self._making.pop((kind, digest), None)

    def variants_to_make(
        self, parent: Manifest | None, manifest: Manifest
    ) -> list[tuple[str, str]]:
        """(source digest, kind) of the variants nodes will ask for next: for
        every expert shard `manifest` changed against `parent`, each width
        the shard's previous bytes have a variant of (a width in use for it)
        that its new bytes lack. Cheap: a look at the variant records."""
        if parent is None:
            return []
        out = []
        for key in manifest.changed:
            entry, old = manifest.shards.get(key), parent.shards.get(key)
            if entry is None or old is None or not is_expert_key(key):
                continue
            for kind in (widths.INT8, widths.FP8):
                if (
                    self._variant_record(kind, old.digest).exists()
                    and not self._variant_record(kind, entry.digest).exists()
                ):
                    out.append((entry.digest, kind))
        return out

    def _recorded_variant(self, kind: str, digest: str) -> tuple[str, int] | None:
        """The recorded `kind` variant of `digest`, verified; None when there is
        none, or it is gone or corrupt (then it is to be made again)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            made = self._variant_record(kind, digest).read_text().strip()
            try:
                path = self.verify_blob(made)
                return made, path.stat().st_size
            except (NotFoundError, IntegrityError):
                logger.warning(
                    "variant %s of %s is gone or corrupt; remaking it", kind, digest
                )
        return None

    def _make_variant(self, kind: str, digest: str) -> tuple[str, int]:
        record = self._variant_record(kind, digest)
        # torch only here: a store that makes no variants never imports it.
        from param_server.core import quant, tensor_codec

        source = self.verify_blob(digest)
        tensors = tensor_codec.decode(source.read_bytes(), f"blob {digest}")
        data = quant.encode_variant(tensors, kind, digest)
        with self._write_lock(), self.staging() as staging:
            blob = staging.add(f"variant-{kind}", data)
            dest = self.blob_path(blob.digest)
            with contextlib.suppress(FileNotFoundError):
                if sha256_file(dest) != blob.digest:  # a corrupt leftover
                    dest.unlink()
            self._install_blobs(staging)
            with _io_errors("record a variant", record):
                record.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(record, blob.digest.encode())
        return blob.digest, blob.size

    # --- writing ---------------------------------------------------------------

    def staging(self) -> Staging:
        """A staging area for the shards and files of one commit."""
        return Staging(self)

    def commit(
        self,
        model: str,
        parent: int,
        staging: Staging,
        *,
        remove: Iterable[str] = (),
        author: str = "",
        message: str = "",
        metadata: Mapping[str, Any] | None = None,
        allow_schema_change: bool = False,
    ) -> CommitResult:
        """Commits the staged shards and files as a new version of `model`.

        Args:
            model: the model name; a new model needs `parent` 0.
            parent: the version this commit is based on (compare-and-set with
                HEAD); 0 creates the model.
            staging: the changed shards and files; unchanged ones are
                inherited from `parent`.
            remove: shard keys to drop (a schema change).
            author, message, metadata: provenance recorded in the manifest.
            allow_schema_change: accept tensor names, shapes or dtypes that
                differ from the parent's, and added or removed shards.

        Returns:
            The new manifest and how many blobs and bytes were written.

        Raises:
            StaleParentError: `parent` is not HEAD (someone committed first).
            SchemaMismatchError: a tensor differs from the parent's.
            NotFoundError: `parent` names a model that does not exist.
            StoreIOError: the store could not be written; nothing changed.
        """
        check_model_name(model)
        remove = [check_shard_key(k) for k in remove]
        meta = dict(metadata or {})
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"metadata is not JSON-serialisable: {e}") from e
        base = self.check_parent(model, parent)
        shards = dict(base.shards) if base else {}
        files = dict(base.files) if base else {}
        for k in remove:
            if k not in shards:
                raise NotFoundError(
                    f"model {model!r} version {parent} has no shard {k!r}"
                )
            if not allow_schema_change:
                raise SchemaMismatchError(
                    f"removing shard {k!r} changes the model's schema; pass "
                    "allow_schema_change to do it on purpose"
                )
            del shards[k]
        changed = []
        for (is_file, key), blob in sorted(staging.blobs.items()):
            if is_file:
                check_model_file(key, blob.path)
                files[key] = FileEntry(key, blob.digest, blob.size)
                continue
            assert blob.header is not None
            prev = shards.get(key)
            stacked = blob.stacked or (
                {t.name for t in prev.tensors if t.stacked} if prev else set()
            )
            tensors = tuple(
                TensorInfo(t.name, t.dtype, t.shape, t.name in stacked)
                for t in sorted(blob.header.tensors, key=lambda t: t.name)
            )
            if base is not None and not allow_schema_change:
                _check_schema(model, key, prev, tensors)
            if prev is None or prev.digest != blob.digest:
                changed.append(key)
            shards[key] = ShardEntry(key, blob.digest, blob.size, tensors)
        if not shards:
            raise InvalidInputError(f"commit to {model!r} has no shards")

        mdir = self._model_dir(model)
        with self._write_lock():
            base = self.check_parent(model, parent)  # again, now exclusively
            st = self._state_or_none(model)
            version = st.next_version if st else 1
            manifest = Manifest(
                model=model,
                version=version,
                parent=parent,
                created_at=utc_now(),
                author=author,
                message=message,
                metadata=meta,
                shards=shards,
                files=files,
                changed=tuple(changed),
            )
            new = ModelState(
                head=version,
                seq=(st.seq if st else 0) + 1,
                versions=(st.versions if st else ()) + (version,),
                pinned=st.pinned if st else (),
                next_version=version + 1,
            )
            record = self._record(
                new,
                {
                    "action": "commit",
                    "version": version,
                    "parent": parent,
                    "author": author,
                    "message": message,
                    "changed": len(changed),
                },
            )
            with _io_errors("write the manifest", mdir):
                (mdir / "manifests").mkdir(parents=True, exist_ok=True)
                (mdir / "history").mkdir(exist_ok=True)
            # Blobs, manifest and history record are invisible until HEAD
            # moves, so they become durable in parallel (one fsync wait
            # instead of several); HEAD is written only after all of them.
            pool = self._io_pool()
            install = pool.submit(self._install_blobs, staging)
            writes = [
                pool.submit(self._write_invisible, path, data)
                for path, data in (
                    (mdir / "manifests" / f"{version}.json", manifest.to_json()),
                    (mdir / "history" / f"{new.seq:012d}.json", record),
                )
            ]
            written, nbytes = install.result()
            for w in writes:
                w.result()
            with _io_errors("move HEAD", mdir):
                for f in [
                    pool.submit(_fsync_dir, mdir / d) for d in ("manifests", "history")
                ]:
                    f.result()
                _atomic_write(mdir / "HEAD", new.to_json())
            self._manifests[(model, version)] = manifest
        logger.info(
            "committed %s@%d (parent %d): %d changed shards, %d new blobs, %d bytes",
            model,
            version,
            parent,
            len(changed),
            written,
            nbytes,
        )
        return CommitResult(manifest, written, nbytes)

    def _state_or_none(self, model: str) -> ModelState | None:
        try:
            return self.state(model)
        except NotFoundError:
            return None

    def check_parent(self, model: str, parent: int) -> Manifest | None:
        """The parent's manifest if `parent` is HEAD (None for a new model).

        Raises:
            StaleParentError: `parent` is not HEAD.
            NotFoundError: a non-zero parent for a model that does not exist.
        """
        if not isinstance(parent, int) or parent < 0:
            raise InvalidInputError(f"parent version must be >= 0, got {parent!r}")
        st = self._state_or_none(model)
        if st is None:
            if parent != 0:
                raise NotFoundError(
                    f"unknown model {model!r}; commit with parent 0 to create it"
                )
            return None
        if parent != st.head:
            raise StaleParentError.for_versions(model, parent, st.head)
        return self.get_manifest(model, parent)

    def _install_blobs(self, staging: Staging) -> tuple[int, int]:
        """Moves staged blobs into blobs/ (fsynced); returns (count, bytes) new."""
        dirs: set[Path] = set()
        written = nbytes = 0
        for blob in staging.blobs.values():
            dest = self.blob_path(blob.digest)
            with contextlib.suppress(FileNotFoundError):
                if dest.stat().st_size == blob.size:
                    continue  # content-addressed: already there
            with _io_errors("install a blob", dest):
                if not dest.parent.is_dir():
                    dest.parent.mkdir(exist_ok=True)
                    dirs.add(self.blob_root)
                os.replace(blob.path, dest)
            dirs.add(dest.parent)
            written += 1
            nbytes += blob.size
        with _io_errors("sync the blob directory", self.blob_root):
            for d in dirs:
                _fsync_dir(d)
        return written, nbytes

    def _io_pool(self) -> ThreadPoolExecutor:
        with self._thread_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="store-io"
                )
            return self._pool

    @staticmethod
    def _record(new: ModelState, fields: dict[str, Any]) -> bytes:
        return json.dumps({"seq": new.seq, "time": utc_now(), **fields}).encode()

    @staticmethod
    def _write_invisible(path: Path, data: bytes) -> None:
        """A durable file not yet referenced by HEAD (its directory synced later)."""
        with _io_errors("write", path):
            _atomic_write(path, data, sync_dir=False)

    def _move_head(self, model: str, new: ModelState, record: dict[str, Any]) -> None:
        """Writes the history record, then HEAD (the commit point). Needs the lock."""
        mdir = self._model_dir(model)
        with _io_errors("move HEAD", mdir):
            (mdir / "history").mkdir(parents=True, exist_ok=True)
            _atomic_write(
                mdir / "history" / f"{new.seq:012d}.json", self._record(new, record)
            )
            _atomic_write(mdir / "HEAD", new.to_json())

    def rollback(
        self, model: str, version: int, *, author: str = "", message: str = ""
    ) -> tuple[int, int]:
        """Moves HEAD to an existing live version; returns (previous, new) HEAD.

        Later commits are based on the new HEAD; the versions after it stay
        listed and can be rolled forward to.

        Raises:
            NotFoundError: unknown model or a version that is not live.
        """
        with self._write_lock():
            st = self.state(model)
            if version not in st.versions:
                raise NotFoundError(
                    f"cannot roll {model!r} back to version {version}: live versions "
                    f"are {_ranges(st.versions)}"
                )
            self._move_head(
                model,
                ModelState(
                    version, st.seq + 1, st.versions, st.pinned, st.next_version
                ),
                {
                    "action": "rollback",
                    "version": version,
                    "from": st.head,
                    "author": author,
                    "message": message,
                },
            )
        logger.info("rolled %s back from %d to %d", model, st.head, version)
        return st.head, version

    def set_pin(self, model: str, version: int, pinned: bool = True) -> tuple[int, ...]:
        """Pins (or unpins) a live version so GC keeps it; returns the pins."""
        with self._write_lock():
            st = self.state(model)
            if version not in st.versions:
                raise NotFoundError(f"model {model!r} has no live version {version}")
            pins = set(st.pinned)
            pins.add(version) if pinned else pins.discard(version)
            new = ModelState(
                st.head, st.seq + 1, st.versions, tuple(sorted(pins)), st.next_version
            )
            self._move_head(
                model, new, {"action": "pin" if pinned else "unpin", "version": version}
            )
        return new.pinned

    def collect_garbage(self, keep_last: int = 10, dry_run: bool = False) -> GcResult:
        """`gc`, as `ParamClient.collect_garbage` names it (see `VersionAdmin`)."""
        return self.gc(keep_last, dry_run=dry_run)

    def gc(self, keep_last: int = 10, *, dry_run: bool = False) -> GcResult:
        """Drops all but the newest `keep_last` versions (plus pinned ones and
        HEAD) of every model, then deletes blobs no retained version references
        and leftovers of crashed commits."""
        if keep_last < 1:
            raise InvalidInputError(f"keep_last must be >= 1, got {keep_last}")
        result = GcResult()
        with self._write_lock():
            referenced: set[str] = set()
            for model in self.list_models():
                st = self.state(model)
                keep = set(st.versions[-keep_last:]) | set(st.pinned) | {st.head}
                drop = [v for v in st.versions if v not in keep]
                for v in keep:
                    referenced |= self.get_manifest(model, v).digests()
                result.dropped_versions += [(model, v) for v in drop]
                if dry_run or not drop:
                    continue
                new = ModelState(
                    st.head,
                    st.seq + 1,
                    tuple(v for v in st.versions if v in keep),
                    st.pinned,
                    st.next_version,
                )
                self._move_head(model, new, {"action": "gc", "dropped": drop})
                mdir = self._model_dir(model) / "manifests"
                for f in mdir.iterdir():  # dropped ones and orphans of crashes
                    number = int(f.stem) if f.stem.isdigit() else None
                    if number not in keep:
                        f.unlink(missing_ok=True)
                        self._manifests.pop((model, number or 0), None)
            # A variant lives as long as its source: kept with it, else
            # its record goes (and its blob below).
            for record in self._variant_records():
                if record.name in referenced:
                    with contextlib.suppress(OSError):
                        referenced.add(record.read_text().strip())
                elif not dry_run:
                    record.unlink(missing_ok=True)
            for sub in self.blob_root.iterdir():
                for blob in sub.iterdir():
                    if blob.name not in referenced:
                        result.blobs_deleted += 1
                        result.bytes_freed += blob.stat().st_size
                        if not dry_run:
                            blob.unlink()
            if not dry_run:
                self.clean_staging()
        logger.info(
            "gc: dropped %d versions, %d blobs, %d bytes%s",
            len(result.dropped_versions),
            result.blobs_deleted,
            result.bytes_freed,
            " (dry run)" if dry_run else "",
        )
        return result

    def _variant_records(self) -> list[Path]:
        root = self.root / "variants"
        if not root.is_dir():
            return []
        return [r for kind in root.iterdir() if kind.is_dir() for r in kind.iterdir()]

    def clean_staging(self) -> None:
        """Removes staging areas whose owner died (their flock is free)."""
        for d in (self.root / "tmp").iterdir():
            try:
                fd = os.open(d / ".lock", os.O_RDWR)
            except OSError:
                shutil.rmtree(d, ignore_errors=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live commit in another process or thread
            else:
                shutil.rmtree(d, ignore_errors=True)
            finally:
                os.close(fd)

    def fsck(self) -> list[str]:
        """Checks every live manifest's blobs exist and match; returns problems."""
        problems = []
        for model in self.list_models():
            st = self.state(model)
            if st.head not in st.versions:
                problems.append(f"{model}: HEAD {st.head} is not a live version")
            for v in st.versions:
                try:
                    m = self.get_manifest(model, v)
                except (NotFoundError, ValueError, KeyError) as e:
                    problems.append(f"{model}@{v}: manifest unreadable: {e}")
                    continue
                for d in sorted(m.digests()):
                    try:
                        self.verify_blob(d)
                    except (NotFoundError, IntegrityError) as e:
                        problems.append(f"{model}@{v}: {e}")
        return problems


def check_model_file(name: str, path: Path) -> None:
    """Refuses a model file that cannot be what its name says: every `.json`
    file (config, generation config, tokenizer files, ...) must parse as
    JSON, and `config.json` must be an object, or a node fails later on it.

    Raises:
        InvalidInputError: naming the file and where it is broken.
    """
    if not name.endswith(".json"):
        return
    try:
        doc = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise InvalidInputError(
            f"model file {name!r} is not valid JSON ({e.msg} at line {e.lineno} "
            f"column {e.colno}); fix it or leave it out, and commit again"
        ) from e
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"model file {name!r} is not UTF-8 text ({e.reason} at byte "
            f"{e.start}); fix it or leave it out, and commit again"
        ) from e
    if name == "config.json" and not isinstance(doc, dict):
        raise InvalidInputError(
            f"model file 'config.json' must be a JSON object, got {type(doc).__name__}"
        )


def _check_schema(
    model: str, key: str, prev: ShardEntry | None, tensors: tuple[TensorInfo, ...]
) -> None:
    if prev is None:
        raise SchemaMismatchError(
            f"model {model!r}: shard {key!r} does not exist in the parent version; "
            "pass allow_schema_change to add shards"
        )
    old = {t.name: t for t in prev.tensors}
    new = {t.name: t for t in tensors}
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            what = "is new" if a is None else "is missing"
            raise SchemaMismatchError(
                f"model {model!r} shard {key!r}: tensor {name!r} {what} compared to "
                "the parent version; pass allow_schema_change to do it on purpose"
            )
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            raise SchemaMismatchError(
                f"model {model!r} shard {key!r}: tensor {name!r} is {b.dtype} "
                f"{list(b.shape)} but the parent has {a.dtype} {list(a.shape)}; "
                "pass allow_schema_change to do it on purpose"
            )


def _ranges(versions: Iterable[int]) -> str:
    vs = sorted(versions)
    if not vs:
        return "none"
    runs: list[list[int]] = []
    for v in vs:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(parts)

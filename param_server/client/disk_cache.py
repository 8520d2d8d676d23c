"""A bounded on-disk cache of blobs keyed by digest, so a restarted node warms fast."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import threading
import uuid
from pathlib import Path

from param_server.core.errors import IntegrityError
from param_server.core.names import check_digest

logger = logging.getLogger(__name__)


class VerifiedMapper:
    """Maps blob files copy-on-write and checks each against its digest once.

    A file is re-hashed only when its size, mtime or inode changed since this
    mapper last verified it.
    """

    def __init__(self) -> None:
        self._verified: dict[str, tuple[int, int, int]] = {}

    def forget(self, digest: str) -> None:
        self._verified.pop(digest, None)

    def map(self, path: Path, digest: str, size: int) -> mmap.mmap | None:
        """The file mapped, if it exists with `size` bytes hashing to `digest`.

        Returns None when it is missing, unreadable or of another size.

        Raises:
            IntegrityError: its bytes do not hash to `digest`.
        """
        if size == 0:
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                return None
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._verified.get(digest) != sig:
            actual = hashlib.sha256(mm).hexdigest()
            if actual != digest:
                mm.close()
                raise IntegrityError(f"{path} hashes to {actual}, not {digest}")
            self._verified[digest] = sig
        return mm

    def touched(self, path: Path, digest: str) -> None:
        """Records a file's new mtime after the owner touched it on purpose."""
        with contextlib.suppress(OSError):
            st = path.stat()
            if digest in self._verified:
                self._verified[digest] = (st.st_size, st.st_mtime_ns, st.st_ino)


class DiskBlobCache:
    """Blobs on local disk under `root/ab/<digest>`, at most `max_bytes` in all.

    Every blob is checked against its digest the first time this process
    maps it (and again whenever the file changes); one that fails is deleted
    and reported as missing, so it is fetched again. When full, the blobs
    used least recently are deleted first. Writes are atomic (temporary name,
    then rename); no fsync: a torn file after a crash fails its digest.

    Args:
        root: the cache directory (created when missing).
        max_bytes: the most bytes of blobs kept.
    """

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"disk cache size must be positive, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._mapper = VerifiedMapper()
        self._bytes = sum(p.stat().st_size for p in self._files())

    def _files(self) -> list[Path]:
        return [
            p
            for d in self.root.iterdir()
            if d.is_dir()
            for p in d.iterdir()
            if not p.name.startswith(".")
        ]

    def _path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, digest: str, size: int) -> mmap.mmap | None:
        """The blob mapped copy-on-write, verified; None when absent or corrupt."""
        path = self._path(digest)
        try:
            mm = self._mapper.map(path, digest, size)
        except IntegrityError:
            mm = None
        if mm is None:
            if path.exists():
                logger.warning(
                    "disk cache: %s is corrupt or truncated; dropping it", digest
                )
                self._remove(path)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # mtime orders eviction: used now
        self._mapper.touched(path, digest)
        return mm

    def put(
        self, digest: str, data: bytes | bytearray | memoryview | mmap.mmap
    ) -> None:
        """Stores a blob already verified by the caller, evicting old ones if full."""
        n = len(data)
        if n > self.max_bytes:
            return
        path = self._path(digest)
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{digest}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("disk cache: could not store %s: %s", digest, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with self._lock:
            self._bytes += n
            over = self._bytes - self.max_bytes
        if over > 0:
            self._evict(over, keep=path)

    def _evict(self, need: int, keep: Path) -> None:
        files = []
        for p in self._files():
            with contextlib.suppress(FileNotFoundError):
                files.append((p.stat().st_mtime_ns, p))
        for _, p in sorted(files):
            if need <= 0:
                break
            if p == keep:
                continue
            need -= self._remove(p)

    def _remove(self, path: Path) -> int:
        try:
            n = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        with self._lock:
            self._bytes -= n
        self._mapper.forget(path.name)
        return n

"""Moving blob bytes to a client: several verified streams at once (each
chunk copied once and hashed on a side thread while the next arrives), the
same-host path that maps the daemon's blob files, and the disk tier."""

from __future__ import annotations

import hashlib
import logging
import mmap
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc

from param_server.api.convert import FETCH_DATA_FIELD
from param_server.api.v1 import param_server_pb2 as pb
from param_server.client.channel import Connection
from param_server.client.disk_cache import DiskBlobCache, VerifiedMapper
from param_server.core.blob_layout import blob_path, store_id_path
from param_server.core.errors import IntegrityError
from param_server.core.framing import parse_bytes_field
from param_server.core.manifest import Manifest

logger = logging.getLogger(__name__)

Buffer = bytearray | mmap.mmap
Wanted = dict[str, tuple[str, int, bool]]
"""Key -> (digest, size, is a model file)."""


class BlobFetcher:
    """Verified blobs of one daemon, from wherever is cheapest: the shared
    store's files, the disk tier, or parallel streams over `conn`."""

    def __init__(
        self,
        conn: Connection,
        *,
        same_host: bool = True,
        disk_cache: DiskBlobCache | None = None,
    ) -> None:
        self.conn = conn
        self._pool = ThreadPoolExecutor(
            max_workers=conn.streams, thread_name_prefix="param-fetch"
        )
        self._hashers = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="param-hash")
            for _ in range(conn.streams)
        ]
        self._same_host = same_host
        self._disk = disk_cache
        self._blob_root: Path | None = None
        self._local_checked = False
        self._mapper = VerifiedMapper()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for h in self._hashers:
            h.shutdown(wait=False, cancel_futures=True)

    def fetch(
        self,
        manifest: Manifest,
        wanted: dict[str, tuple[str, int, bool]],
        tick: Callable[[int], object],
        width: str = "",
    ) -> dict[str, Buffer]:
        """Verified bytes of `wanted`; with a `width`, its digests and sizes
        are those of the shards' variants (see ParamClient.variants)."""
        out: dict[str, Buffer] = {}
        remote = {}
        # Mapping verifies unseen blobs (SHA-256 releases the GIL): in parallel.
        mapped = (
            self._pool.map(
                lambda kv: self._map_local(kv[1][0], kv[1][1]), wanted.items()
            )
            if self._local_root() is not None
            else [None] * len(wanted)
        )
        for (k, (digest, size, is_file)), local in zip(
            wanted.items(), mapped, strict=True
        ):
            if local is None and self._disk is not None:
                local = self._disk.get(digest, size)
                if local is not None:
                    with self.conn.stats_lock:
                        self.conn.stats.blobs_from_disk += 1
                        self.conn.stats.bytes_from_disk += size
            if local is not None:
                out[k] = local
                tick(size)
            else:
                remote[k] = (digest, size, is_file)
        if remote:
            fetched = self._fetch_remote(manifest, remote, tick, width)
            if self._disk is not None:
                for k, buf in fetched.items():
                    self._disk.put(remote[k][0], buf)  # verified on receipt
            out.update(fetched)
        return out

    # --- remote fetch ----------------------------------------------------------

    def _fetch_remote(
        self,
        m: Manifest,
        wanted: dict[str, tuple[str, int, bool]],
        tick: Callable[[int], object],
        width: str,
    ) -> dict[str, Buffer]:
        # Balance streams by bytes: largest first onto the lightest stream.
        n = min(self.conn.streams, len(wanted))
        groups: list[list[str]] = [[] for _ in range(n)]
        loads = [0] * n
        for k in sorted(wanted, key=lambda k: -wanted[k][1]):
            i = loads.index(min(loads))
            groups[i].append(k)
            loads[i] += wanted[k][1]
        if n == 1:
            return self._fetch_group(0, m, groups[0], wanted, tick, width)
        results = list(
            self._pool.map(
                lambda ig: self._fetch_group(ig[0], m, ig[1], wanted, tick, width),
                enumerate(groups),
            )
        )
        out: dict[str, Buffer] = {}
        for r in results:
            out.update(r)
        return out

    def _fetch_group(
        self,
        stream: int,
        m: Manifest,
        keys: list[str],
        wanted: dict[str, tuple[str, int, bool]],
        tick: Callable[[int], object],
        width: str,
    ) -> dict[str, Buffer]:
        out: dict[str, Buffer] = {}
        refetched: set[str] = set()
        while True:
            if all(k in out for k in keys):
                return out
            # Each attempt asks only for what earlier attempts did not deliver.
            bad = self.conn.retry(
                f"fetch blobs of {m.model}@{m.version}",
                lambda: self._stream_into(
                    stream,
                    m,
                    [k for k in keys if k not in out],
                    wanted,
                    out,
                    tick,
                    width,
                ),
            )
            for k in bad:
                if k in refetched:
                    raise IntegrityError(
                        f"{m.model}@{m.version} {k!r}: received bytes failed digest "
                        f"{wanted[k][0]} twice; the server's copy or the network "
                        "is corrupting data"
                    )
                refetched.add(k)

    def _stream_into(
        self,
        stream: int,
        m: Manifest,
        keys: list[str],
        wanted: dict[str, tuple[str, int, bool]],
        out: dict[str, Buffer],
        tick: Callable[[int], object],
        width: str,
    ) -> list[str]:
        """One FetchShards stream; fills `out`, returns keys that failed digests.

        Chunks are copied once, from the received message into the blob's
        buffer; hashing runs on this stream's hashing thread, overlapping the
        receipt of the next chunk.
        """
        call = self.conn.fetch_calls[stream](
            pb.FetchShardsRequest(
                model=m.model,
                version=m.version,
                shard_keys=[k for k in keys if not wanted[k][2]],
                file_names=[k for k in keys if wanted[k][2]],
                width=width,
            ),
            timeout=self.conn.stream_timeout,
            metadata=self.conn.metadata,
        )
        hasher = self._hashers[stream]
        received: list[tuple[pb.BlobHeader, bytearray, int, Future[str]]] = []
        header: pb.BlobHeader | None = None
        buf = bytearray()
        view = memoryview(buf)
        pos = 0
        h = hashlib.sha256()

        def close_blob() -> None:
            if header is not None:
                received.append((header, buf, pos, hasher.submit(h.hexdigest)))

        for msg in call:
            payload = parse_bytes_field(msg, FETCH_DATA_FIELD)
            if payload is None:
                chunk = pb.FetchChunk.FromString(msg)
                if chunk.HasField("header"):
                    close_blob()
                    header = chunk.header
                    if header.key not in wanted or header.size != wanted[header.key][1]:
                        raise IntegrityError(
                            f"server sent unexpected blob {header.key!r}"
                        )
                    buf = bytearray(header.size)
                    view = memoryview(buf)
                    pos = 0
                    h = hashlib.sha256()
                    continue
                payload = memoryview(chunk.data)
            n = len(payload)
            if header is None or pos + n > len(view):
                raise IntegrityError("server sent data outside a blob")
            view[pos : pos + n] = payload
            hasher.submit(h.update, view[pos : pos + n])
            pos += n
        close_blob()

        bad: list[str] = []
        for hdr, data, size, digest in received:
            if size != hdr.size:
                raise IntegrityError(
                    f"{hdr.key!r}: stream ended after {size} of {hdr.size} bytes"
                )
            if digest.result() == wanted[hdr.key][0] == hdr.digest:
                out[hdr.key] = data
                tick(size)
                with self.conn.stats_lock:
                    self.conn.stats.bytes_streamed += size
                    self.conn.stats.blobs_streamed += 1
            else:
                logger.warning(
                    "%s@%d %r failed its digest; will refetch",
                    m.model,
                    m.version,
                    hdr.key,
                )
                with self.conn.stats_lock:
                    self.conn.stats.digest_failures += 1
                bad.append(hdr.key)
        return bad

    # --- same-host fast path ---------------------------------------------------

    def _local_root(self) -> Path | None:
        if not self._same_host:
            return None
        with self._lock:
            if not self._local_checked:
                try:
                    info = self.conn.stubs[0].GetStoreInfo(
                        pb.GetStoreInfoRequest(),
                        timeout=self.conn.timeout,
                        metadata=self.conn.metadata,
                    )
                    self._local_checked = True
                    root = Path(info.blob_root)
                    if store_id_path(root).read_text().strip() == info.store_id:
                        self._blob_root = root
                        logger.info(
                            "same-host store at %s: mapping blobs directly", root
                        )
                except grpc.RpcError:
                    self._blob_root = None  # asked again next time
                except OSError:
                    self._blob_root = None  # not this host's store
            return self._blob_root

    def _map_local(self, digest: str, size: int) -> mmap.mmap | None:
        """The blob mapped copy-on-write from the shared store, verified; or None."""
        root = self._local_root()
        if root is None:
            return None
        try:
            mm = self._mapper.map(blob_path(root, digest), digest, size)
        except IntegrityError as e:
            logger.warning("local blob failed its digest (%s); streaming instead", e)
            return None
        if mm is not None:
            with self.conn.stats_lock:
                self.conn.stats.bytes_mapped += size
                self.conn.stats.blobs_mapped += 1
        return mm

"""ParamClient: typed access to a param-server, with verification and retries."""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import grpc
import torch
from tqdm import tqdm

from param_server.api.convert import (
    COMMIT_DATA_FIELD,
    FETCH_DATA_FIELD,
    SERVICE_NAME,
    manifest_from_proto,
    version_from_proto,
)
from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from param_server.client.disk_cache import DiskBlobCache, VerifiedMapper
from param_server.core import tensor_codec
from param_server.core.auth import AUTH_HEADER, Credentials, is_loopback_host
from param_server.core.backoff import Backoff
from param_server.core.errors import (
    ERROR_KIND_KEY,
    BusyError,
    ErrorKind,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
    ParamServerError,
    UnavailableError,
    kind_for,
)
from param_server.core.framing import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    frame_bytes_field,
    parse_bytes_field,
)
from param_server.core.manifest import Manifest, VersionInfo
from param_server.core.results import CommitResult, GcResult

logger = logging.getLogger(__name__)

T = TypeVar("T")
Buffer = bytearray | mmap.mmap

# How long a client keeps retrying a server that refuses streams as busy.
BUSY_PATIENCE = 120.0


def _kind(e: grpc.RpcError) -> ErrorKind:
    """The kind of error a failed call is (see errors.ERRORS)."""
    trailers = e.trailing_metadata() or ()
    name = next((v for k, v in trailers if k == ERROR_KIND_KEY), None)
    kind = kind_for(e.code().name, name if isinstance(name, str) else None)
    if (
        kind.error is not BusyError
        and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "Concurrent RPC limit" in (e.details() or "")
    ):  # grpc's own refusal (maximum_concurrent_rpcs), before our code runs
        return kind_for("", BusyError.__name__)
    return kind


def _is_busy(e: grpc.RpcError) -> bool:
    """The server refused the call before doing anything, for lack of slots."""
    return _kind(e).error is BusyError


def _error(e: grpc.RpcError, what: str) -> ParamServerError:
    return _kind(e).error(f"{what}: {e.code().name}: {e.details()}")


def _is_local_target(target: str) -> bool:
    if target.startswith("unix:"):
        return True
    host = target.rsplit(":", 1)[0] if ":" in target else target
    return is_loopback_host(host)


@dataclass(slots=True)
class FetchStats:
    """Counters of one client, cheap to read at any time."""

    bytes_streamed: int = 0
    bytes_mapped: int = 0
    blobs_streamed: int = 0
    blobs_mapped: int = 0
    retries: int = 0
    digest_failures: int = 0
    blobs_from_disk: int = 0
    bytes_from_disk: int = 0
    busy_waits: int = 0
    """Calls the server refused as busy (at its stream limit) and retried."""


class ParamClient:
    """A client of one param-server.

    Args:
        target: a gRPC target such as "127.0.0.1:50051" or "unix:/path".
        timeout: deadline in seconds of each unary call.
        stream_timeout: deadline in seconds of each fetch or commit stream.
        retries: attempts after the first on UNAVAILABLE, with exponential
            backoff and jitter; fetches are retried, commits are not (a
            retried commit could be refused as stale after the first landed).
        backoff: first backoff delay in seconds; doubles each attempt.
        streams: parallel streams (each on its own connection) for fetches
            of several shards.
        same_host: map blob files directly when the server's store is on
            this machine's file system (verified once per blob, zero-copy).
        disk_cache: keep fetched blobs on local disk (see DiskBlobCache) and
            use them before asking the server, so a restarted node warms
            from disk.
        credentials: a bearer token, and TLS settings (server CA, client
            certificate for mutual TLS). A token is never sent in plaintext
            to another host.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.1,
        streams: int = 4,
        same_host: bool = True,
        disk_cache: DiskBlobCache | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        if retries < 0 or timeout <= 0 or stream_timeout <= 0:
            raise ValueError("retries must be >= 0 and timeouts > 0")
        self.target = target
        self.timeout, self.stream_timeout = timeout, stream_timeout
        self.retries, self.backoff, self.streams = retries, backoff, streams
        self.stats = FetchStats()
        self._stats_lock = threading.Lock()
        creds = credentials or Credentials()
        if creds.token and not creds.tls and not _is_local_target(target):
            raise InvalidInputError(
                f"refusing to send a token in plaintext to {target}; connect with "
                "TLS (grpcs://host:port, --ca-cert) or to a loopback address"
            )
        self.credentials = creds
        self._md: tuple[tuple[str, str], ...] | None = (
            ((AUTH_HEADER, f"Bearer {creds.token}"),) if creds.token else None
        )
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Notice a dead server or connection during long streams.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        channel_creds = (
            grpc.ssl_channel_credentials(
                root_certificates=creds.ca,
                private_key=creds.key,
                certificate_chain=creds.cert,
            )
            if creds.tls
            else None
        )

        def channel(i: int) -> grpc.Channel:
            opts = [
                *options,
                ("grpc.channel_id", i),
                ("grpc.use_local_subchannel_pool", 1),
            ]
            if channel_creds is None:
                return grpc.insecure_channel(target, options=opts)
            return grpc.secure_channel(target, channel_creds, options=opts)

        # Separate connections so parallel streams are not one TCP flow.
        self._channels = [channel(i) for i in range(streams)]
        self._stubs = [
            pb_grpc.ParamServerStub(c)  # type: ignore[no-untyped-call]
            for c in self._channels
        ]
        # Fetches and commits move raw bytes: responses are parsed by hand and
        # data chunks framed by hand (see param_server.core.framing).
        self._fetch_calls = [
            c.unary_stream(
                f"/{SERVICE_NAME}/FetchShards",
                request_serializer=pb.FetchShardsRequest.SerializeToString,
                response_deserializer=None,
            )
            for c in self._channels
        ]
        self._commit_call = self._channels[0].stream_unary(
            f"/{SERVICE_NAME}/Commit",
            request_serializer=None,
            response_deserializer=pb.CommitResponse.FromString,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=streams, thread_name_prefix="param-fetch"
        )
        self._hashers = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="param-hash")
            for _ in range(streams)
        ]
        self._same_host = same_host
        self._disk = disk_cache
        self._blob_root: Path | None = None
        self._local_checked = False
        self._mapper = VerifiedMapper()
        self._lock = threading.Lock()

    @classmethod
    def from_url(
        cls, url: str, credentials: Credentials | None = None, **kwargs: Any
    ) -> ParamClient:
        """A client from "grpc://host:port", "grpcs://host:port" (TLS),
        "host:port" or "unix:/path"."""
        if url.startswith("unix:"):
            return cls(url, credentials=credentials, **kwargs)
        parsed = urlparse(url if "://" in url else f"grpc://{url}")
        if parsed.scheme not in ("grpc", "grpcs") or not parsed.hostname:
            raise InvalidInputError(
                f"cannot use server URL {url!r}: expected grpc://host:port, "
                "grpcs://host:port (TLS), host:port or unix:/path"
            )
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not port:
            raise InvalidInputError(f"server URL {url!r} has no valid port")
        if parsed.scheme == "grpcs":
            c = credentials or Credentials()
            if not c.tls:
                credentials = Credentials(token=c.token, tls=True)
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        return cls(f"{host}:{port}", credentials=credentials, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for h in self._hashers:
            h.shutdown(wait=False, cancel_futures=True)
        for c in self._channels:
            c.close()

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- calls with retries -------------------------------------------------------

    def _retry(self, what: str, call: Callable[[], T], *, only_busy: bool = False) -> T:
        """Calls `call`, retrying busy refusals and (unless `only_busy`)
        UNAVAILABLE up to `retries` times."""
        busy = Backoff(self.backoff, 2.0, jitter=True)
        unavailable = Backoff(self.backoff, 5.0, jitter=True)
        attempt = 0
        busy_until = time.monotonic() + BUSY_PATIENCE
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if _is_busy(e) and time.monotonic() < busy_until:
                    # Refused before any work: wait for a slot however long
                    # the fleet takes, within BUSY_PATIENCE.
                    with self._stats_lock:
                        self.stats.busy_waits += 1
                    busy.sleep()
                    continue
                if only_busy or not _kind(e).retryable or attempt == self.retries:
                    raise _error(e, what) from e
                attempt += 1
                with self._stats_lock:
                    self.stats.retries += 1
                logger.warning(
                    "%s: %s, retry %d/%d in %.2fs",
                    what,
                    e.code().name,
                    attempt,
                    self.retries,
                    unavailable.peek(),
                )
                unavailable.sleep()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Blocks until the server answers, or raises UnavailableError."""
        try:
            grpc.channel_ready_future(self._channels[0]).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                f"param-server at {self.target} did not answer within {timeout:.0f}s; "
                "is it running (param-server serve) and is the address right?"
            ) from None

    # --- reading ---------------------------------------------------------------

    def list_models(self) -> list[str]:
        r = self._retry(
            "list models",
            lambda: self._stubs[0].ListModels(
                pb.ListModelsRequest(), timeout=self.timeout, metadata=self._md
            ),
        )
        return list(r.models)

    def get_manifest(self, model: str, version: int | None = None) -> Manifest:
        """The manifest of `version` (HEAD when None)."""
        what = f"manifest of {model}@{version or 'HEAD'}"
        r: pb.Manifest = self._retry(
            what,
            lambda: self._stubs[0].GetManifest(
                pb.GetManifestRequest(model=model, version=version or 0),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return self._all_pages(r)

    def _all_pages(self, first: pb.Manifest) -> Manifest:
        """The whole manifest from its first page: a manifest too large for
        one message under gRPC's default limit comes in pages."""
        token = first.next_page_token
        while token:
            req = pb.GetManifestRequest(
                model=first.model, version=first.version, page_token=token
            )
            more: pb.Manifest = self._retry(
                f"manifest of {first.model}@{first.version}",
                lambda req=req: self._stubs[0].GetManifest(  # type: ignore[misc]
                    req, timeout=self.timeout, metadata=self._md
                ),
            )
            first.shards.extend(more.shards)
            first.changed.extend(more.changed)
            token = more.next_page_token
        return manifest_from_proto(first)

    def announce_url(self) -> str | None:
        """The Redis URL the server announces versions on (None when it does not).

        The password, if any, is not included: give your own URL then.
        """
        info: pb.StoreInfo = self._retry(
            "get store info",
            lambda: self._stubs[0].GetStoreInfo(
                pb.GetStoreInfoRequest(), timeout=self.timeout, metadata=self._md
            ),
        )
        return info.announce_url or None

    def list_versions(self, model: str) -> list[VersionInfo]:
        r = self._retry(
            f"versions of {model}",
            lambda: self._stubs[0].ListVersions(
                pb.ListVersionsRequest(model=model),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return [version_from_proto(v) for v in r.versions]

    def head(self, model: str) -> int:
        """The model's HEAD version."""
        r = self._retry(
            f"head of {model}",
            lambda: self._stubs[0].ListVersions(
                pb.ListVersionsRequest(model=model),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return int(r.head)

    def fetch_blobs(
        self,
        manifest: Manifest,
        keys: Iterable[str],
        *,
        files: Iterable[str] = (),
        progress: bool = False,
    ) -> dict[str, Buffer]:
        """Verified bytes of shards (and files) of one version.

        Returns a buffer per key (file names for files); each was checked
        against the digest in `manifest` before it is returned. With
        `progress`, a progress bar on stderr counts the bytes.

        Raises:
            NotFoundError: a key or file that `manifest` does not have.
            IntegrityError: bytes failed their digest twice.
            UnavailableError: the server stayed unreachable.
        """
        wanted: dict[str, tuple[str, int, bool]] = {}
        for k in keys:
            e = manifest.shards.get(k)
            if e is None:
                raise NotFoundError(
                    f"{manifest.model}@{manifest.version} has no shard {k!r}"
                )
            wanted[k] = (e.digest, e.size, False)
        for f in files:
            fe = manifest.files.get(f)
            if fe is None:
                raise NotFoundError(
                    f"{manifest.model}@{manifest.version} has no file {f!r}"
                )
            wanted[f] = (fe.digest, fe.size, True)
        bar = tqdm(
            total=sum(size for _, size, _ in wanted.values()),
            unit="B",
            unit_scale=True,
            desc=f"fetch {manifest.model}@{manifest.version}",
            disable=not progress,
        )
        with bar:
            return self._fetch_wanted(manifest, wanted, bar.update)

    def _fetch_wanted(
        self,
        manifest: Manifest,
        wanted: dict[str, tuple[str, int, bool]],
        tick: Callable[[int], object],
    ) -> dict[str, Buffer]:
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
                    with self._stats_lock:
                        self.stats.blobs_from_disk += 1
                        self.stats.bytes_from_disk += size
            if local is not None:
                out[k] = local
                tick(size)
            else:
                remote[k] = (digest, size, is_file)
        if remote:
            fetched = self._fetch_remote(manifest, remote, tick)
            if self._disk is not None:
                for k, buf in fetched.items():
                    self._disk.put(remote[k][0], buf)  # verified on receipt
            out.update(fetched)
        return out

    def fetch_shards(
        self,
        model: str,
        keys: Iterable[str],
        version: int | None = None,
        manifest: Manifest | None = None,
        *,
        progress: bool = False,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors of shards, by shard key, all from one version.

        The tensors view the received (or mapped) bytes without copies.
        """
        if manifest is not None and (manifest.model, version) not in (
            (model, None),
            (model, manifest.version),
        ):
            raise InvalidInputError(
                f"asked for {model}@{version or 'HEAD'} but passed the manifest of "
                f"{manifest.model}@{manifest.version}"
            )
        m = manifest if manifest is not None else self.get_manifest(model, version)
        return {
            k: tensor_codec.decode(buf, f"{m.model}@{m.version}:{k}")
            for k, buf in self.fetch_blobs(m, keys, progress=progress).items()
        }

    # --- remote fetch ----------------------------------------------------------

    def _fetch_remote(
        self,
        m: Manifest,
        wanted: dict[str, tuple[str, int, bool]],
        tick: Callable[[int], object],
    ) -> dict[str, Buffer]:
        # Balance streams by bytes: largest first onto the lightest stream.
        n = min(self.streams, len(wanted))
        groups: list[list[str]] = [[] for _ in range(n)]
        loads = [0] * n
        for k in sorted(wanted, key=lambda k: -wanted[k][1]):
            i = loads.index(min(loads))
            groups[i].append(k)
            loads[i] += wanted[k][1]
        if n == 1:
            return self._fetch_group(0, m, groups[0], wanted, tick)
        results = list(
            self._pool.map(
                lambda ig: self._fetch_group(ig[0], m, ig[1], wanted, tick),
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
    ) -> dict[str, Buffer]:
        out: dict[str, Buffer] = {}
        refetched: set[str] = set()
        while True:
            if all(k in out for k in keys):
                return out
            # Each attempt asks only for what earlier attempts did not deliver.
            bad = self._retry(
                f"fetch blobs of {m.model}@{m.version}",
                lambda: self._stream_into(
                    stream, m, [k for k in keys if k not in out], wanted, out, tick
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
    ) -> list[str]:
        """One FetchShards stream; fills `out`, returns keys that failed digests.

        Chunks are copied once, from the received message into the blob's
        buffer; hashing runs on this stream's hashing thread, overlapping the
        receipt of the next chunk.
        """
        call = self._fetch_calls[stream](
            pb.FetchShardsRequest(
                model=m.model,
                version=m.version,
                shard_keys=[k for k in keys if not wanted[k][2]],
                file_names=[k for k in keys if wanted[k][2]],
            ),
            timeout=self.stream_timeout,
            metadata=self._md,
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
                with self._stats_lock:
                    self.stats.bytes_streamed += size
                    self.stats.blobs_streamed += 1
            else:
                logger.warning(
                    "%s@%d %r failed its digest; will refetch",
                    m.model,
                    m.version,
                    hdr.key,
                )
                with self._stats_lock:
                    self.stats.digest_failures += 1
                bad.append(hdr.key)
        return bad

    # --- same-host fast path ---------------------------------------------------

    def _local_root(self) -> Path | None:
        if not self._same_host:
            return None
        with self._lock:
            if not self._local_checked:
                try:
                    info = self._stubs[0].GetStoreInfo(
                        pb.GetStoreInfoRequest(),
                        timeout=self.timeout,
                        metadata=self._md,
                    )
                    self._local_checked = True
                    root = Path(info.blob_root)
                    if (root.parent / "STORE_ID").read_text().strip() == info.store_id:
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
            mm = self._mapper.map(root / digest[:2] / digest, digest, size)
        except IntegrityError as e:
            logger.warning("local blob failed its digest (%s); streaming instead", e)
            return None
        if mm is not None:
            with self._stats_lock:
                self.stats.bytes_mapped += size
                self.stats.blobs_mapped += 1
        return mm

    # --- writing ---------------------------------------------------------------

    def commit(
        self,
        model: str,
        parent: int,
        shards: Mapping[str, Mapping[str, torch.Tensor] | bytes],
        *,
        files: Mapping[str, bytes] | None = None,
        remove: Iterable[str] = (),
        author: str = "",
        message: str = "",
        metadata: Mapping[str, Any] | None = None,
        allow_schema_change: bool = False,
    ) -> CommitResult:
        """Commits changed shards as a new version based on `parent`.

        Args:
            shards: shard key -> tensors (or ready safetensors bytes).
            parent: compare-and-set: the version this change was made
                against; 0 creates the model.

        Raises:
            StaleParentError: someone else committed first; refetch and retry.
            InvalidInputError: bad names, shapes, dtypes or safetensors.
        """
        blobs = [
            (k, v if isinstance(v, bytes) else tensor_codec.encode(v), False)
            for k, v in shards.items()
        ]
        blobs += [(k, v, True) for k, v in (files or {}).items()]

        def requests() -> Iterator[bytes]:
            yield pb.CommitRequest(
                header=pb.CommitHeader(
                    model=model,
                    parent_version=parent,
                    author=author,
                    message=message,
                    metadata_json=json.dumps(dict(metadata or {})),
                    allow_schema_change=allow_schema_change,
                    remove_shards=list(remove),
                )
            ).SerializeToString()
            for key, data, is_file in blobs:
                yield pb.CommitRequest(
                    begin=pb.UploadBegin(
                        key=key,
                        size=len(data),
                        digest=hashlib.sha256(data).hexdigest(),
                        is_file=is_file,
                    )
                ).SerializeToString()
                view = memoryview(data)
                for i in range(0, len(data), CHUNK_BYTES):
                    yield frame_bytes_field(
                        COMMIT_DATA_FIELD, view[i : i + CHUNK_BYTES]
                    )

        # Not retried on UNAVAILABLE (the first attempt may have landed), only
        # when refused as busy, which happens before anything is read.
        r = self._retry(
            f"commit to {model} on version {parent}",
            lambda: self._commit_call(
                requests(), timeout=self.stream_timeout, metadata=self._md
            ),
            only_busy=True,
        )
        return CommitResult(
            self._all_pages(r.manifest), r.blobs_written, r.bytes_written
        )

    def rollback(
        self, model: str, version: int, *, author: str = "", message: str = ""
    ) -> tuple[int, int]:
        """Moves HEAD to `version`; returns (previous, new) HEAD."""
        r = self._retry(
            f"rollback {model} to {version}",
            lambda: self._stubs[0].Rollback(
                pb.RollbackRequest(
                    model=model, version=version, author=author, message=message
                ),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return r.previous_head, r.head

    def set_pin(self, model: str, version: int, pinned: bool = True) -> list[int]:
        r = self._retry(
            f"pin {model}@{version}",
            lambda: self._stubs[0].SetPin(
                pb.SetPinRequest(model=model, version=version, pinned=pinned),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return list(r.pinned)

    def collect_garbage(self, keep_last: int = 10, dry_run: bool = False) -> GcResult:
        """Drops old versions server-side (see Store.gc); returns what went."""
        r: pb.CollectGarbageResponse = self._retry(
            "collect garbage",
            lambda: self._stubs[0].CollectGarbage(
                pb.CollectGarbageRequest(keep_last=keep_last, dry_run=dry_run),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        dropped = [
            (m, int(v)) for m, _, v in (d.rpartition("@") for d in r.dropped_versions)
        ]
        return GcResult(dropped, r.blobs_deleted, r.bytes_freed)

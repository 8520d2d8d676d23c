"""The gRPC service: thin servicers over the store, errors mapped in one table."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from param_server.api.convert import (
    FETCH_DATA_FIELD,
    SERVICE_NAME,
    manifest_to_proto,
    shard_to_proto,
    version_to_proto,
)
from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from param_server.core import widths
from param_server.core.announcements import redact
from param_server.core.auth import Role, read_pem
from param_server.core.errors import (
    ERROR_KIND_KEY,
    BusyError,
    InvalidInputError,
    ListenError,
    NotFoundError,
    ParamServerError,
    ReadOnlyStoreError,
    RedisStartError,
    StoreInUseError,
    StoreIOError,
    kind_of,
    status_name,
)
from param_server.core.framing import (
    BUSY,
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    frame_bytes_field,
)
from param_server.core.manifest import Manifest
from param_server.core.names import check_model_name, check_shard_key
from param_server.core.shards import is_expert_key
from param_server.server.announce import Announcer
from param_server.server.config import ServerConfig
from param_server.server.redis_server import EmbeddedRedis
from param_server.server.security import ANY_MODEL, Authorizer, Principal
from param_server.store import Store

logger = logging.getLogger(__name__)


def status_for(e: ParamServerError) -> grpc.StatusCode:
    """The gRPC status code for one of our errors (see core.errors.ERRORS)."""
    return grpc.StatusCode[status_name(e)]


T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def manifest_page(
    manifest: Manifest,
    *,
    page_size: int = 0,
    after: str = "",
    max_bytes: int = CHUNK_BYTES,
) -> pb.Manifest:
    """One reply of GetManifest: the whole manifest when it fits (and no
    smaller page was asked for), else the shards after `after` (by key) that
    fit in `max_bytes` and `page_size`, with a token for the rest."""
    if page_size == 0 and not after:
        whole = manifest_to_proto(manifest)
        if whole.ByteSize() <= max_bytes:
            return whole
    page = manifest_to_proto(manifest, shards=False)
    budget = max_bytes - page.ByteSize() - 64  # 64: the token
    changed = set(manifest.changed)
    keys = sorted(k for k in manifest.shards if k > after)
    for taken, key in enumerate(keys):
        entry = shard_to_proto(manifest.shards[key])
        cost = entry.ByteSize() + 6 + (len(key) + 3 if key in changed else 0)
        if taken and (cost > budget or taken == page_size):
            page.next_page_token = f"{manifest.version}:{keys[taken - 1]}"
            break
        page.shards.append(entry)
        if key in changed:
            page.changed.append(key)
        budget -= cost
    return page


def _parse_page_token(token: str, version: int) -> tuple[int, str]:
    """(version, last key) from a next_page_token."""
    v, sep, after = token.partition(":")
    if not sep or not v.isdigit() or not after:
        raise InvalidInputError(
            f"page_token {token[:80]!r} is not one this server gave; start again "
            "without a page_token"
        )
    if version and version != int(v):
        raise InvalidInputError(
            f"page_token is for version {v}, but version {version} was asked for"
        )
    return int(v), check_shard_key(after)


def _abort(context: grpc.ServicerContext, e: ParamServerError) -> None:
    code = status_for(e)
    logger.log(
        logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO,
        "%s: %s",
        code.name,
        e,
    )
    context.set_trailing_metadata(((ERROR_KIND_KEY, kind_of(e).error.__name__),))
    context.abort(code, str(e))


Scope = str  # "model": request.model; "any": no model in particular; "store"


def _rpc(role: Role | None, scope: Scope = "model") -> Callable[[F], F]:
    """Maps our errors to status codes and, with auth on, checks the caller
    may act as `role` (on request.model, or store-wide) before the body runs."""

    def deco(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(self: Any, request: Any, context: Any) -> Iterator[Any]:
                try:
                    self._authorize(context, role, request, scope)
                    yield from fn(self, request, context)
                except ParamServerError as e:
                    _abort(context, e)

            return stream  # type: ignore[return-value]

        @functools.wraps(fn)
        def unary(self: Any, request: Any, context: Any) -> Any:
            try:
                self._authorize(context, role, request, scope)
                return fn(self, request, context)
            except ParamServerError as e:
                _abort(context, e)
                raise AssertionError("unreachable") from None

        return unary  # type: ignore[return-value]

    return deco


class _StreamGuard:
    """Bounds the streams served at once and cancels those that stall.

    A stream takes a slot (or is refused as busy: clients retry with backoff)
    and calls `touch()` on every message; a watcher thread cancels streams
    idle for longer than `idle_timeout`, which frees the thread blocked on a
    client that stopped reading or sending.
    """

    def __init__(self, max_streams: int, idle_timeout: float) -> None:
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._active: dict[int, tuple[list[float], Any, str]] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def stream(self, context: Any, what: str) -> Iterator[Callable[..., None]]:
        last = [time.monotonic()]
        with self._lock:
            if len(self._active) >= self.max_streams:
                raise BusyError(
                    f"{BUSY}: {len(self._active)} streams running (limit "
                    f"{self.max_streams}); retry with backoff"
                )
            sid = self._next_id
            self._next_id += 1
            self._active[sid] = (last, context, what)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="param-server-idle", daemon=True
                )
                self._thread.start()

        def touch(*, done: bool = False) -> None:
            # done: the client has said all it will; what is left is ours
            # (e.g. making a commit durable) and must not count as idle.
            last[0] = float("inf") if done else time.monotonic()

        try:
            yield touch
        finally:
            with self._lock:
                del self._active[sid]

    def _watch(self) -> None:
        period = min(1.0, self.idle_timeout / 4)
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self._lock:
                if not self._active:  # started again by the next stream
                    self._thread = None
                    return
                stalled = [
                    (ctx, what)
                    for last, ctx, what in self._active.values()
                    if now - last[0] > self.idle_timeout
                ]
            for ctx, what in stalled:
                logger.warning(
                    "%s from %s moved nothing for %gs; cancelling it",
                    what,
                    ctx.peer(),
                    self.idle_timeout,
                )
                ctx.cancel()


class ParamServerServicer(pb_grpc.ParamServerServicer):
    """Validates each request, calls the store, returns its answer."""

    def __init__(
        self, store: Store, config: ServerConfig, announcer: Announcer | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.read_only = config.read_only or not store.writable()
        self.announcer = announcer
        # Variants of a commit's new experts, made ahead of the nodes' asking
        # for the widths they use (see `_make_ahead`), by at most two daemon
        # threads: a stopping daemon never waits for them (a variant cut
        # mid-write is a staging leftover, cleaned at the next start).
        self._ahead: queue.SimpleQueue[tuple[Manifest, str, str]] = queue.SimpleQueue()
        self._ahead_lock = threading.Lock()
        self._ahead_workers = 0
        self.guard = _StreamGuard(config.max_streams, config.idle_timeout)
        self.auth = (
            Authorizer(config.tokens, plaintext=config.tls_cert is None)
            if config.tokens is not None
            else None
        )

    def _announce(self) -> None:
        if self.announcer is not None:
            self.announcer.poke()

    def _make_ahead(self, manifest: Manifest) -> None:
        """Starts making the 8-bit variants nodes will ask for once they
        hear of `manifest`: of each expert it changed, in each width the
        expert's previous bytes were asked for. A node's request for one
        still being made waits for it (one maker per variant), so a swap on
        8-bit experts no longer starts its quantization when the first
        node asks."""
        parent = manifest.parent
        if not parent:
            return
        try:
            wanted = self.store.variants_to_make(
                self.store.get_manifest(manifest.model, parent), manifest
            )
        except (ParamServerError, OSError) as e:  # the commit stands
            logger.warning("variants of %s@%d: %s", manifest.model, manifest.version, e)
            return
        for digest, kind in wanted:
            self._ahead.put((manifest, digest, kind))
            with self._ahead_lock:
                if self._ahead_workers >= 2:
                    continue
                self._ahead_workers += 1
            threading.Thread(
                target=self._make_queued, name="variants-ahead", daemon=True
            ).start()

    def _make_queued(self) -> None:
        while True:
            with self._ahead_lock:  # an empty queue ends the worker
                try:
                    manifest, digest, kind = self._ahead.get_nowait()
                except queue.Empty:
                    self._ahead_workers -= 1
                    return
            try:
                self.store.variant(digest, kind)
            except ParamServerError as e:  # a node asking gets the same error
                logger.warning(
                    "%s variant of %s in %s@%d: %s",
                    kind,
                    digest,
                    manifest.model,
                    manifest.version,
                    e,
                )

    def _authorize(
        self, context: Any, role: Role | None, request: Any, scope: Scope
    ) -> Principal | None:
        principal = None
        if self.auth is not None and role is not None:
            model = {"model": getattr(request, "model", None), "any": ANY_MODEL}
            principal = self.auth.check(
                context.invocation_metadata(), context.peer(), role, model.get(scope)
            )
        if self.read_only and role is not None and role >= Role.WRITER:
            raise ReadOnlyStoreError(
                f"the store at {self.store.root} is served read-only (a read-only "
                "file system or --read-only); commit, roll back, pin and collect "
                "garbage through a daemon serving a writable copy of it",
                errno.EROFS,
            )
        return principal

    @_rpc(Role.READER, "any")
    def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        models = self.store.list_models()
        if self.auth is not None:
            p = self.auth.principal(context.invocation_metadata(), context.peer())
            models = [m for m in models if p.visible(m)]
        return pb.ListModelsResponse(models=models)

    @_rpc(Role.READER)
    def GetManifest(self, request: pb.GetManifestRequest, context: Any) -> pb.Manifest:
        if request.page_size < 0:
            raise InvalidInputError(f"page_size must be >= 0, got {request.page_size}")
        version, after = request.version or None, ""
        if request.page_token:
            version, after = _parse_page_token(request.page_token, request.version)
        manifest = self.store.get_manifest(request.model, version)
        return manifest_page(manifest, page_size=request.page_size, after=after)

    @_rpc(Role.READER)
    def ListVersions(
        self, request: pb.ListVersionsRequest, context: Any
    ) -> pb.ListVersionsResponse:
        st = self.store.state(request.model)
        return pb.ListVersionsResponse(
            model=request.model,
            head=st.head,
            versions=[
                version_to_proto(v) for v in self.store.list_versions(request.model)
            ],
        )

    @_rpc(Role.READER)
    def FetchShards(
        self, request: pb.FetchShardsRequest, context: Any
    ) -> Iterator[bytes]:
        """Yields serialised FetchChunk messages (see create_server for why)."""
        m = self.store.get_manifest(request.model, request.version or None)
        width = widths.check_width(request.width or "full")
        wanted: list[tuple[str, str, int, bool]] = []
        for key in request.shard_keys:
            entry = m.shards.get(check_shard_key(key))
            if entry is None:
                raise NotFoundError(
                    f"model {m.model!r} version {m.version} has no shard {key!r}"
                )
            if width == "full":
                wanted.append((key, entry.digest, entry.size, False))
            else:
                digest, size = self._variant(m, key, entry.digest, width)
                wanted.append((key, digest, size, False))
        for name in request.file_names:
            f = m.files.get(name)
            if f is None:
                raise NotFoundError(
                    f"model {m.model!r} version {m.version} has no file {name!r}; "
                    f"it has {sorted(m.files)}"
                )
            wanted.append((name, f.digest, f.size, True))
        with self.guard.stream(context, f"fetch of {m.model}@{m.version}") as touch:
            for key, digest, size, is_file in wanted:
                path = self.store.verify_blob(digest)  # never serve corrupt bytes
                touch()
                yield pb.FetchChunk(
                    header=pb.BlobHeader(
                        key=key,
                        digest=digest,
                        size=size,
                        is_file=is_file,
                        version=m.version,
                    )
                ).SerializeToString()
                with open(path, "rb") as blob:
                    while chunk := blob.read(CHUNK_BYTES):
                        touch()
                        yield frame_bytes_field(FETCH_DATA_FIELD, chunk)

    def _variant(
        self, m: Manifest, key: str, digest: str, width: str
    ) -> tuple[str, int]:
        if not is_expert_key(key):
            raise InvalidInputError(
                f"{m.model}@{m.version} {key!r} is not an expert shard: dense "
                "shards are served at their stored width only"
            )
        return self.store.variant(digest, width)

    @_rpc(Role.READER)
    def GetVariants(
        self, request: pb.GetVariantsRequest, context: Any
    ) -> pb.GetVariantsResponse:
        m = self.store.get_manifest(request.model, request.version or None)
        width = widths.check_width(request.width)
        if width == "full":
            raise InvalidInputError(
                "width 'full' has no variants: fetch the shards themselves"
            )
        out = pb.GetVariantsResponse(version=m.version)
        for key in request.shard_keys:
            entry = m.shards.get(check_shard_key(key))
            if entry is None:
                raise NotFoundError(
                    f"model {m.model!r} version {m.version} has no shard {key!r}"
                )
            digest, size = self._variant(m, key, entry.digest, width)
            out.variants.append(
                pb.VariantEntry(
                    key=key, digest=digest, size=size, source_digest=entry.digest
                )
            )
        return out

    # The role is checked before a byte is read; the model limit once the
    # header names the model (in _commit).
    @_rpc(Role.WRITER, "any")
    def Commit(
        self, request_iterator: Iterator[pb.CommitRequest], context: Any
    ) -> pb.CommitResponse:
        with self.guard.stream(context, "commit") as touch:
            return self._commit(request_iterator, context, touch)

    def _commit(
        self,
        requests: Iterator[pb.CommitRequest],
        context: Any,
        touch: Callable[..., None],
    ) -> pb.CommitResponse:
        first = next(requests, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidInputError("a commit stream must start with a CommitHeader")
        h = first.header
        check_model_name(h.model)
        self._authorize(context, Role.WRITER, h, "model")
        try:
            metadata = json.loads(h.metadata_json) if h.metadata_json else {}
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"metadata_json is not JSON: {e}") from e
        if not isinstance(metadata, dict):
            raise InvalidInputError("metadata_json must be a JSON object")
        # Stale parents fail before the client spends time uploading.
        self.store.check_parent(h.model, h.parent_version)
        total = blobs = 0
        with self.store.staging() as staging:
            writer = None
            for req in requests:
                touch()
                kind = req.WhichOneof("payload")
                if kind == "begin":
                    if writer is not None:
                        writer.finish()
                    b = req.begin
                    blobs += 1
                    if blobs > self.config.max_commit_blobs:
                        raise InvalidInputError(
                            f"commit uploads more than the server's limit of "
                            f"{self.config.max_commit_blobs} blobs"
                        )
                    total += b.size
                    if total > self.config.max_commit_bytes:
                        raise InvalidInputError(
                            f"commit exceeds the server's limit of "
                            f"{self.config.max_commit_bytes} bytes"
                        )
                    writer = staging.writer(
                        b.key,
                        b.size,
                        is_file=b.is_file,
                        expected_digest=b.digest or None,
                    )
                elif kind == "data":
                    if writer is None:
                        raise InvalidInputError("data chunk before any UploadBegin")
                    writer.write(req.data)
                else:
                    raise InvalidInputError(
                        f"unexpected {kind or 'empty'} message in a commit"
                    )
            touch(done=True)
            if writer is not None:
                writer.finish()
            result = self.store.commit(
                h.model,
                h.parent_version,
                staging,
                remove=list(h.remove_shards),
                author=h.author,
                message=h.message,
                metadata=metadata,
                allow_schema_change=h.allow_schema_change,
            )
        self._make_ahead(result.manifest)
        self._announce()
        return pb.CommitResponse(
            manifest=manifest_page(result.manifest),  # the rest by GetManifest
            blobs_written=result.blobs_written,
            bytes_written=result.bytes_written,
        )

    @_rpc(Role.ADMIN)
    def Rollback(
        self, request: pb.RollbackRequest, context: Any
    ) -> pb.RollbackResponse:
        prev, head = self.store.rollback(
            request.model,
            request.version,
            author=request.author,
            message=request.message,
        )
        self._announce()
        return pb.RollbackResponse(previous_head=prev, head=head)

    @_rpc(Role.ADMIN)
    def SetPin(self, request: pb.SetPinRequest, context: Any) -> pb.SetPinResponse:
        return pb.SetPinResponse(
            pinned=self.store.set_pin(request.model, request.version, request.pinned)
        )

    @_rpc(Role.ADMIN, "store")
    def CollectGarbage(
        self, request: pb.CollectGarbageRequest, context: Any
    ) -> pb.CollectGarbageResponse:
        keep_last = request.keep_last if request.HasField("keep_last") else 10
        r = self.store.gc(keep_last, dry_run=request.dry_run)
        return pb.CollectGarbageResponse(
            dropped_versions=[f"{m}@{v}" for m, v in r.dropped_versions],
            blobs_deleted=r.blobs_deleted,
            bytes_freed=r.bytes_freed,
        )

    @_rpc(Role.READER, "any")
    def GetStoreInfo(
        self, request: pb.GetStoreInfoRequest, context: Any
    ) -> pb.StoreInfo:
        return pb.StoreInfo(
            store_id=self.store.store_id,
            blob_root=str(self.store.blob_root),
            hostname=socket.gethostname(),
            announce_url=(
                redact(self.announcer.redis_url) if self.announcer is not None else ""
            ),
        )


def create_server(
    config: ServerConfig, *, announcer: Announcer | None = None
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Builds the server (not started) and binds it; returns (server, port, health).

    `announcer` (started and stopped by the caller) is told about every
    commit and rollback; `serve` makes one from the config.

    Raises:
        ListenError: the address cannot be bound.
    """
    store = Store(config.store)
    if store.writable():
        store.clean_staging()  # leftovers of commits cut by a crash
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.max_workers, thread_name_prefix="param-server"
        ),
        options=[
            # grpcio sets SO_REUSEPORT by default, which lets a second daemon
            # bind the same port and silently take half the traffic.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Find dead peers (a vanished node, a cut cable) within a minute
            # or so, and let clients keep idle connections alive by pinging.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        # Beyond this, calls are refused (RESOURCE_EXHAUSTED) instead of
        # queueing without bound; streams have their own, lower limit.
        maximum_concurrent_rpcs=config.max_workers * 4,
    )
    servicer = ParamServerServicer(store, config, announcer)
    pb_grpc.add_ParamServerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    # FetchShards yields pre-serialised messages: replace the generated handler
    # (registered handlers are a dict, so this one wins) with one whose
    # serializer passes the bytes through.
    server.add_registered_method_handlers(
        SERVICE_NAME,
        {
            "FetchShards": grpc.unary_stream_rpc_method_handler(
                servicer.FetchShards,
                request_deserializer=pb.FetchShardsRequest.FromString,
                response_serializer=None,
            ),
        },
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _add_reflection(server)
    try:
        credentials = server_credentials(config)
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError as e:
        raise ListenError(
            errno.EADDRINUSE,
            f"cannot listen on {config.listen} ({e}); pick another --listen "
            "address or stop the process using it",
        ) from e
    if port == 0:
        raise ListenError(
            errno.EADDRINUSE,
            f"cannot listen on {config.listen}; pick another --listen address "
            "or stop the process using it",
        )
    return server, port, health_servicer


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.Server) -> None:
    """Server reflection under both names tools ask for.

    grpcio-reflection implements only `grpc.reflection.v1alpha`, while newer
    tools (grpcurl, Postman, grpc-js tooling) try `grpc.reflection.v1` first.
    The v1 protocol is the v1alpha one with its package renamed (the same
    messages, fields and numbers), so one servicer answers both.
    """
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        REFLECTION_V1,
        reflection.SERVICE_NAME,
    )
    servicer = reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_registered_method_handlers(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config's PEM files; None serves plaintext.

    Raises:
        InvalidInputError: a file is missing or not PEM.
    """
    if config.tls_cert is None:
        return None
    cert = read_pem(config.tls_cert, "TLS certificate")
    key = read_pem(config.tls_key, "TLS key")
    ca = read_pem(config.tls_client_ca, "client CA")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def serve(
    config: ServerConfig, *, on_ready: Callable[[int], None] | None = None
) -> None:
    """Runs the daemon until SIGTERM or SIGINT, then drains for the grace period.

    Raises:
        StoreInUseError: another daemon is serving the store.
        RedisMissingError: announcing with a private Redis, but redis-server
            is not installed.
        RedisStartError: the private redis-server did not come up.
        ListenError: the address cannot be bound.
    """
    # Past a file-size limit (ulimit -f) a write must fail with EFBIG, which
    # the store reports as a clear error, instead of killing the daemon.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with _serving_lock(Path(config.store)):
        _serve_locked(config, on_ready)


@contextlib.contextmanager
def _serving_lock(store: Path) -> Iterator[None]:
    """Held while a daemon serves `store`: a second daemon would start a
    second private Redis fighting for the first one's port and announce
    every commit twice, so it is refused instead.

    The lock is a flock on the store directory itself, so it needs no write
    access (a read-only store is locked the same way) and dies with the
    process, however that ends.
    """
    try:
        store.mkdir(parents=True, exist_ok=True)
        fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise StoreIOError(
            f"cannot open the store at {store.absolute()}: {e.strerror or e}", e.errno
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreInUseError(
                f"another param-server daemon is already serving the store at "
                f"{store.absolute()}; stop it first, or give this one another "
                "--store (clients of the running one need nothing else)"
            ) from None
        yield
    finally:
        os.close(fd)


def _serve_locked(config: ServerConfig, on_ready: Callable[[int], None] | None) -> None:
    embedded: EmbeddedRedis | None = None
    announcer: Announcer | None = None
    url = config.redis_url
    if config.announce and url is None:
        embedded = _start_embedded_redis(config.store)
        url = embedded.url
    try:
        if config.announce and url is not None:
            announcer = Announcer(Store(config.store), url)
        server, port, health_servicer = create_server(config, announcer=announcer)
        if announcer is not None:
            announcer.start()
            logger.info("announcing versions on %s", redact(announcer.redis_url))
        _serve(config, server, port, health_servicer, on_ready)
    finally:
        if announcer is not None:
            announcer.stop()
        if embedded is not None:
            embedded.stop()


def _start_embedded_redis(store: Path) -> EmbeddedRedis:
    """A private Redis, on the port it had last time when that is free, so
    nodes subscribed before a daemon restart find it again.

    It keeps nothing durable, so its working directory and log are a private
    temporary directory (removed when it stops), never the store: a store may
    be read-only. The port it took is remembered in `<store>/redis/port`
    when the store is writable.
    """
    hint = Path(store).absolute() / "redis" / "port"
    try:
        port = int(hint.read_text())
    except (OSError, ValueError):
        port = 0
    try:
        embedded = EmbeddedRedis(port=port).start()
    except RedisStartError:
        if port == 0:
            raise
        logger.info("port %d of the last private Redis is taken; picking another", port)
        embedded = EmbeddedRedis().start()
    try:
        hint.parent.mkdir(exist_ok=True)
        tmp = hint.with_name("port.tmp")
        tmp.write_text(str(embedded.port))
        os.replace(tmp, hint)
    except OSError as e:
        logger.info("not remembering the private Redis's port (%s)", e.strerror or e)
    return embedded


def _serve(
    config: ServerConfig,
    server: grpc.Server,
    port: int,
    health_servicer: health.HealthServicer,
    on_ready: Callable[[int], None] | None,
) -> None:
    server.start()
    host = config.listen.rpartition(":")[0]
    logger.info(
        "param-server listening on %s:%d (%s, %s), store %s",
        host,
        port,
        "mutual TLS"
        if config.tls_client_ca
        else ("TLS" if config.tls_cert else "plaintext"),
        f"{len(config.tokens)} tokens" if config.tokens else "no auth",
        config.store,
    )
    if config.tokens is None and not config.local_only:
        logger.warning(
            "serving %s WITHOUT AUTHENTICATION: anyone who can reach it may "
            "commit, roll back and collect garbage",
            config.listen,
        )
    if on_ready is not None:
        on_ready(port)
    stopping = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        logger.info(
            "received %s, draining for up to %.0fs",
            signal.Signals(signum).name,
            config.grace_seconds,
        )
        stopping.set()

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    tokens = config.tokens
    if tokens is not None and tokens.path is not None:

        def _reload(signum: int, frame: object) -> None:
            try:
                tokens.reload()
                logger.info("reloaded %d tokens from %s", len(tokens), tokens.path)
            except InvalidInputError as e:
                logger.error("kept the tokens in use; the new file is bad: %s", e)

        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _reload)
    try:
        while not stopping.wait(0.5):
            pass
    finally:
        health_servicer.enter_graceful_shutdown()
        server.stop(config.grace_seconds).wait()
        for s, h in previous.items():
            signal.signal(s, h)
        logger.info("param-server stopped")

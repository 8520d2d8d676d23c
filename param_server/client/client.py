"""ParamClient: typed access to a param-server, with verification and retries."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import torch
from tqdm import tqdm

from param_server.api.convert import (
    COMMIT_DATA_FIELD,
    manifest_from_proto,
    version_from_proto,
)
from param_server.api.v1 import param_server_pb2 as pb
from param_server.client.channel import Connection, FetchStats
from param_server.client.disk_cache import DiskBlobCache
from param_server.client.transfer import BlobFetcher, Buffer
from param_server.core import quant, tensor_codec
from param_server.core.auth import Credentials
from param_server.core.errors import (
    InvalidInputError,
    NotFoundError,
)
from param_server.core.framing import (
    CHUNK_BYTES,
    frame_bytes_field,
)
from param_server.core.manifest import Manifest, VersionInfo
from param_server.core.results import CommitResult, GcResult

__all__ = ["FetchStats", "ParamClient"]

logger = logging.getLogger(__name__)


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
        self._conn = Connection(
            target,
            timeout=timeout,
            stream_timeout=stream_timeout,
            retries=retries,
            backoff=backoff,
            streams=streams,
            credentials=credentials,
        )
        self._fetcher = BlobFetcher(
            self._conn, same_host=same_host, disk_cache=disk_cache
        )
        self.target = target
        self.timeout, self.stream_timeout = timeout, stream_timeout
        self.retries, self.backoff, self.streams = retries, backoff, streams
        self.credentials = self._conn.credentials
        self.stats = self._conn.stats
        self._md = self._conn.metadata

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
        self._fetcher.close()
        self._conn.close()

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Blocks until the server answers, or raises UnavailableError."""
        self._conn.wait_ready(timeout)

    # --- reading ---------------------------------------------------------------

    def list_models(self) -> list[str]:
        r = self._conn.retry(
            "list models",
            lambda: self._conn.stubs[0].ListModels(
                pb.ListModelsRequest(),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return list(r.models)

    def get_manifest(self, model: str, version: int | None = None) -> Manifest:
        """The manifest of `version` (HEAD when None)."""
        what = f"manifest of {model}@{version or 'HEAD'}"
        r: pb.Manifest = self._conn.retry(
            what,
            lambda: self._conn.stubs[0].GetManifest(
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
            more: pb.Manifest = self._conn.retry(
                f"manifest of {first.model}@{first.version}",
                lambda req=req: self._conn.stubs[0].GetManifest(  # type: ignore[misc]
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
        info: pb.StoreInfo = self._conn.retry(
            "get store info",
            lambda: self._conn.stubs[0].GetStoreInfo(
                pb.GetStoreInfoRequest(),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return info.announce_url or None

    def list_versions(self, model: str) -> list[VersionInfo]:
        r = self._conn.retry(
            f"versions of {model}",
            lambda: self._conn.stubs[0].ListVersions(
                pb.ListVersionsRequest(model=model),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return [version_from_proto(v) for v in r.versions]

    def head(self, model: str) -> int:
        """The model's HEAD version."""
        r = self._conn.retry(
            f"head of {model}",
            lambda: self._conn.stubs[0].ListVersions(
                pb.ListVersionsRequest(model=model),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return int(r.head)

    def variants(
        self, manifest: Manifest, keys: Iterable[str], width: str
    ) -> dict[str, tuple[str, int]]:
        """Shard key -> (digest, size) of its `width` ("int8" or "fp8")
        variant; the daemon makes the ones it does not have yet.

        Raises:
            InvalidInputError: an unknown width, or a dense shard.
            NotFoundError: a key the version does not have.
        """
        keys = list(keys)
        if not keys:
            return {}
        r = self._conn.retry(
            f"variants of {manifest.model}@{manifest.version}",
            lambda: self._conn.stubs[0].GetVariants(
                pb.GetVariantsRequest(
                    model=manifest.model,
                    version=manifest.version,
                    shard_keys=keys,
                    width=width,
                ),
                timeout=self._conn.stream_timeout,
                metadata=self._conn.metadata,
            ),
        )
        return {v.key: (v.digest, v.size) for v in r.variants}

    def fetch_blobs(
        self,
        manifest: Manifest,
        keys: Iterable[str],
        *,
        files: Iterable[str] = (),
        progress: bool = False,
        width: str = "full",
    ) -> dict[str, Buffer]:
        """Verified bytes of shards (and files) of one version.

        Returns a buffer per key (file names for files); each was checked
        against the digest in `manifest` before it is returned. With
        `progress`, a progress bar on stderr counts the bytes. With `width`
        "int8" or "fp8", the shards' quantized variants instead (expert
        shards only), checked against the digests `variants` names.

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
        if quant.check_width(width) != "full":
            for k, (digest, size) in self.variants(manifest, wanted, width).items():
                wanted[k] = (digest, size, False)
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
            return self._fetcher.fetch(
                manifest, wanted, bar.update, "" if width == "full" else width
            )

    def fetch_shards(
        self,
        model: str,
        keys: Iterable[str],
        version: int | None = None,
        manifest: Manifest | None = None,
        *,
        progress: bool = False,
        width: str = "full",
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors of shards, by shard key, all from one version.

        The tensors view the received (or mapped) bytes without copies. With
        `width` "int8" or "fp8", the expert shards' quantized variants are
        fetched (about half the bytes of bf16) and dequantized here to their
        stored dtypes.
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
        decode = tensor_codec.decode if width == "full" else quant.decode_variant
        return {
            k: decode(buf, f"{m.model}@{m.version}:{k}")
            for k, buf in self.fetch_blobs(
                m, keys, progress=progress, width=width
            ).items()
        }

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
        r = self._conn.retry(
            f"commit to {model} on version {parent}",
            lambda: self._conn.commit_call(
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
        r = self._conn.retry(
            f"rollback {model} to {version}",
            lambda: self._conn.stubs[0].Rollback(
                pb.RollbackRequest(
                    model=model, version=version, author=author, message=message
                ),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return r.previous_head, r.head

    def set_pin(self, model: str, version: int, pinned: bool = True) -> list[int]:
        r = self._conn.retry(
            f"pin {model}@{version}",
            lambda: self._conn.stubs[0].SetPin(
                pb.SetPinRequest(model=model, version=version, pinned=pinned),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        return list(r.pinned)

    def collect_garbage(self, keep_last: int = 10, dry_run: bool = False) -> GcResult:
        """Drops old versions server-side (see Store.gc); returns what went."""
        r: pb.CollectGarbageResponse = self._conn.retry(
            "collect garbage",
            lambda: self._conn.stubs[0].CollectGarbage(
                pb.CollectGarbageRequest(keep_last=keep_last, dry_run=dry_run),
                timeout=self.timeout,
                metadata=self._md,
            ),
        )
        dropped = [
            (m, int(v)) for m, _, v in (d.rpartition("@") for d in r.dropped_versions)
        ]
        return GcResult(dropped, r.blobs_deleted, r.bytes_freed)

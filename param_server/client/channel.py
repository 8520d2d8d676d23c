"""Connections to one daemon: channels (one per parallel stream), credentials,
deadlines, and retries of busy refusals and unavailable servers; how a
failed call's error kind is read."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from param_server.api.convert import SERVICE_NAME
from param_server.api.v1 import param_server_pb2 as pb
from param_server.api.v1 import param_server_pb2_grpc as pb_grpc
from param_server.core.auth import AUTH_HEADER, Credentials, is_loopback_host
from param_server.core.backoff import Backoff
from param_server.core.errors import (
    ERROR_KIND_KEY,
    BusyError,
    ErrorKind,
    InvalidInputError,
    ParamServerError,
    UnavailableError,
    kind_for,
)
from param_server.core.framing import MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a client keeps retrying a server that refuses streams as busy.
BUSY_PATIENCE = 120.0


def _kind(e: grpc.RpcError) -> ErrorKind:
    """The kind of error a failed call is (see core.errors.ERRORS)."""
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


class Connection:
    """Channels to the daemon at `target`, with the settings of ParamClient
    (which documents them), the counters, and `retry`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.1,
        streams: int = 4,
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
        self.stats_lock = threading.Lock()
        creds = credentials or Credentials()
        if creds.token and not creds.tls and not _is_local_target(target):
            raise InvalidInputError(
                f"refusing to send a token in plaintext to {target}; connect with "
                "TLS (grpcs://host:port, --ca-cert) or to a loopback address"
            )
        self.credentials = creds
        self.metadata: tuple[tuple[str, str], ...] | None = (
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
        self.channels = [channel(i) for i in range(streams)]
        self.stubs = [
            pb_grpc.ParamServerStub(c)  # type: ignore[no-untyped-call]
            for c in self.channels
        ]
        # Fetches and commits move raw bytes: responses are parsed by hand and
        # data chunks framed by hand (see param_server.core.framing).
        self.fetch_calls = [
            c.unary_stream(
                f"/{SERVICE_NAME}/FetchShards",
                request_serializer=pb.FetchShardsRequest.SerializeToString,
                response_deserializer=None,
            )
            for c in self.channels
        ]
        self.commit_call = self.channels[0].stream_unary(
            f"/{SERVICE_NAME}/Commit",
            request_serializer=None,
            response_deserializer=pb.CommitResponse.FromString,
        )

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def retry(self, what: str, call: Callable[[], T], *, only_busy: bool = False) -> T:
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
                    with self.stats_lock:
                        self.stats.busy_waits += 1
                    busy.sleep()
                    continue
                if only_busy or not _kind(e).retryable or attempt == self.retries:
                    raise _error(e, what) from e
                attempt += 1
                with self.stats_lock:
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
            grpc.channel_ready_future(self.channels[0]).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise UnavailableError(
                f"param-server at {self.target} did not answer within {timeout:.0f}s; "
                "is it running (param-server serve) and is the address right?"
            ) from None

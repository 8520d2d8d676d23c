"""The subscriber: listens on Redis for a model's announcements (hints only)
and wakes the reconciler; every (re)subscription wakes it too, since
messages sent while it was away are lost."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import redis

from loaders.gate import SwapError
from param_server.client import ParamClient
from param_server.core.announcements import (
    Announcement,
    channel,
    redact,
    redis_client,
)
from param_server.core.backoff import Backoff
from param_server.core.errors import InvalidInputError, ParamServerError

logger = logging.getLogger(__name__)


class Subscriber:
    """Follows `model`'s announcement channel.

    Args:
        client: asked for the Redis URL when `redis_url` is None (and again
            after losing Redis: the daemon may have moved it).
        wake: called when the server should be asked (any announcement
            but a duplicate of what is served, every (re)subscription).
        is_served: True for an announcement of what the node already serves.
        report: gets errors worth the user's attention.
    """

    def __init__(
        self,
        client: ParamClient,
        model: str,
        redis_url: str | None,
        *,
        wake: Callable[[], None],
        is_served: Callable[[Announcement], bool],
        report: Callable[[BaseException], None],
        stop: threading.Event,
    ) -> None:
        self.client = client
        self.model = model
        self._discover = redis_url is None
        self.redis_url = redis_url
        self._wake = wake
        self._is_served = is_served
        self._report = report
        self._stop = stop
        self.redis_up = False
        self.announcements = 0
        """Valid announcements received for this model."""
        self.rejected = 0
        """Malformed announcements (each still causes a check)."""
        self.gaps = 0
        """Announcements whose previous version was not the last one seen."""
        self._last_announced: int | None = None

    def url(self, refresh: bool = False) -> str:
        """The Redis URL; when discovered from the server, asked again on
        `refresh` (the daemon may have restarted its Redis elsewhere)."""
        if self._discover and (refresh or self.redis_url is None):
            try:
                url = self.client.announce_url()
            except ParamServerError:
                if self.redis_url is None:
                    raise
                url = self.redis_url  # the server is away too: try the old one
            if url is None:
                raise SwapError(
                    f"the server at {self.client.target} does not announce versions; "
                    "start it with announcements on, or pass redis_url"
                )
            if ":***@" in url:
                raise SwapError(
                    f"the server announces on {url}, which needs a password it does "
                    "not hand out: pass redis_url with the password"
                )
            self.redis_url = url
        assert self.redis_url is not None
        return self.redis_url

    def run(self) -> None:
        backoff = Backoff(0.05, 0.5)
        failed = False
        while not self._stop.is_set():
            pubsub = None
            try:
                r = redis_client(self.url(refresh=failed))
                pubsub = r.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(channel(self.model))
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        # (Re)connected: whatever was announced meanwhile is
                        # lost, so check with the server.
                        if not self.redis_up:
                            logger.info(
                                "%s: subscribed on %s", self.model, redact(self.url())
                            )
                        self.redis_up = True
                        failed = False
                        backoff.reset()
                        self._wake()
                    elif msg["type"] == "message":
                        self.on_message(msg["data"])
            except redis.AuthenticationError as e:
                self.redis_up = False
                if not failed:  # once per outage, not every retry
                    self._report(
                        SwapError(
                            f"Redis at {redact(self.redis_url or '')} refused the "
                            f"credentials ({e}); check redis_url"
                        )
                    )
                failed = True
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if self.redis_up:
                    logger.warning(
                        "%s: lost Redis (%s); serving on, reconnecting", self.model, e
                    )
                self.redis_up = False
                failed = True
            except ParamServerError as e:  # the server could not tell the URL
                self.redis_up = False
                failed = True
                self._report(e)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()
            backoff.sleep(self._stop)

    def on_message(self, data: bytes) -> None:
        try:
            a = Announcement.from_json(data)
        except InvalidInputError as e:
            logger.warning("%s: ignoring a malformed announcement: %s", self.model, e)
            self.rejected += 1
            self._wake()  # harmless: a manifest check
            return
        if a.model != self.model:
            return
        self.announcements += 1
        if self._last_announced is not None and a.previous != self._last_announced:
            self.gaps += 1
        self._last_announced = a.version
        logger.debug("%s: announced %d (%s)", self.model, a.version, a.kind)
        if self._is_served(a):
            return  # a duplicate of what we serve
        self._wake()

"""The heartbeat: writes a node's status to Redis under a key that expires
after three intervals without one, and publishes each version it applied."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Callable

import redis

from param_server.core.announcements import (
    APPLIED_PREFIX,
    NodeStatus,
    node_status_key,
    redis_client,
)
from param_server.core.errors import ParamServerError

logger = logging.getLogger(__name__)


class Heartbeat:
    """Reports `status()` every `interval` seconds, and at once when
    `swapped` is set; publishes and drains `applied_log`."""

    def __init__(
        self,
        model: str,
        node_id: str,
        interval: float,
        *,
        status: Callable[[], NodeStatus],
        url: Callable[[], str],
        applied_log: deque[tuple[int, float, float]],
        swapped: threading.Event,
        stop: threading.Event,
    ) -> None:
        self.model = model
        self.node_id = node_id
        self.interval = interval
        self._status = status
        self._url = url
        self._applied_log = applied_log
        self._swapped = swapped
        self._stop = stop

    def run(self) -> None:
        r: redis.Redis | None = None
        while not self._stop.is_set():
            self._swapped.wait(self.interval)
            self._swapped.clear()
            if self._stop.is_set():
                return
            try:
                if r is None:
                    r = redis_client(self._url())
                ttl = max(1, int(self.interval * 3 + 0.999))
                key = node_status_key(self.model, self.node_id)
                r.set(key, self._status().to_json(), ex=ttl)
                while self._applied_log:
                    version, at, flip_us = self._applied_log[0]
                    r.publish(
                        APPLIED_PREFIX + self.model,
                        json.dumps(
                            {
                                "node": self.node_id,
                                "version": version,
                                "time": at,
                                "flip_us": round(flip_us, 1),
                            }
                        ),
                    )
                    self._applied_log.popleft()
            except (redis.RedisError, OSError, ParamServerError) as e:
                logger.debug("%s: heartbeat failed: %s", self.model, e)
                if r is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        r.close()
                r = None

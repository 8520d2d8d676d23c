"""Announcing new versions on Redis pub/sub.

The announcer watches the store itself (every HEAD move is a numbered history
record), so commits made through the daemon, the CLI or any other writer of
the store are announced alike. It never blocks a commit: it runs in its own
thread, and while Redis is down it waits and then sends one catch-up message
per model. The message format is `param_server.core.announcements`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from param_server.core.announcements import (
    Announcement,
    channel,
    provenance_summary,
    redact,
    redis_client,
)
from param_server.core.backoff import Backoff
from param_server.core.errors import NotFoundError
from param_server.core.manifest import Manifest
from param_server.store import Store, utc_now

logger = logging.getLogger(__name__)


class Announcer:
    """Publishes every HEAD move of every model in `store` to Redis.

    Args:
        store: the store to watch.
        redis_url: where to publish.
        poll_interval: seconds between looks at the store when nobody calls
            `poke` (commits through the daemon poke it at once).
    """

    def __init__(
        self, store: Store, redis_url: str, *, poll_interval: float = 0.5
    ) -> None:
        self.store = store
        self.redis_url = redis_url
        self.poll_interval = poll_interval
        self._redis = redis_client(redis_url)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq: dict[str, int] = {}
        self._announced: dict[str, int] = {}  # model -> head last announced
        self._catch_up: set[str] = set()
        self._up = True
        self._started = False
        self.published = 0
        """Messages published so far."""
        self.last: Announcement | None = None
        """The last message published."""
        self._thread = threading.Thread(
            target=self._run, name="param-server-announcer", daemon=True
        )

    @property
    def redis_up(self) -> bool:
        """False from the first failed attempt to reach Redis until it answers
        again."""
        return self._up

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        """Looks at the store now (call after a commit or rollback)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)
        self._redis.close()

    def _run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        while not self._stop.is_set():
            try:
                self._scan()
                self._started = True
                delay = self.poll_interval
                backoff.reset()
                if not self._up:
                    logger.info("Redis at %s is back", redact(self.redis_url))
                    self._up = True
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                if self._up:
                    logger.warning(
                        "cannot announce on Redis at %s (%s); commits go on, "
                        "announcements resume when it returns",
                        redact(self.redis_url),
                        e,
                    )
                    self._up = False
                delay = backoff.next()
            except Exception:
                # A bug must not silence announcements for the daemon's life.
                logger.exception("announcer failed; retrying")
                delay = 2.0
            self._wake.wait(delay)
            self._wake.clear()

    def _scan(self) -> None:
        for model in self.store.list_models():
            try:
                st = self.store.state(model)
            except NotFoundError:
                continue
            last = self._seq.get(model)
            if last is None and self._started:
                last = 0  # a model created since: announce its every move
            elif last is None:
                # A (re)started daemon says where each model stands once;
                # nodes that missed messages meanwhile reconcile on it.
                self._catch_up.add(model)
            elif last == st.seq and model not in self._catch_up:
                continue
            if model in self._catch_up:
                self._send_head(model, st.head, st.seq)
                continue
            for rec in self.store.history(model, since=last or 0):
                if rec.get("action") in ("commit", "rollback"):
                    try:
                        self._send_record(model, rec)
                    except (redis.ConnectionError, redis.TimeoutError, OSError):
                        self._catch_up.add(model)
                        raise
                self._seq[model] = rec["seq"]

    def _publish(self, a: Announcement) -> None:
        self._redis.publish(channel(a.model), a.to_json())
        self.published += 1
        self.last = a
        self._announced[a.model] = a.version
        logger.debug("announced %s@%d (%s)", a.model, a.version, a.kind)

    def _manifest(self, model: str, version: int) -> Manifest | None:
        if version <= 0:
            return None
        try:
            return self.store.get_manifest(model, version)
        except NotFoundError:  # collected since
            return None

    def _send(
        self, kind: str, model: str, version: int, previous: int, time: str, seq: int
    ) -> None:
        """Publishes `version` as a move from `previous` (changes diffed here)."""
        new = self.store.get_manifest(model, version)
        changed, removed = new.diff(self._manifest(model, previous))
        self._publish(
            Announcement(
                kind=kind,
                model=model,
                version=version,
                previous=previous,
                parent=new.parent,
                changed=changed,
                removed=removed,
                time=time,
                seq=seq,
                store_id=self.store.store_id,
                provenance=provenance_summary(new),
            )
        )

    def _send_record(self, model: str, rec: dict[str, Any]) -> None:
        previous = rec["parent"] if rec["action"] == "commit" else rec["from"]
        self._send(
            rec["action"],
            model,
            int(rec["version"]),
            int(previous),
            str(rec.get("time", "")),
            int(rec["seq"]),
        )

    def _send_head(self, model: str, head: int, seq: int) -> None:
        self._send("head", model, head, self._announced.get(model, 0), utc_now(), seq)
        self._catch_up.discard(model)
        self._seq[model] = seq

"""The courier: delivers the durable alert outbox, only on the leader, critical alerts first.

Its own loop, so a slow or hanging alert target never delays a check or a rollback. Each tick takes
the alerts due now (critical first, then oldest), makes one attempt per target that has not taken
the alert yet (targets in parallel, each bounded by the notify timeout), then removes the alert
(all took it) or stores its next due time (``backoff * 2**attempts``, capped) back in Redis. Critical
alerts are retried until delivered; others give up after ``notify_retries`` retries, logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from proxy.background import BackgroundLoop
from proxy.canary import events
from proxy.canary.notify.base import Notifier
from proxy.canary.windows import REDIS_ERRORS
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.settings import CanarySettings

log = logging.getLogger("strangler.canary.notify")

MAX_BACKOFF_SECONDS = 60.0


class Courier(BackgroundLoop):
    name = "strangler-canary-courier"

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        notifier: Notifier,
        settings: CanarySettings,
        metrics: Metrics,
        is_leader: Callable[[], bool],
        wall: Callable[[], float] = time.time,
        interval: float = 0.2,
    ) -> None:
        super().__init__()
        self._redis = redis
        self._keys = keys
        self._notifier = notifier
        self._metrics = metrics
        self._is_leader = is_leader
        self._wall = wall
        self._retries = settings.notify_retries
        self._backoff = settings.notify_backoff_seconds
        self.interval = interval

    async def tick(self) -> int:
        """One round over the due alerts; returns how many left the outbox."""
        if not self._is_leader():
            return 0
        try:
            due = await events.due(self._redis, self._keys, self._wall())
            finished = 0
            for item in due:
                finished += await self._round(item)
            return finished
        except REDIS_ERRORS as exc:
            log.warning("alert outbox unreachable (%s); alerts stay queued", type(exc).__name__)
            return 0

    async def _round(self, item: events.Pending) -> int:
        event = item.event
        wanted = [t for t in self._notifier.targets if t not in item.done and self._notifier.wants(t, event)]
        outcomes = await asyncio.gather(*(self._notifier.attempt(t, event) for t in wanted))
        failed = [t for t, outcome in zip(wanted, outcomes, strict=True) if outcome == "retry"]
        done = item.done + tuple(t for t in wanted if t not in failed)
        attempts = item.attempts + 1
        if failed and (event.severity == "critical" or attempts <= self._retries):
            delay = min(self._backoff * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
            await events.reschedule(
                self._redis, self._keys, events.Pending(event, attempts, done), self._wall() + delay
            )
            if attempts == 1 or attempts % 10 == 0:
                log.warning("%s alert for %s not delivered to %s yet (attempt %d); retrying in %.1fs",
                            event.kind, event.group, ", ".join(failed), attempts, delay)  # fmt: skip
            return 0
        if failed:
            log.warning("gave up on %s alert for %s to %s after %d attempts",
                        event.kind, event.group, ", ".join(failed), attempts)  # fmt: skip
        await events.finish(self._redis, self._keys, event.id)
        if event.kind == "aborted":  # made by a person through the CLI or any admin API
            self._metrics.rolled_back(event.group, "aborted")
        return 1

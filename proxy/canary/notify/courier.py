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
            if not due:
                return 0
            targets = list(self._notifier.targets)
            results = await asyncio.gather(*(self._target_round(t, due) for t in targets))
            finished = 0
            for item in due:
                key = item.event.id
                outcomes = {t: r[key] for t, r in zip(targets, results, strict=True) if key in r}
                finished += await self._settle(item, outcomes)
            return finished
        except REDIS_ERRORS as exc:
            log.warning("alert outbox unreachable (%s); alerts stay queued", type(exc).__name__)
            return 0

    async def _target_round(self, target: str, due: list[events.Pending]) -> dict[str, str]:
        """Highest priority first; a target that fails once is not tried again this round (a
        hanging target delays only itself, and a down one gets one probe per round)."""
        outcomes: dict[str, str] = {}
        for item in due:
            if target in item.done:
                continue
            if not self._notifier.wants(target, item.event):
                outcomes[item.event.id] = "skipped"
                continue
            outcome = await self._notifier.attempt(target, item.event)
            outcomes[item.event.id] = outcome
            if outcome == "retry":
                break
        return outcomes

    async def _settle(self, item: events.Pending, outcomes: dict[str, str]) -> int:
        event = item.event
        failed = [t for t, o in outcomes.items() if o == "retry"]
        done = item.done + tuple(t for t, o in outcomes.items() if o != "retry")
        untried = [t for t in self._notifier.targets if t not in done and t not in failed]
        if not failed and not untried:
            await events.finish(self._redis, self._keys, event.id)
            if event.kind == "aborted":  # made by a person through the CLI or any admin API
                self._metrics.rolled_back(event.group, "aborted")
            return 1
        if not failed:  # some target skipped it this round (it failed on an earlier alert): next round
            if done != item.done:
                await events.reschedule(
                    self._redis, self._keys, events.Pending(event, item.attempts, done), 0
                )
            return 0
        attempts = item.attempts + 1
        if event.severity != "critical" and attempts > self._retries:
            log.warning("gave up on %s alert for %s to %s after %d attempts",
                        event.kind, event.group, ", ".join(failed), attempts)  # fmt: skip
            for target in failed:
                self._notifier.gave_up(target)
            await events.finish(self._redis, self._keys, event.id)
            return 1
        delay = min(self._backoff * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
        await events.reschedule(
            self._redis, self._keys, events.Pending(event, attempts, done), self._wall() + delay
        )
        if attempts == 1 or attempts % 10 == 0:
            log.warning("%s alert for %s not delivered to %s yet (attempt %d); retrying in %.1fs",
                        event.kind, event.group, ", ".join(failed), attempts, delay)  # fmt: skip
        return 0

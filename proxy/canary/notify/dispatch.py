"""Background delivery: a bounded queue and one worker per target, retries with backoff, never blocking.

``notify`` only formats and enqueues (``put_nowait``); a full queue drops the alert and counts it,
because an alerting outage must never slow the proxy or the health loop. One worker per target
keeps each target's alerts in order (a PagerDuty resolve never overtakes its trigger) and lets a
hanging target delay only itself. Each failed attempt is retried after ``backoff * 2**attempt``
seconds; the last failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.background import cancel_and_wait
from proxy.canary.events import SEVERITY_RANK, Event
from proxy.canary.notify import formats
from proxy.metrics import Metrics
from proxy.settings import CanarySettings, NotifierTarget

log = logging.getLogger("strangler.canary.notify")


@dataclass(frozen=True)
class Target:
    kind: str
    url: str
    min_rank: int
    routing_key: str | None

    def payload(self, event: Event) -> dict[str, Any] | None:
        if SEVERITY_RANK.get(event.severity, 0) < self.min_rank:
            return None
        if self.kind == "slack":
            return formats.slack(event)
        if self.kind == "pagerduty":
            return formats.pagerduty(event, self.routing_key or "", socket.gethostname())
        return formats.webhook(event)


def make_target(spec: NotifierTarget) -> Target:
    assert spec.url is not None  # settings fill or reject it
    return Target(
        spec.kind,
        spec.url,
        SEVERITY_RANK[spec.min_severity],
        spec.routing_key.get_secret_value() if spec.routing_key else None,
    )


class Dispatcher:
    """The real ``Notifier``: formats per target, queues, delivers in the background."""

    def __init__(self, targets: list[Target], settings: CanarySettings, metrics: Metrics) -> None:
        self.targets = targets
        self._metrics = metrics
        self._retries = settings.notify_retries
        self._backoff = settings.notify_backoff_seconds
        self._timeout = settings.notify_timeout_seconds
        self._queues: list[asyncio.Queue[dict[str, Any]]] = [
            asyncio.Queue(settings.notify_queue_size) for _ in targets
        ]
        self._workers: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    def notify(self, event: Event) -> None:
        for target, queue in zip(self.targets, self._queues, strict=True):
            try:
                body = target.payload(event)
            except Exception:  # noqa: BLE001 - a formatting bug must not break the caller
                log.exception("could not format %s alert for %s", event.kind, target.kind)
                continue
            if body is None:
                continue
            try:
                queue.put_nowait(body)
            except asyncio.QueueFull:
                self._metrics.alert_delivery(target.kind, "dropped")
                log.warning("alert queue full: dropped %s alert for %s", event.kind, target.kind)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        self._workers = [
            asyncio.create_task(self._work(target, queue), name=f"strangler-notify-{target.kind}")
            for target, queue in zip(self.targets, self._queues, strict=True)
        ]

    async def stop(self) -> None:
        # a short grace so the alert for a rollback made just before shutdown still leaves
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.drained(), min(1.0, self._timeout))
        await cancel_and_wait(self._workers)
        self._workers = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _work(self, target: Target, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            body = await queue.get()
            try:
                await self._deliver(target, body)
            finally:
                queue.task_done()

    async def _deliver(self, target: Target, body: dict[str, Any]) -> None:
        assert self._client is not None
        problem = ""
        for attempt in range(self._retries + 1):
            try:
                response = await self._client.post(target.url, json=body)
                if response.status_code < 300:
                    self._metrics.alert_delivery(target.kind, "sent")
                    return
                problem = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code != 429:
                    break  # our payload or key is wrong: retrying will not help
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt < self._retries:
                self._metrics.alert_delivery(target.kind, "retried")
                await asyncio.sleep(self._backoff * 2**attempt)
        self._metrics.alert_delivery(target.kind, "failed")
        log.warning(
            "alert to %s target failed after %d attempts: %s", target.kind, self._retries + 1, problem
        )

    async def drained(self) -> None:
        """Wait until every queued alert was delivered or given up on (tests, shutdown)."""
        for queue in self._queues:
            await queue.join()

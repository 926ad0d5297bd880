"""Delivery to webhook targets: one formatted, time-bounded POST per attempt.

The courier (``notify/courier``) decides what to send when, from the durable outbox; this module
only knows the targets and their formats, and counts every attempt's outcome.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.canary.events import SEVERITY_RANK, Event
from proxy.canary.notify import formats
from proxy.canary.notify.base import Outcome
from proxy.metrics import Metrics
from proxy.settings import CanarySettings, NotifierTarget

log = logging.getLogger("strangler.canary.notify")


@dataclass(frozen=True)
class Target:
    kind: str
    url: str
    min_rank: int
    routing_key: str | None
    kinds: frozenset[str] | None = None  # the events this target receives (None: all)

    def payload(self, event: Event) -> dict[str, Any] | None:
        if SEVERITY_RANK.get(event.severity, 0) < self.min_rank:
            return None
        if self.kinds is not None and event.kind not in self.kinds:
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
        None if spec.events is None else frozenset(spec.events),
    )


class Dispatcher:
    """The real ``Notifier``: formats per target and makes one bounded HTTP attempt at a time."""

    def __init__(self, targets: list[Target], settings: CanarySettings, metrics: Metrics) -> None:
        self._by_name = {f"{index}-{target.kind}": target for index, target in enumerate(targets)}
        self._metrics = metrics
        self._timeout = settings.notify_timeout_seconds
        self._client: httpx.AsyncClient | None = None

    @property
    def targets(self) -> list[str]:
        return list(self._by_name)

    def wants(self, target: str, event: Event) -> bool:
        try:
            return self._by_name[target].payload(event) is not None
        except Exception:  # noqa: BLE001 - a formatting bug must not break the courier
            log.exception("could not format %s alert for %s", event.kind, target)
            return False

    async def attempt(self, target: str, event: Event) -> Outcome:
        spec = self._by_name[target]
        body = spec.payload(event)
        if body is None:
            return "sent"
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        try:
            response = await asyncio.wait_for(self._client.post(spec.url, json=body), self._timeout * 2)
        except (TimeoutError, httpx.HTTPError) as exc:
            self._metrics.alert_delivery(spec.kind, "retried")
            log.debug("alert to %s failed: %s", spec.kind, type(exc).__name__)
            return "retry"
        if response.status_code < 300:
            self._metrics.alert_delivery(spec.kind, "sent")
            return "sent"
        if 400 <= response.status_code < 500 and response.status_code != 429:
            self._metrics.alert_delivery(spec.kind, "failed")
            log.warning("alert to %s target rejected: HTTP %d", spec.kind, response.status_code)
            return "rejected"  # our payload or key is wrong: retrying will not help
        self._metrics.alert_delivery(spec.kind, "retried")
        return "retry"

    def gave_up(self, target: str) -> None:
        self._metrics.alert_delivery(self._by_name[target].kind, "failed")

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

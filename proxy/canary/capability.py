"""Wires the canary capability: the window recorder on the hot path, the flusher, the leader loop,
the notifier, the courier, and the service its admin routes (``proxy/admin/canary.py``) call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from proxy.background import Component
from proxy.canary import statusview
from proxy.canary.controller import CanaryController, ParityBehind, ShadowTotals
from proxy.canary.notify.courier import Courier
from proxy.canary.notify.factory import build_notifier
from proxy.canary.rollout import Rollouts
from proxy.canary.windows import WindowFlusher, WindowRecorder
from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.traffic.hooks import Recorder


class CanaryService:
    """What the admin API asks of the canary capability (status; rollouts through ``rollouts``)."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        keys: Keys,
        rollouts: Rollouts,
        controller: CanaryController | None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.rollouts = rollouts
        self.controller = controller

    async def status(self) -> dict[str, Any]:
        data = await statusview.read_status(self.redis, self.keys, self.settings.group_names)
        data["this_process"] = {
            "identity": self.controller.lock.identity if self.controller else None,
            "leader": bool(self.controller and self.controller.is_leader),
        }
        return data


@dataclass
class Canary:
    """The canary's parts: ``recorders`` go to the request path, ``components`` to the lifespan
    (in start order); both are empty when ``canary.enabled`` is off (rollouts still answer)."""

    service: CanaryService
    recorders: list[Recorder] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)


def build(
    settings: Settings,
    metrics: Metrics,
    control: ControlClient,
    rollouts: Rollouts,
    shadow_totals: ShadowTotals,
    parity_behind: ParityBehind,
) -> Canary:
    """``control`` brings the Redis client and key names; the two readers are the shadow report's
    and parity's (their owners provide them: canary never reads their layout)."""
    canary = settings.canary
    redis, keys = control.redis, control.keys
    if not canary.enabled:
        return Canary(CanaryService(settings, redis, keys, rollouts, None))
    recorder = WindowRecorder(canary.count_4xx_as_errors)
    flusher = WindowFlusher(recorder, redis, keys, canary)
    notifier = build_notifier(canary, metrics)
    controller = CanaryController(
        settings, redis, keys, control, metrics, rollouts,
        shadow_totals=shadow_totals, parity_behind=parity_behind,
    )  # fmt: skip
    courier = Courier(redis, keys, notifier, canary, metrics, lambda: controller.is_leader)
    return Canary(
        CanaryService(settings, redis, keys, rollouts, controller),
        recorders=[recorder],
        components=[notifier, flusher, controller, courier],
    )

"""Wires the canary capability: the window recorder on the hot path, the flusher, the leader loop,
the notifier, the courier and the admin routes (``/canary/status``, ``/rollout/...``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.background import Component
from proxy.canary import records
from proxy.canary.controller import CanaryController, ParityBehind, ShadowTotals
from proxy.canary.notify import build_notifier
from proxy.canary.notify.courier import Courier
from proxy.canary.rollout import RolloutError, Rollouts, check_steps, parse_duration
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
        data = await records.read_status(self.redis, self.keys, self.settings.group_names)
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

    def admin_routes(self) -> list[Route]:
        return admin_routes(self.service)


def build(
    settings: Settings,
    metrics: Metrics,
    redis: aioredis.Redis,
    keys: Keys,
    control: ControlClient,
    rollouts: Rollouts,
    shadow_totals: ShadowTotals,
    parity_behind: ParityBehind,
) -> Canary:
    canary = settings.canary
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


def admin_routes(service: CanaryService) -> list[Route]:
    """``/canary/status`` and ``/rollout/...``; the prefix and the write-token guard come from admin/app."""
    settings = service.settings

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        import orjson

        try:
            data = orjson.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise RolloutError("body must be a JSON object")
        return data

    def group_of(data: dict[str, Any], request: Request) -> str:
        group = data.get("group") or request.query_params.get("group") or "default"
        if group not in settings.group_names:
            raise LookupError(group)
        return str(group)

    def handler(action: str) -> Any:
        async def handle(request: Request) -> Response:
            try:
                data = await body_of(request)
                group = group_of(data, request)
                who = f"admin api ({request.client.host if request.client else '?'})"
                if action == "start":
                    steps = data.get("steps") or settings.canary.steps
                    if isinstance(steps, str):
                        steps = [float(s) for s in steps.split(",") if s.strip()]
                    steps = [float(s) for s in steps]
                    check_steps(steps)
                    raw_interval = data.get("interval", settings.canary.step_interval_seconds)
                    interval = parse_duration(str(raw_interval))
                    state = await service.rollouts.start(group, steps, interval, who)
                elif action == "pause":
                    state = await service.rollouts.pause(group, who)
                elif action == "resume":
                    state = await service.rollouts.resume(group, who)
                elif action == "abort":
                    state = await service.rollouts.abort(group, who)  # the leader counts it
                elif action == "promote":
                    state = await service.rollouts.promote(group, who, full=bool(data.get("full")))
                else:
                    found = await service.rollouts.get(group)
                    if found is None:
                        return JSONResponse({"error": "no rollout", "group": group}, status_code=404)
                    state = found
            except LookupError as exc:
                return JSONResponse({"error": "unknown group", "group": str(exc)}, status_code=404)
            except (RolloutError, ValueError, TypeError) as exc:
                return JSONResponse({"error": "rejected", "detail": str(exc)}, status_code=409)
            return JSONResponse(state.as_dict())

        return handle

    async def status(request: Request) -> Response:
        return JSONResponse(await service.status())

    return [
        Route("/canary/status", status, methods=["GET"]),
        Route("/rollout", handler("get"), methods=["GET"]),
        *(Route(f"/rollout/{action}", handler(action), methods=["POST"])
          for action in ("start", "pause", "resume", "abort", "promote")),
    ]  # fmt: skip

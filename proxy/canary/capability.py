"""Wires the canary capability: the window recorder on the hot path, the flusher, the leader loop,
the notifier, the admin routes and the ``canary`` service."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.canary import records
from proxy.canary.controller import CanaryController
from proxy.canary.notify.courier import Courier
from proxy.canary.notify.factory import build_notifier
from proxy.canary.rollout import RolloutError, Rollouts, check_steps, parse_duration
from proxy.canary.windows import WindowFlusher, WindowRecorder
from proxy.capability import Capability, Component, Deps


class CanaryService:
    """What the admin API (and anything else in-process) may ask of the canary capability."""

    def __init__(self, deps: Deps, rollouts: Rollouts, controller: CanaryController | None) -> None:
        self.deps = deps
        self.rollouts = rollouts
        self.controller = controller

    async def status(self) -> dict[str, Any]:
        data = await records.read_status(self.deps.redis, self.deps.keys, self.deps.settings.group_names)
        data["this_process"] = {
            "identity": self.controller.lock.identity if self.controller else None,
            "leader": bool(self.controller and self.controller.is_leader),
        }
        return data


def build(deps: Deps) -> Capability:
    canary = deps.settings.canary
    rollouts = Rollouts(deps.redis, deps.keys)
    if not canary.enabled:
        service = CanaryService(deps, rollouts, None)
        return Capability(
            "canary", admin_routes=lambda ctx: admin_routes(service), services={"canary": service}
        )
    recorder = WindowRecorder(canary.count_4xx_as_errors)
    flusher = WindowFlusher(recorder, deps.redis, deps.keys, canary)
    notifier = build_notifier(canary, deps.metrics)
    controller = CanaryController(deps.settings, deps.redis, deps.keys, deps.control, deps.metrics, rollouts)
    courier = Courier(deps.redis, deps.keys, notifier, canary, deps.metrics, lambda: controller.is_leader)
    service = CanaryService(deps, rollouts, controller)
    components: list[Component] = [notifier, flusher, controller, courier]  # type: ignore[list-item]
    return Capability(
        "canary",
        recorders=[recorder],
        components=components,
        admin_routes=lambda ctx: admin_routes(service),
        services={"canary": service},
    )


def admin_routes(service: CanaryService) -> list[Route]:
    """``/canary/status`` and ``/rollout/...``; the prefix and the write-token guard come from admin/app."""
    settings = service.deps.settings

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

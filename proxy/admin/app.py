"""The admin API (Starlette is fine here: this is not the hot path)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.auth import allowed
from proxy.control.client import ControlClient, InvalidValue
from proxy.control.store import ControlStore
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.settings import Settings

log = logging.getLogger("strangler.admin")

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class AdminContext:
    """Everything admin handlers may use, passed in by the composition root."""

    settings: Settings
    store: ControlStore
    metrics: Metrics
    redis: aioredis.Redis
    control: ControlClient
    extra: dict[str, Any] = field(default_factory=dict)  # capability services (shadow report, rollout)


def error(status: int, message: str, **details: Any) -> JSONResponse:
    return JSONResponse({"error": message, **details}, status_code=status)


def build_admin(ctx: AdminContext, extra_routes: list[Route] | None = None) -> Starlette:
    token = ctx.settings.admin_token_value()
    reads_protected = ctx.settings.admin_reads_require_token

    def guard(handler: Handler, write: bool) -> Handler:
        async def guarded(request: Request) -> Response:
            if (write or reads_protected) and not allowed(request, token):
                return error(401, "unauthorized", detail="send Authorization: Bearer <admin token>")
            return await handler(request)

        return guarded

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        snap = ctx.store.current
        age = ctx.store.age_seconds()
        ready_ = snap.redis_ok or snap.loaded_at is not None
        body = {
            "ready": ready_,
            "redis_ok": snap.redis_ok,
            "snapshot_age_seconds": age,
            "policy": ctx.settings.redis_down_policy,
        }
        if not snap.redis_ok and snap.loaded_at is None:
            body["detail"] = "redis unreachable and no snapshot yet: serving the default split"
        return JSONResponse(body, status_code=200 if ready_ else 503)

    async def metrics(request: Request) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    async def status(request: Request) -> Response:
        return JSONResponse(status_payload(ctx))

    async def get_split(request: Request) -> Response:
        snap = ctx.store.current
        return JSONResponse({g: snap.percentage(g) for g in ctx.settings.group_names})

    async def put_split(request: Request) -> Response:
        body = await json_body(request)
        group = body.get("group") or "default"
        if group not in ctx.settings.group_names:
            return error(404, "unknown group", group=group, groups=ctx.settings.group_names)
        try:
            value = await ctx.control.set_split(body.get("percentage"), group)
        except InvalidValue as exc:
            return error(422, "invalid percentage", detail=str(exc))
        log.info("split for %s set to %s%% through the admin API", group, value)
        return JSONResponse({"group": group, "percentage": value})

    async def rollback(request: Request) -> Response:
        body = await json_body(request, allow_empty=True)
        group = body.get("group") or "default"
        if group not in ctx.settings.group_names:
            return error(404, "unknown group", group=group)
        await ctx.control.set_split(0, group)
        ctx.metrics.rollbacks.labels(group, "manual").inc()
        log.warning("manual rollback of %s to 0%% through the admin API", group)
        return JSONResponse({"group": group, "percentage": 0.0})

    routes = [
        Route("/health", guard(health, write=False), methods=["GET", "HEAD"]),
        Route("/ready", guard(ready, write=False), methods=["GET", "HEAD"]),
        Route("/metrics", guard(metrics, write=False), methods=["GET"]),
        Route("/status", guard(status, write=False), methods=["GET"]),
        Route("/split", guard(get_split, write=False), methods=["GET"]),
        Route("/split", guard(put_split, write=True), methods=["PUT", "POST"]),
        Route("/rollback", guard(rollback, write=True), methods=["POST"]),
    ]
    for route in extra_routes or []:
        write = bool(set(route.methods or ()) - {"GET", "HEAD"})
        routes.append(
            Route(route.path, guard(route.endpoint, write=write), methods=list(route.methods or []))
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, exc.detail)

    app = Starlette(routes=routes, exception_handlers={HTTPException: on_http_error})
    return app


async def json_body(request: Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw and allow_empty:
        return {}
    try:
        import orjson

        data = orjson.loads(raw)
    except ValueError as exc:
        raise HTTPException(400, "body must be a JSON object") from exc
    if not isinstance(data, dict):
        raise HTTPException(400, "body must be a JSON object")
    return data


def status_payload(ctx: AdminContext) -> dict[str, Any]:
    snap = ctx.store.current
    return {
        "redis_ok": snap.redis_ok,
        "snapshot_age_seconds": ctx.store.age_seconds(),
        "groups": {
            group: {
                "percentage": snap.percentage(group),
                "own_key": group in snap.group_percentages,
            }
            for group in ctx.settings.group_names
        },
    }


class PrefixMount:
    """Sets root_path to the admin prefix so the Starlette routes read ``/health``, not the full path."""

    def __init__(self, prefix: str, app: Any) -> None:
        self.prefix = prefix
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        child = dict(scope)
        child["root_path"] = scope.get("root_path", "") + self.prefix
        await self.app(child, receive, send)

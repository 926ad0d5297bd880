"""The admin API (Starlette is fine here: this is not the hot path).

Every answer is JSON, errors included (``{"error": ..., "detail": ...}`` for 400/401/404/405/422/500),
and ``GET {prefix}/openapi.json`` describes every route, the capabilities' extra routes included.
Changes (any method but GET/HEAD) need the bearer token, from any peer (loopback included);
reads follow ``admin_reads_require_token``, except ``/health`` and ``/ready`` which stay open for
load balancers and container health checks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.admin import views
from proxy.admin.auth import allowed
from proxy.admin.openapi import RouteDoc, openapi_document
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


def error(status: int, message: str, **details: Any) -> JSONResponse:
    return JSONResponse({"error": message, **details}, status_code=status)


OPEN_READS = frozenset({"/health", "/ready"})  # liveness/readiness probes never need the token


def build_admin(ctx: AdminContext, extra_routes: list[Route] | None = None) -> Starlette:
    token = ctx.settings.admin_token_value()
    reads_protected = ctx.settings.admin_reads_require_token

    def needs_token(handler: Handler, write: bool, path: str) -> bool:
        """Writes need the token, except a handler marked ``signed`` (it verifies a signature of
        its own, e.g. Slack's); reads only when ``admin_reads_require_token``."""
        if getattr(handler, "signed", False):
            return False
        return write or (reads_protected and path not in OPEN_READS)

    how = "send Authorization: Bearer <admin token> (strangler serve keeps it in admin_token_file)"

    def guard(handler: Handler, write: bool, path: str = "") -> Handler:
        protected = needs_token(handler, write, path)

        async def guarded(request: Request) -> Response:
            if protected and not allowed(request, token):
                return error(401, "unauthorized", detail=how)
            return await handler(request)

        guarded.__doc__ = handler.__doc__
        return guarded

    async def health(request: Request) -> Response:
        """Liveness: the event loop answers. Never asks Redis (an outage must not restart every
        replica); the version tells a rolling update's old pods from its new ones."""
        return JSONResponse({"status": "ok", "version": __version__})

    async def ready(request: Request) -> Response:
        """Readiness: a control snapshot is loaded (503 until Redis answered once)."""
        snap = ctx.store.current
        age = ctx.store.age_seconds()
        ready_ = snap.redis_ok or snap.loaded_at is not None
        body: dict[str, Any] = {
            "ready": ready_,
            "redis_ok": snap.redis_ok,
            "snapshot_age_seconds": age,
            "policy": ctx.settings.redis_down_policy,
        }
        if not snap.redis_ok and snap.loaded_at is None:
            body["detail"] = "redis unreachable and no snapshot yet: serving the default split"
        return JSONResponse(body, status_code=200 if ready_ else 503)

    async def metrics(request: Request) -> Response:
        """Prometheus metrics (text exposition format)."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    async def status(request: Request) -> Response:
        """The status view (docs/schemas/status.json): split per route group with its rollout, last
        check and decision, a loss of Redis data, parity, and this proxy's own view of Redis."""
        return JSONResponse(await status_document(ctx, here(request)))

    async def get_split(request: Request) -> Response:
        """v2 share in force per route group."""
        snap = ctx.store.current
        return JSONResponse({g: snap.percentage(g) for g in ctx.settings.group_names})

    async def put_split(request: Request) -> Response:
        """Set the v2 share: {"percentage": 25, "group": "default"}."""
        body = await json_body(request)
        group = body.get("group") or "default"
        if group not in ctx.settings.group_names:
            return unknown_group(group, ctx.settings.group_names)
        if "percentage" not in body:
            return error(422, "invalid percentage", detail="body needs a percentage between 0 and 100")
        try:
            value = await ctx.control.set_split(body["percentage"], group)
        except InvalidValue as exc:
            return error(422, "invalid percentage", detail=str(exc))
        log.info("split for %s set to %s%% through the admin API", group, value)
        return JSONResponse(views.set_document(views.source(views.ADMIN_API, here(request)), group, value))

    async def rollback(request: Request) -> Response:
        """Back to 0% v2 at once: {"group": G} for one group; no group: the global split and every
        group with its own key. "changed" maps each group to the value it had."""
        body = await json_body(request, allow_empty=True)
        group = body.get("group") or None
        if group is not None and group not in ctx.settings.group_names:
            return unknown_group(group, ctx.settings.group_names)
        try:
            changed = await ctx.control.rollback(group, ctx.settings.group_names)
        except (RedisError, OSError, TimeoutError):
            # e.g. a Sentinel failover in progress: in force here now, written when Redis returns
            ctx.store.hold_rollback(group, lambda: ctx.control.rollback(group, ctx.settings.group_names))
            log.warning("manual rollback of %s: Redis unreachable, applied here, retrying", group or "all")
            detail = "Redis unreachable: applied on this proxy now, written to Redis when it returns"
            where = views.source(views.ADMIN_API, here(request))
            return JSONResponse(views.rollback_document(where, group, None, detail), status_code=202)
        for name in changed:
            if name in ctx.settings.group_names:  # metric labels stay a closed set
                ctx.metrics.rollbacks.labels(name, "manual").inc()
        log.warning("manual rollback of %s to 0%% through the admin API", ", ".join(changed))
        return JSONResponse(
            views.rollback_document(views.source(views.ADMIN_API, here(request)), group, changed)
        )

    async def openapi(request: Request) -> Response:
        """This document."""
        return JSONResponse(document)

    table: list[tuple[str, Handler, list[str]]] = [
        ("/health", health, ["GET", "HEAD"]),
        ("/ready", ready, ["GET", "HEAD"]),
        ("/metrics", metrics, ["GET"]),
        ("/status", status, ["GET"]),
        ("/split", get_split, ["GET"]),
        ("/split", put_split, ["PUT", "POST"]),
        ("/rollback", rollback, ["POST"]),
        ("/openapi.json", openapi, ["GET"]),
    ]
    for route in extra_routes or []:
        table.append((route.path, route.endpoint, sorted(route.methods or ["GET"])))

    # one Route per path, dispatching on the method: a 405 then lists every allowed method
    by_path: dict[str, dict[str, Handler]] = {}
    docs: list[RouteDoc] = []
    for path, handler, methods in table:
        handlers = by_path.setdefault(path, {})
        for write in (False, True):  # a route's GET stays a read even if it also takes POST
            chosen = [m for m in methods if (m not in ("GET", "HEAD")) is write]
            if not chosen:
                continue
            guarded = guard(handler, write=write, path=path)
            handlers.update(dict.fromkeys(chosen, guarded))
            if "GET" in chosen:
                handlers.setdefault("HEAD", guarded)
            protected = needs_token(handler, write, path)
            docs.append(RouteDoc(path, chosen, handler.__doc__ or "", write, protected))
    routes = [Route(path, dispatch(handlers), methods=list(handlers)) for path, handlers in by_path.items()]
    document = openapi_document(ctx.settings, docs)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        details: dict[str, Any] = {"path": request.url.path}
        if exc.status_code == 405 and exc.headers and "allow" in {k.lower() for k in exc.headers}:
            details["allowed"] = next(v for k, v in exc.headers.items() if k.lower() == "allow")
        elif exc.detail and exc.detail.lower() != message:
            details["detail"] = exc.detail
        response = error(exc.status_code, message, **details)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    async def on_redis_down(request: Request, exc: Exception) -> Response:
        log.warning(
            "admin %s %s: redis unavailable (%s)", request.method, request.url.path, type(exc).__name__
        )
        return error(503, "redis unavailable", detail="control state unavailable now; retry")

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.exception("admin handler failed: %s %s", request.method, request.url.path)
        return error(500, "internal error", detail=f"{type(exc).__name__} (see the proxy log)")

    on_error: dict[Any, Any] = {HTTPException: on_http_error, Exception: on_crash}
    on_error.update({kind: on_redis_down for kind in (RedisError, ConnectionError, TimeoutError)})
    app = Starlette(routes=routes, exception_handlers=on_error)
    return app


def dispatch(handlers: dict[str, Handler]) -> Handler:
    async def endpoint(request: Request) -> Response:
        return await handlers[request.method](request)

    return endpoint


async def json_body(request: Request, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.body()
    if not raw and allow_empty:
        return {}
    try:
        import orjson

        data = orjson.loads(raw)
    except ValueError as exc:
        raise HTTPException(400, "body must be a JSON object (it does not parse)") from exc
    if not isinstance(data, dict):
        raise HTTPException(400, "body must be a JSON object")
    return data


def unknown_group(group: str, known: list[str]) -> JSONResponse:
    """404, worded as the CLI's Redis path words it."""
    detail = f"{group!r}; known groups: {', '.join(known)}"
    return error(404, "unknown group", detail=detail, group=group, groups=known)


def here(request: Request) -> str:
    """This admin API's URL as the caller reached it (the prefix included)."""
    return str(request.base_url).rstrip("/")


async def status_document(ctx: AdminContext, url: str) -> dict[str, Any]:
    """The status view from this proxy: read from Redis like the CLI does, or, when this proxy
    cannot read Redis (its last refresh failed, or these reads do), what it serves from its last
    good snapshot (``redis_ok`` false). Bounded like a refresh: a frozen Redis never holds it."""
    import asyncio

    where = views.source(views.ADMIN_API, url)
    me = views.proxy_view(ctx.store, url)
    settings = ctx.settings
    if ctx.store.current.redis_ok:
        try:
            return await asyncio.wait_for(
                views.status_document(
                    ctx.control, settings.group_names, settings.default_percentage, where, me
                ),
                timeout=settings.redis_timeout_seconds * 2,
            )
        except (RedisError, OSError, TimeoutError):
            pass
    return views.snapshot_status_document(ctx.store, settings.group_names, where, me)


class PrefixMount:
    """Sets root_path to the admin prefix so the Starlette routes read ``/health``, not the full path."""

    def __init__(self, prefix: str, app: Any) -> None:
        self.prefix = prefix
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        child = dict(scope)
        child["root_path"] = scope.get("root_path", "") + self.prefix
        await self.app(child, receive, send)


class AdminOnly:
    """The admin API on its own port: only the prefix is served there, anything else is a JSON 404."""

    def __init__(self, prefix: str, admin: Any) -> None:
        self.prefix = prefix
        self.admin = admin

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":  # the main server owns the lifespan
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path == self.prefix or path.startswith(self.prefix + "/"):
            await self.admin(scope, receive, send)
            return
        detail = f"the admin API lives under {self.prefix}/"
        await json_answer(send, 404, {"error": "not found", "detail": detail})


class NotServedHere:
    """Stands in for the admin app on the main port when the admin API has its own port."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await json_answer(send, 404, {"error": "not found", "path": scope.get("path", "")})


async def json_answer(send: Any, status: int, payload: dict[str, Any]) -> None:
    import orjson

    body = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

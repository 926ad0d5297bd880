"""Composition root: builds the ASGI app from settings and owns every resource's lifetime.

Nothing is created at import time. The lifespan opens Redis, the control store, the upstream
pools and the capabilities' background components, and closes them in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from typing import Any

import redis.asyncio as aioredis

from proxy.admin import alerts as alerts_admin
from proxy.admin import canary as canary_admin
from proxy.admin import deprecations as deprecations_admin
from proxy.admin import shadow as shadow_admin
from proxy.admin.app import AdminContext, AdminOnly, NotServedHere, PrefixMount, build_admin
from proxy.background import Component, cancel_and_wait
from proxy.canary import capability as canary
from proxy.canary.rollout import Rollouts
from proxy.control.client import ControlClient
from proxy.control.connect import connect
from proxy.control.keys import Keys
from proxy.control.store import ControlStore
from proxy.metrics import Metrics
from proxy.parity import capability as parity
from proxy.parity.store import tables_behind
from proxy.settings import Settings
from proxy.shadow import capability as shadow
from proxy.traffic.deprecation import SECTION as DEPRECATIONS
from proxy.traffic.deprecation import DeprecationRules
from proxy.traffic.forward import ProxyApp, Receive, Scope, Send
from proxy.traffic.upstream import Upstream

log = logging.getLogger("strangler")


def redis_client(settings: Settings) -> aioredis.Redis:
    if not settings.redis_url:
        raise RuntimeError("redis_url must be resolved (embedded Redis started) before building the app")
    # plain, Sentinel (follows the master) or Cluster: proxy/control/connect.py
    return connect(
        settings.redis_url, settings.redis_timeout_seconds, retry_on_timeout=False, health_check_interval=5
    )


class Strangler:
    """The ASGI application: lifespan + admin + proxy.

    Built in dependency order: the snapshot's section parsers, then the control store that parses
    them, then each capability's parts with the store in hand, then the admin API and the proxy.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics = metrics or Metrics()
        self.redis = redis = redis_client(settings)
        self.keys = keys = Keys.for_settings(settings)
        rollouts = Rollouts(redis, keys)
        self.control = control = ControlClient(redis, keys, rollouts.manual_split)

        deprecations = DeprecationRules(settings.deprecations, metrics)
        sections = {
            **shadow.sections(settings),
            DEPRECATIONS: deprecations.parse,
            **parity.sections(metrics),
        }
        self.store = store = ControlStore(settings, redis, metrics, sections)

        self.shadow = shadow.build(settings, metrics, control, store)
        self.canary = canary.build(
            settings, metrics, control, rollouts,
            shadow_totals=self.shadow.report.group_totals,
            parity_behind=functools.partial(tables_behind, redis, keys),
        )  # fmt: skip

        self.upstreams = {
            version: Upstream(
                version, url, settings, on_drop=functools.partial(metrics.upstream_error, version)
            )
            for version, url in (("v1", settings.v1_url), ("v2", settings.v2_url))
        }
        self.admin_context = AdminContext(settings, store, metrics, redis, control)
        capability_routes = [
            *canary_admin.routes(self.canary.service),
            *alerts_admin.routes(self.canary.service, metrics),
            *deprecations_admin.routes(deprecations, store, control),
            *shadow_admin.routes(store, self.shadow.report, self.shadow.control, self.shadow.mirror),
        ]
        admin: Any = PrefixMount(settings.admin_prefix, build_admin(self.admin_context, capability_routes))
        # with admin_port the admin API is served only there (server.py runs a second server)
        self.admin_app: Any = None
        if settings.admin_port is not None:
            self.admin_app, admin = AdminOnly(settings.admin_prefix, admin), NotServedHere()
        self.proxy = ProxyApp(
            settings,
            store,
            self.upstreams,
            metrics,
            admin,
            recorders=self.canary.recorders,
            mirror=self.shadow.mirror,
            deprecations=deprecations,
        )
        # started in this order, stopped in reverse
        self._components: list[Component] = [*self.canary.components, self.shadow.mirror]
        self._started: list[Component] = []
        self._tally_flusher: asyncio.Task[None] | None = None
        self.announce_ready = True  # startup logs "strangler ready" (False: the caller does)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.proxy(scope, receive, send)

    async def startup(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()
        await self.store.start()
        for component in self._components:
            await component.start()
            self._started.append(component)
        if self.metrics.multiprocess:  # each worker's request metrics, for the others' scrapes
            self._tally_flusher = asyncio.create_task(self.metrics.run_tally_flusher())
        # Everything loaded so far (modules, settings, compiled rules) lives as long as the process:
        # move it out of the collector's reach so full collections stay short (tail latency).
        gc.collect()
        gc.freeze()
        # Requests allocate many short-lived containers; collecting every 700 of them costs more
        # than the rare cycles they form. A higher first threshold keeps the cost down.
        gc.set_threshold(20_000, 20, 20)
        if self.announce_ready:  # a supervised worker leaves it to its parent (all workers ready)
            log.info("%s", self.ready_line())
        if self.settings.admin_token is None:
            log.warning("no admin token: the admin API accepts no changes (strangler serve generates one)")

    def ready_line(self) -> str:
        snap = self.store.current
        redis = "ok" if snap.redis_ok else "unreachable (serving default split, retrying)"
        return (
            f"strangler ready: v1={self.settings.v1_url} v2={self.settings.v2_url} "
            f"split={snap.global_percentage}% redis={redis}"
        )

    async def shutdown(self) -> None:
        if self._tally_flusher is not None:
            await cancel_and_wait([self._tally_flusher])  # it flushes once more as it stops
            self._tally_flusher = None
        for component in reversed(self._started):
            with contextlib.suppress(Exception):
                await component.stop()
        self._started.clear()
        await self.store.stop()
        for upstream in self.upstreams.values():
            await upstream.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), 2.0)  # bounded: a stop never hangs on Redis

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # noqa: BLE001 - report to the server, which exits cleanly
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(settings: Settings, metrics: Metrics | None = None) -> Strangler:
    return Strangler(settings, metrics)


class EnvApp:
    """``proxy.app:app``: the same core as a plain ASGI app, for any ASGI server (granian or
    hypercorn for HTTP/2 and TLS, uvicorn). Settings come from the environment (``STRANGLER_*``,
    and ``STRANGLER_CONFIG`` for a YAML file); the app is built at the first event (the lifespan),
    not at import. Redis must be given (``STRANGLER_REDIS_URL``): no embedded one here."""

    def __init__(self) -> None:
        self._app: Strangler | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            import os

            from proxy.admin.token import ensure_admin_token
            from proxy.settings import ConfigError, load_settings

            try:
                settings = ensure_admin_token(load_settings(os.environ.get("STRANGLER_CONFIG")))
            except ConfigError as exc:
                if scope["type"] != "lifespan":
                    raise
                # the server's own one-line refusal to start (uvicorn: "ERROR: <message>", exit 3),
                # rather than a traceback through its lifespan
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"strangler: {exc}"})
                return
            self._app = create_app(settings)
        await self._app(scope, receive, send)


app = EnvApp()

"""``strangler demo``: v1, v2, an embedded Redis, the proxy and a light load, on one machine.

Everything but Redis runs in one event loop (two aiohttp backends, the proxy's uvicorn server
built with ``proxy.server.serve``, the traffic generator), so one Ctrl-C stops it all in order:
the load first, then the proxy (lifespan shutdown), then the backends, then Redis. Redis is the
embedded one, in a fresh temporary directory so each demo starts from a known split (10%).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxy.control.embedded import EmbeddedRedis
from proxy.demo.tasks import start_backend
from proxy.settings import Settings

log = logging.getLogger("strangler.demo")

START_PERCENTAGE = 10
DEMO_STEPS = [10, 25, 50, 100]
DEMO_WINDOW_SECONDS = 20
ROLLOUT_HINT = "strangler rollout start --group tasks --steps 10,25,50,100 --interval 20s"


@dataclass
class DemoOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    v1_port: int = 8001
    v2_port: int = 8002
    rate: float = 20.0  # requests per second from the generator (0 = no load)
    duration: float | None = None  # stop by itself after this many seconds (tests, CI)
    admin_token: str | None = None


def demo_settings(options: DemoOptions, v1_url: str, v2_url: str, redis_url: str) -> Settings:
    """The demo's configuration: shadow on, a deprecated and a retired endpoint, quick checks."""
    return Settings.model_validate(
        {
            "v1_url": v1_url,
            "v2_url": v2_url,
            "redis_url": redis_url,
            "host": options.host,
            "port": options.port,
            "log_level": "warning",
            "default_percentage": START_PERCENTAGE,
            "admin_token": options.admin_token,
            "routes": [{"name": "tasks", "patterns": ["/api/tasks", "/api/tasks/**"]}],
            "shadow": {"enabled": True, "sample_percentage": 100},
            # quick checks sized for the demo's load: at the default 20 req/s the tasks group
            # gets ~17 req/s, so a 10% step sees ~35 v2 requests per 20 s window (>= 20 needed)
            "canary": {
                "window_seconds": DEMO_WINDOW_SECONDS,
                "check_interval_seconds": 2,
                "steps": DEMO_STEPS,
                "step_interval_seconds": DEMO_WINDOW_SECONDS,
                "thresholds": {"min_requests": 20},
            },
            "deprecations": [
                {
                    "name": "tasks-v0",
                    "methods": ["GET"],
                    "pattern": "/api/v0/tasks",
                    "deprecated_at": "2025-01-01",
                    "sunset_at": "2099-01-01",
                    "migration_guide": "https://example.com/migrate/tasks-v0",
                    "replacement": "GET /api/tasks",
                },
                {
                    "name": "export-v0",
                    "methods": ["GET"],
                    "pattern": "/api/v0/export",
                    "deprecated_at": "2024-01-01",
                    "sunset_at": "2025-01-01",
                    "migration_guide": "https://example.com/migrate/export-v0",
                    "replacement": "GET /api/tasks?done=true",
                },
            ],
        }
    )


# (weight, method, path) - the mix a small tasks UI would send
TRAFFIC = [
    (40, "GET", "/api/tasks"),
    (30, "GET", "/api/tasks/{id}"),
    (8, "POST", "/api/tasks"),
    (8, "GET", "/api/tasks?done=false"),
    (5, "GET", "/api/stats"),
    (6, "GET", "/api/v0/tasks"),
    (3, "GET", "/api/v0/export"),
]


class TrafficGenerator:
    """A light, steady load from a few hundred pretend users (each keeps its X-User-ID)."""

    def __init__(self, base_url: str, rate: float) -> None:
        self.base_url = base_url
        self.rate = rate
        self.sent = 0
        self.by_version: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._weights = [w for w, _, _ in TRAFFIC]

    async def start(self) -> None:
        if self.rate > 0:
            self._task = asyncio.create_task(self._run(), name="strangler-demo-traffic")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pending: set[asyncio.Task[None]] = set()
            try:
                while True:
                    task = asyncio.create_task(self._one(session))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    await asyncio.sleep(random.expovariate(self.rate))
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        _, method, path = random.choices(TRAFFIC, weights=self._weights)[0]
        path = path.replace("{id}", str(random.randint(1, 8)))
        headers = {"X-User-ID": f"user-{random.randint(1, 300)}"}
        body = None
        if method == "POST":
            body = {"title": f"demo task {random.randint(1, 10**6)}", "owner": "demo"}
        try:
            async with session.request(method, self.base_url + path, json=body, headers=headers) as response:
                await response.read()
                self.sent += 1
                version = response.headers.get("X-API-Version", "proxy")
                self.by_version[version] = self.by_version.get(version, 0) + 1
                self.by_status[response.status] = self.by_status.get(response.status, 0) + 1
        except (TimeoutError, aiohttp.ClientError):
            self.by_status[0] = self.by_status.get(0, 0) + 1


def banner(settings: Settings, v1_url: str, v2_url: str, redis_url: str, proxy_url: str) -> str:
    admin = f"{proxy_url}{settings.admin_prefix}"
    # the token itself is never printed: generated ones are read from their file
    token_file = settings.admin_token_file.resolve()
    token = f"\n  export STRANGLER_ADMIN_TOKEN=$(cat {token_file})" if token_file.is_file() else ""
    return f"""
Strangler demo is running (Ctrl-C stops everything).

  proxy        {proxy_url}          try: curl -i {proxy_url}/api/tasks/1
  v1 backend   {v1_url}
  v2 backend   {v2_url}
  admin API    {admin}/status   (OpenAPI: {admin}/openapi.json)
  metrics      {admin}/metrics
  redis        {redis_url}

v2 starts with {START_PERCENTAGE}% of the traffic and every v1 request is mirrored to v2 (shadow).
v2 differs on purpose: GET /api/tasks/{{id}} renames owner -> assignee, tasks gain updated_at,
GET /api/stats is slower. GET /api/v0/tasks is deprecated (headers), /api/v0/export is gone (410).

In another terminal:
  export STRANGLER_REDIS_URL={redis_url}
  export STRANGLER_ADMIN_URL={admin}{token}
  strangler status   (--url {admin} is the same as the export above)
  strangler set 25
  strangler diffs
  {ROLLOUT_HINT}
  strangler rollout watch --group tasks
  strangler deprecations
  strangler rollback
""".rstrip()


async def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run until Ctrl-C (or ``options.duration``); returns what the generator saw."""
    from proxy.admin.token import ensure_admin_token
    from proxy.app import create_app
    from proxy.control.client import ControlClient
    from proxy.server import ServerGroup, serve

    workdir = Path(tempfile.mkdtemp(prefix="strangler-demo-"))
    redis = EmbeddedRedis(workdir / "redis")
    runners = []
    generator: TrafficGenerator | None = None
    group = ServerGroup()
    group.install_signal_handlers()
    try:
        redis_url = await asyncio.to_thread(redis.start)
        v1_runner, v1_port = await start_backend_anywhere("v1", options.host, options.v1_port)
        runners.append(v1_runner)
        v2_runner, v2_port = await start_backend_anywhere("v2", options.host, options.v2_port)
        runners.append(v2_runner)
        if options.port and not port_is_free(options.port, options.host):
            print(f"demo: port {options.port} is in use; the proxy takes a free port", flush=True)
            options = dataclasses.replace(options, port=0)
        v1_url, v2_url = f"http://{options.host}:{v1_port}", f"http://{options.host}:{v2_port}"
        settings = ensure_admin_token(demo_settings(options, v1_url, v2_url, redis_url))
        app = create_app(settings)
        await ControlClient(app.redis, app.keys).set_split(START_PERCENTAGE)
        proxy_task = asyncio.create_task(serve(settings, app, group), name="strangler-demo-proxy")
        main = await _wait_started(group, proxy_task)
        port = _bound_port(main) or options.port
        proxy_url = f"http://{options.host}:{port}"
        print(banner(settings, v1_url, v2_url, redis_url, proxy_url), flush=True)
        generator = TrafficGenerator(proxy_url, options.rate)
        await generator.start()
        deadline = None if options.duration is None else time.monotonic() + options.duration
        next_report = time.monotonic() + 10
        while not proxy_task.done():
            await asyncio.sleep(0.2)
            if group.stopping:
                await generator.stop()  # the load goes first, while the proxy drains
            now = time.monotonic()
            if deadline is not None and now >= deadline and not group.stopping:
                group.stop()  # once: a second stop() would force the exit
            if now >= next_report:
                next_report = now + 10
                seen = f"{generator.sent} requests, by version {generator.by_version}"
                print(f"demo traffic: {seen}", flush=True)
        await generator.stop()
        await proxy_task
        return {"sent": generator.sent, "by_version": generator.by_version, "by_status": generator.by_status}
    finally:
        if generator is not None:
            await generator.stop()
        for runner in reversed(runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await asyncio.to_thread(redis.stop)
        shutil.rmtree(workdir, ignore_errors=True)
        print("demo stopped: proxy, backends and Redis are down", flush=True)


async def start_backend_anywhere(version: str, host: str, port: int) -> tuple[Any, int]:
    """The backend on ``port``, or on a free port (said on one line) when that one is in use."""
    try:
        return await start_backend(version, host, port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or port == 0:
            raise
    print(f"demo: port {port} is in use; the {version} backend takes a free port", flush=True)
    return await start_backend(version, host, 0)


def port_is_free(port: int, host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def _wait_started(group: Any, proxy_task: asyncio.Task[None]) -> Any:
    while not proxy_task.done():
        if group.servers and group.servers[0].started:
            return group.servers[0]
        await asyncio.sleep(0.02)
    await proxy_task  # raises what made it stop
    raise RuntimeError("the proxy stopped during start-up")


def _bound_port(server: Any) -> int | None:
    for listener in getattr(server, "servers", []):
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    return None

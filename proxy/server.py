"""Running the proxy: resolve the embedded Redis, pick multiprocess metrics, hand over to uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import uvicorn
from pydantic import SecretStr

from proxy.admin.token import ensure_admin_token
from proxy.control.embedded import EmbeddedRedis
from proxy.settings import Settings
from proxy.traffic.guard import raise_open_file_limit

log = logging.getLogger("strangler")


class _DropCountedEvents(logging.Filter):
    """uvicorn logs an ERROR each time the proxy ends an answer early (a backend reset mid-body);
    those are counted in strangler_upstream_errors_total{kind="reset"}, and a log line per event
    would let a flaky backend flood the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ASGI callable returned without completing response")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("uvicorn.error").addFilter(_DropCountedEvents())


def settings_to_json(settings: Settings) -> str:
    """Resolved settings for worker processes, secrets included (only ever passed via environment)."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [reveal(v) for v in value]
        return value

    return json.dumps(reveal(settings.model_dump()), default=str)


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools plus our limits, header timeout and framing checks (see proxy/traffic/guard.py)
        http="proxy.traffic.guard:GuardedHttpToolsProtocol",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_keep_alive=max(1, round(settings.limits.keepalive_timeout_seconds)),
        # on SIGTERM: stop accepting, let requests in flight finish, but never hang a deploy
        timeout_graceful_shutdown=int(settings.drain_timeout_seconds),
        log_config=None,
        log_level=settings.log_level,
    )


def run(settings: Settings) -> None:
    """Blocking: serve until SIGINT/SIGTERM, then stop what we started."""
    configure_logging(settings.log_level)
    raise_open_file_limit()
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.embedded_redis_dir, settings.embedded_redis_port)
        url = embedded.start()
        settings = settings.model_copy(update={"redis_url": url})
        print(f"strangler: embedded Redis at {url} (data in {embedded.directory})", flush=True)
        hint = f"redis-cli -u {url} SET {settings.split_key} 10"
        print(f"strangler: change the split with `{hint}`", flush=True)
    if settings.admin_token is None:
        settings = ensure_admin_token(settings)
        print(f"strangler: admin token in {settings.admin_token_file} (the local CLI reads it)", flush=True)
    metrics_dir: str | None = None
    try:
        if settings.workers > 1:
            metrics_dir = tempfile.mkdtemp(prefix="strangler-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            os.environ["STRANGLER_RESOLVED_SETTINGS"] = settings_to_json(settings)
            config = uvicorn_config(settings, "proxy.app:create_app_from_env")
            config.factory = True
            config.workers = settings.workers
            from uvicorn.supervisors import Multiprocess

            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            from proxy.app import create_app

            app = create_app(settings)
            loop_factory = uvicorn_config(settings, app).get_loop_factory()
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(serve(settings, app))
    finally:
        if embedded is not None:
            embedded.stop()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its owner, so several can share one event loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ServerGroup:
    """Servers stopped together: first stop() is graceful, a second one forces the exit."""

    def __init__(self) -> None:
        self.servers: list[uvicorn.Server] = []
        self.stopping = False

    def stop(self) -> None:
        for server in self.servers:
            if self.stopping:
                server.force_exit = True
            server.should_exit = True
        self.stopping = True

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)


async def serve(settings: Settings, app: Any, group: ServerGroup | None = None) -> None:
    """Serve ``app`` (a Strangler) until stopped; with admin_port, the admin API on its own server.

    The main server owns the lifespan; the admin server starts once the main one is up and stops
    right after it. Signals go to ``group`` (our handlers, not uvicorn's), so a caller such as the
    demo can run other servers in the same loop and stop them all with one Ctrl-C.
    """
    own_signals = group is None
    group = group or ServerGroup()
    if own_signals:
        group.install_signal_handlers()
    main = QuietServer(uvicorn_config(settings, app))
    group.servers.append(main)
    main_task = asyncio.create_task(main.serve(), name="strangler-main-server")
    admin_app = getattr(app, "admin_app", None)
    if admin_app is None or settings.admin_port is None:
        await main_task
        return
    while not main.started and not main_task.done():
        await asyncio.sleep(0.02)
    admin: QuietServer | None = None
    admin_task: asyncio.Task[None] | None = None
    if main.started:
        config = uvicorn_config(settings, admin_app)
        config.port = settings.admin_port
        config.lifespan = "off"
        admin = QuietServer(config)
        group.servers.append(admin)
        admin_task = asyncio.create_task(admin.serve(), name="strangler-admin-server")
        log.info("admin API on its own port: http://%s:%s%s", settings.host, settings.admin_port,
                 settings.admin_prefix)  # fmt: skip
    try:
        await main_task
    finally:
        if admin is not None and admin_task is not None:
            admin.should_exit = True
            await admin_task

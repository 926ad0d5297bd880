"""Running the proxy: resolve the embedded Redis, pick multiprocess metrics, hand over to uvicorn."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from typing import Any

import uvicorn
from pydantic import SecretStr

from proxy.control.embedded import EmbeddedRedis
from proxy.settings import Settings

log = logging.getLogger("strangler")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
        http="httptools",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        proxy_headers=False,
        timeout_keep_alive=int(settings.limits.keepalive_timeout_seconds),
        log_config=None,
        log_level=settings.log_level,
    )


def run(settings: Settings) -> None:
    """Blocking: serve until SIGINT/SIGTERM, then stop what we started."""
    configure_logging(settings.log_level)
    embedded: EmbeddedRedis | None = None
    if not settings.redis_url:
        embedded = EmbeddedRedis(settings.embedded_redis_dir, settings.embedded_redis_port)
        url = embedded.start()
        settings = settings.model_copy(update={"redis_url": url})
        print(f"strangler: embedded Redis at {url} (data in {embedded.directory})", flush=True)
        print(f"strangler: change the split with `redis-cli -u {url} SET {settings.split_key} 10`", flush=True)
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

            config = uvicorn_config(settings, create_app(settings))
            uvicorn.Server(config).run()
    finally:
        if embedded is not None:
            embedded.stop()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)

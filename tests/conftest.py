"""Shared fixtures: a real redis-server per session, real v1/v2 backends, real proxies.

Session-scoped processes are shared for speed; tests that break them (kill Redis, stop a backend)
make their own through the factories below. A proxy runs in a thread of the test process unless
the test needs its process (``process=True``: signals, kill, memory, workers, embedded Redis).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from tests.support import Backend, ProxyProcess, ProxyThread, RedisServer

hypothesis_settings.register_profile("fast", max_examples=50, deadline=None)
hypothesis_settings.register_profile("deep", max_examples=2000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("strangler")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir / "redis").start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, emptied before each test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture()
def redis_factory(workdir: Path) -> Iterator[Callable[[], RedisServer]]:
    """A private Redis for tests that kill or freeze it."""
    made: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(workdir / f"redis-{len(made)}-{os.getpid()}").start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture(scope="session")
def backends(workdir: Path) -> Iterator[tuple[Backend, Backend]]:
    v1 = Backend("v1", workdir).start()
    v2 = Backend("v2", workdir).start()
    yield v1, v2
    v1.stop()
    v2.stop()


@pytest.fixture()
def v1v2(backends: tuple[Backend, Backend]) -> tuple[Backend, Backend]:
    """The shared backends with their behaviour reset."""
    for backend in backends:
        backend.control(delay_ms=0, error_rate=0, extra={}, noise=False, rename={})
    return backends


@pytest.fixture()
def backend_factory(workdir: Path) -> Iterator[Callable[[str], Backend]]:
    made: list[Backend] = []

    def make(name: str) -> Backend:
        backend = Backend(name, workdir).start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


@pytest.fixture()
def proxy_factory(workdir: Path) -> Iterator[Callable[..., ProxyProcess]]:
    """Start the proxy with the given settings (a dict as in the YAML file): in a thread, or as
    ``strangler serve`` with ``process=True`` (also implied by ``env``, ``workers`` > 1 and no
    ``redis_url``, which only a process has)."""
    made: list[ProxyProcess] = []

    def make(
        wait: bool = True, env: dict[str, str] | None = None, process: bool = False, **settings: Any
    ) -> ProxyProcess:
        settings.setdefault("log_level", "warning")
        settings.setdefault("poll_interval_seconds", 0.2)
        # every test proxy is strict: an impossible connection state or a second finish() raises
        settings["limits"] = {"strict_states": True, **settings.get("limits", {})}
        process = process or bool(env) or settings.get("workers", 1) > 1 or not settings.get("redis_url")
        if process:
            proxy: ProxyProcess = ProxyProcess(workdir / "proxies", settings, env)
        else:
            proxy = ProxyThread(workdir / "proxies", settings)
        made.append(proxy)  # stopped at teardown even when the start fails half-way
        return proxy.start(wait=wait)

    yield make
    for proxy in made:
        proxy.stop()


@pytest.fixture()
def start_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> Callable[..., ProxyProcess]:
    """``proxy_factory`` in front of the shared backends and the session Redis; settings override."""
    v1, v2 = v1v2

    def start(**settings: Any) -> ProxyProcess:
        return proxy_factory(**{"v1_url": v1.url, "v2_url": v2.url, "redis_url": redis_url, **settings})

    return start


@pytest.fixture()
def proxy(start_proxy: Callable[..., ProxyProcess]) -> ProxyProcess:
    """A proxy in front of the shared backends and the session Redis, default settings."""
    return start_proxy()

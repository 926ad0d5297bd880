"""One proxy process for the HTTP/2 hostile and conformance suites (its memory is measured, so
it runs as ``strangler serve``), in front of the session's backends. The cases only read its
counters (as deltas), so they share it; its Redis keys live under their own prefix."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backend, ProxyProcess, RedisServer, free_port

STALL_SECONDS = 1.0


@pytest.fixture(scope="package")
def h2_proxy(
    backends: tuple[Backend, Backend], redis_server: RedisServer, workdir: Path
) -> Iterator[ProxyProcess]:
    v1, v2 = backends
    settings = {
        "v1_url": v1.url,
        "v2_url": v2.url,
        "redis_url": redis_server.url,
        "split_key": "h2hostile:v2_traffic_percentage",
        "key_prefix": "h2hostile:",
        "log_level": "warning",
        "poll_interval_seconds": 0.2,
        "limits": {"strict_states": True},
        "http2": {"stall_timeout_seconds": STALL_SECONDS, "port": free_port()},
    }
    proxy = ProxyProcess(workdir / "h2hostile", settings).start()
    yield proxy
    proxy.stop()

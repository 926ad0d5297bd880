"""One proxy for the whole hostile suite, in front of recording raw servers (v1, v2, "other host").

Starting a proxy costs about a second; the cases only read and never change its state, so they
share it. Its Redis keys live under their own prefix so other suites' splits cannot leak in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.recorder import RecordingServer
from tests.support import ProxyProcess, RedisServer

MAX_BODY = 64 * 1024


@pytest.fixture(scope="package")
def recorders() -> Iterator[dict[str, RecordingServer]]:
    servers = {name: RecordingServer().start() for name in ("v1", "v2", "other")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="package")
def hostile_proxy(
    recorders: dict[str, RecordingServer], redis_server: RedisServer, workdir: Path
) -> Iterator[ProxyProcess]:
    settings = {
        "v1_url": recorders["v1"].url,
        "v2_url": recorders["v2"].url,
        "redis_url": redis_server.url,
        "split_key": "hostile:v2_traffic_percentage",
        "key_prefix": "hostile:",
        "log_level": "warning",
        "poll_interval_seconds": 0.2,
        "limits": {"max_body_bytes": MAX_BODY, "strict_states": True},
    }
    proxy = ProxyProcess(workdir / "hostile", settings).start()
    yield proxy
    proxy.stop()


@pytest.fixture()
def v1_recorder(recorders: dict[str, RecordingServer]) -> RecordingServer:
    """v1's recorder, emptied; the v2 and "other host" recorders are emptied too."""
    for server in recorders.values():
        server.clear()
    return recorders["v1"]

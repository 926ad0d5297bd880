"""A proxy shared by the read-only forwarding tests of this folder (saves a start per test).

Its keys live under their own prefix and split key: other tests' splits cannot leak in, so it
serves the default split (everything to v1) whatever ran before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backend, ProxyThread, RedisServer


@pytest.fixture(scope="module")
def shared_proxy(
    workdir: Path, backends: tuple[Backend, Backend], redis_server: RedisServer
) -> Iterator[ProxyThread]:
    v1, v2 = backends
    settings = {
        "v1_url": v1.url,
        "v2_url": v2.url,
        "redis_url": redis_server.url,
        "log_level": "warning",
        "key_prefix": "traffic-shared:",
        "split_key": "traffic-shared:split",
    }
    proxy = ProxyThread(workdir / "proxies", settings).start()
    yield proxy
    proxy.stop()

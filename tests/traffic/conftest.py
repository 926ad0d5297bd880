"""A proxy shared by the read-only forwarding tests of this folder (saves a process per test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Backend, ProxyProcess


@pytest.fixture(scope="module")
def shared_proxy(
    workdir: Path, backends: tuple[Backend, Backend], redis_server: object
) -> Iterator[ProxyProcess]:
    v1, v2 = backends
    proxy = ProxyProcess(
        workdir / "proxies",
        {"v1_url": v1.url, "v2_url": v2.url, "redis_url": redis_server.url, "log_level": "warning"},  # type: ignore[attr-defined]
    ).start()
    yield proxy
    proxy.stop()

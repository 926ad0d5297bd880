"""Proxies on a Sentinel-managed Redis (1 master, 1 replica, 3 sentinels): killing the master fails
no client request, a change made after the failover reaches every proxy, and a rollback issued
while there is no master is served at once and written when the new master is elected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.control.client import ControlClient
from proxy.control.connect import connect
from proxy.control.keys import Keys
from tests.canary.helpers import Traffic
from tests.ha import SentinelSetup
from tests.support import Backend, ProxyProcess, wait_until

pytestmark = [pytest.mark.failover, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture()
def sentinel(tmp_path: Path) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path / "sentinel").start()
    yield setup
    setup.stop()


def set_split(url: str, value: float) -> None:
    """What `strangler set` does (same client code), against the Sentinel URL."""

    async def go() -> None:
        client = connect(url, 2)
        try:
            await ControlClient(client, Keys()).set_split(value)
        finally:
            await client.aclose()

    asyncio.run(go())


def served(proxy: ProxyProcess, user: str = "u-1") -> str:
    answer = httpx.get(proxy.url + "/t", headers={"X-User-ID": user}, timeout=5)
    assert answer.status_code == 200
    return answer.headers["x-api-version"]


def fleet(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], url: str, **extra: Any
) -> list[ProxyProcess]:
    v1, v2 = v1v2
    return [
        proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=url, redis_timeout_seconds=0.3, **extra)
        for _ in range(2)
    ]


def test_killing_the_master_fails_no_request_and_a_later_change_reaches_every_proxy(
    sentinel: SentinelSetup, proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend]
) -> None:
    proxies = fleet(proxy_factory, v1v2, sentinel.url)
    set_split(sentinel.url, 0)
    wait_until(lambda: all(served(p) == "v1" for p in proxies), timeout=5)
    old = sentinel.master_port()
    with Traffic([p.url for p in proxies], concurrency=4) as traffic:
        time.sleep(0.5)
        sentinel.master.kill()
        elected = sentinel.wait_failover(old)
        set_split(sentinel.url, 100)  # `strangler set 100` right after the new master is elected
        applied: dict[int, float] = {}

        def everywhere() -> bool:
            for proxy in proxies:
                if proxy.port not in applied and served(proxy) == "v2":
                    applied[proxy.port] = time.monotonic() - elected
            return len(applied) == len(proxies)

        wait_until(everywhere, timeout=10, interval=0.02, message="the change never reached every proxy")
        time.sleep(0.5)
    sent = sum(traffic.statuses.values())
    took = sorted(round(v, 3) for v in applied.values())
    print(f"sentinel failover: {sent} requests, {traffic.failures} failed, {dict(traffic.statuses)}; "
          f"change applied {took} s after the new master")  # fmt: skip
    assert traffic.failures == 0 and set(traffic.statuses) == {200}, traffic.statuses
    assert sent > 50
    assert max(applied.values()) < 2.0, applied


def test_a_rollback_during_the_failover_window_is_applied_here_at_once_and_written_later(
    sentinel: SentinelSetup, proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend]
) -> None:
    proxies = fleet(proxy_factory, v1v2, sentinel.url)
    set_split(sentinel.url, 100)
    wait_until(lambda: all(served(p) == "v2" for p in proxies), timeout=5)
    old = sentinel.master_port()
    sentinel.master.kill()
    # no master until the sentinels agree (down-after 1 s + election): roll back now
    answer = httpx.post(proxies[0].admin + "/rollback", json={}, headers=proxies[0].auth, timeout=10)
    assert answer.status_code == 202, answer.text
    assert answer.json()["pending"] is True
    assert served(proxies[0]) == "v1"  # in force on this proxy at once
    assert sentinel.master_port() == old  # really inside the window: nobody promoted yet
    elected = sentinel.wait_failover(old)
    wait_until(lambda: served(proxies[1]) == "v1", timeout=10, message="the rollback never reached proxy 2")
    reached = time.monotonic() - elected
    value = sentinel.current_master().client().get("feature:v2_traffic_percentage")
    print(f"rollback during failover: written and at the other proxy {reached:.2f} s after the new master")
    assert value == b"0"
    assert served(proxies[0]) == "v1"  # and it stays: the refresh from the new master agrees

"""A rollback through the admin API (or the CLI using it) while Redis is down: 202, 0% on that proxy
at once, held over what Redis says when it returns, then written there. (That the other proxies
then follow is shown against Sentinel in test_sentinel.py.)"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.clirun import strangler
from tests.support import Backend, ProxyProcess, RedisServer, wait_until


def served(proxy: ProxyProcess) -> str:
    return httpx.get(proxy.url + "/t", headers={"X-User-ID": "u-1"}, timeout=5).headers["x-api-version"]


def test_a_rollback_redis_cannot_take_is_served_now_and_written_when_it_returns(
    redis_factory: Callable[[], RedisServer], proxy_factory: Callable[..., ProxyProcess],
    v1v2: tuple[Backend, Backend],
) -> None:  # fmt: skip
    redis = redis_factory()
    v1, v2 = v1v2
    proxies = [
        proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis.url, redis_timeout_seconds=0.3)
        for _ in range(2)
    ]
    client = redis.client()
    client.set("feature:v2_traffic_percentage", "100")
    client.publish("strangler:changes", "split:default")
    wait_until(lambda: all(served(p) == "v2" for p in proxies), timeout=5)
    redis.kill()
    answer = httpx.post(proxies[0].admin + "/rollback", json={}, headers=proxies[0].auth, timeout=10)
    assert answer.status_code == 202 and answer.json()["pending"] is True, answer.text
    assert served(proxies[0]) == "v1"  # at once, on the proxy that took it
    assert served(proxies[1]) == "v2"  # the other one has not heard of it: Redis is down
    env = {"STRANGLER_ADMIN_URL": proxies[1].admin, "STRANGLER_ADMIN_TOKEN": proxies[1].token}
    cli = strangler("rollback", env=env)
    assert cli.returncode == 0, cli.stderr
    assert "accepted" in cli.stdout and "unreachable" in cli.stdout
    assert served(proxies[1]) == "v1"  # the CLI through the admin API: the same, on that proxy
    redis.start()  # same port, no data: the proxies write their snapshot back, then the rollback lands
    split = "feature:v2_traffic_percentage"
    wait_until(lambda: client.get(split) == "0", timeout=10, message="the rollback was never written")
    assert all(served(p) == "v1" for p in proxies)  # and it stays so once Redis has it
    for proxy in proxies:
        wait_until(lambda p=proxy: "rollback of * written to Redis" in p.output(), timeout=5)

"""Redis is beside the request path, not on it: killing or freezing it must cost no request."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import httpx

from tests.faults.load import Load, established_to, requests_total
from tests.support import Backend, ProxyProcess, RedisServer, wait_until

SPLIT = "feature:v2_traffic_percentage"


def test_redis_killed_and_restarted_costs_no_request(
    proxy_factory: Callable[..., ProxyProcess],
    redis_factory: Callable[[], RedisServer],
    v1v2: tuple[Backend, Backend],
) -> None:
    v1, v2 = v1v2
    redis = redis_factory()
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis.url, redis_timeout_seconds=0.3)
    served_before = requests_total(proxy, code="200")
    with Load(proxy.url + "/echo", workers=4, seconds=3.0) as load:
        time.sleep(0.6)
        redis.kill()
        wait_until(lambda: proxy.metric("strangler_redis_up") == 0, timeout=5, message="proxy saw Redis down")
        time.sleep(0.5)
        redis.start()  # same port
    assert load.outcomes, "no load ran"
    assert load.failures() == []
    assert {o.version for o in load.outcomes} == {"v1"}
    # every answer is counted exactly once
    assert requests_total(proxy, code="200") - served_before == len(load.outcomes)
    assert proxy.metric("strangler_control_redis_errors_total") >= 1
    # a change made after the restart is picked up (pub/sub re-subscribes or the poll sees it)
    client = redis.client()
    client.set(SPLIT, "100")
    wait_until(lambda: httpx.get(proxy.url + "/echo").headers["x-api-version"] == "v2", timeout=10,
               message="split change after Redis restart")  # fmt: skip
    wait_until(lambda: proxy.metric("strangler_redis_up") == 1, timeout=5)
    client.close()
    assert established_to(proxy, v1.port) <= 4


def test_redis_frozen_does_not_slow_the_hot_path(
    proxy_factory: Callable[..., ProxyProcess],
    redis_factory: Callable[[], RedisServer],
    v1v2: tuple[Backend, Backend],
) -> None:
    """SIGSTOP keeps Redis' sockets open but silent: the worst case for a client that waits. With a
    2 s Redis timeout, a hot path that touched Redis would take >= 2 s per request while frozen."""
    v1, v2 = v1v2
    redis = redis_factory()
    redis.client().set(SPLIT, "50")
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis.url, redis_timeout_seconds=2.0)
    wait_until(lambda: proxy.metric("strangler_split_percentage", group="default") == 50, timeout=5)
    served_before = requests_total(proxy)
    with Load(proxy.url + "/echo", workers=4, seconds=4.0) as load:
        time.sleep(0.5)
        redis.freeze()
        frozen_at = time.monotonic()
        time.sleep(3.0)
        thawed_at = time.monotonic()
        redis.thaw()
    during = load.between(frozen_at, thawed_at)
    assert load.failures() == []
    assert len(during) >= 10, f"only {len(during)} requests completed while Redis was frozen"
    assert statistics.median(o.seconds for o in during) < 0.5
    # the split in force stayed the last good one (both versions kept answering)
    assert {o.version for o in during} == {"v1", "v2"}
    assert requests_total(proxy) - served_before == len(load.outcomes)
    wait_until(lambda: proxy.metric("strangler_redis_up") == 1, timeout=10, message="Redis seen again")

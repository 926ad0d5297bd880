"""Redis outages: start without Redis, the all_v1 policy, and the staleness gauge."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support import ProxyProcess, RedisServer, versions_by_user, wait_until

KEY = "feature:v2_traffic_percentage"


def versions(proxy: ProxyProcess, n: int = 40) -> set[str]:
    return set(versions_by_user(proxy, range(n)).values())


def test_starts_without_redis_on_the_default_and_picks_it_up_later(
    start_proxy: Callable[..., ProxyProcess],
    redis_factory: Callable[[], RedisServer],
) -> None:
    redis = redis_factory()
    redis.kill()
    proxy = start_proxy(redis_url=redis.url, default_percentage=100)
    assert versions(proxy) == {"v2"}  # serving on the configured default
    ready = httpx.get(proxy.admin + "/ready").json()
    assert ready["redis_ok"] is False
    assert proxy.metric("strangler_redis_up") == 0

    redis.start()
    redis.client().set(KEY, "0")
    wait_until(lambda: versions(proxy, 10) == {"v1"}, timeout=5)
    assert proxy.metric("strangler_redis_up") == 1


def test_all_v1_policy_sends_everything_to_v1_while_redis_is_down(
    start_proxy: Callable[..., ProxyProcess],
    redis_factory: Callable[[], RedisServer],
) -> None:
    redis = redis_factory()
    redis.client().set(KEY, "100")
    proxy = start_proxy(redis_url=redis.url, redis_down_policy="all_v1")
    assert versions(proxy) == {"v2"}
    redis.kill()
    wait_until(lambda: versions(proxy, 10) == {"v1"}, timeout=5)
    age = wait_until(lambda: proxy.metric("strangler_snapshot_age_seconds") > 1.0, timeout=5)
    assert age
    redis.start()
    redis.client().set(KEY, "100")
    wait_until(lambda: versions(proxy, 10) == {"v2"}, timeout=5)


def test_keep_last_policy_keeps_the_split_while_redis_is_down(
    start_proxy: Callable[..., ProxyProcess],
    redis_factory: Callable[[], RedisServer],
) -> None:
    redis = redis_factory()
    redis.client().set(KEY, "100")
    proxy = start_proxy(redis_url=redis.url)
    redis.kill()
    wait_until(lambda: proxy.metric("strangler_redis_up") == 0, timeout=5)
    assert versions(proxy) == {"v2"}
    body = httpx.get(proxy.admin + "/ready").json()
    assert body["ready"] is True and body["redis_ok"] is False

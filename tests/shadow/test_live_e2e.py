"""The primary and live control: mirroring a slow v2 never holds the client, and the
CLI changes sampling and ignore rules on a running proxy."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import redis

from tests.shadow.helpers import cli, in_force, row, start_shadow_proxy, wait_row
from tests.support import Backend, ProxyProcess, wait_refreshed, wait_until


def test_a_slow_v2_mirrored_at_100_percent_never_holds_the_client(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    """Mirroring is off the client's path, asserted as an order of events, not a timing threshold:
    v2 takes 3 s, and all 30 sequential requests are answered by v1 while v2 has answered none of
    their mirrored copies (a client held by the mirror would see each comparison end before its
    next answer). Then every copy is compared, none dropped, each about 3 s slower than v1."""
    v1, v2 = v1v2
    v1.control(delay_ms=20)
    v2.control(delay_ms=3000)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, enabled=True, process=True)
    delta = "strangler_shadow_latency_delta_seconds_count"
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(30):
            response = client.get(f"/api/latency/{i}")
            assert response.status_code == 200 and response.headers["x-api-version"] == "v1"
        assert proxy.metric(delta) == 0, "a mirrored copy finished before the client's answers"
    wait_until(lambda: proxy.metric(delta) == 30, timeout=30, message="30 comparisons")
    assert proxy.metric("strangler_shadow_requests_total", outcome="sent") == 30
    assert proxy.metric("strangler_shadow_requests_total", outcome="dropped") == 0
    # (a histogram with negative buckets has no _sum: read the buckets) v2 about 3 s slower
    assert proxy.metric("strangler_shadow_latency_delta_seconds_bucket", le="1.0") == 0
    assert proxy.metric("strangler_shadow_latency_delta_seconds_bucket", le="5.0") == 30


def price_rule_in_force(proxy: ProxyProcess) -> bool:
    rules = httpx.get(proxy.admin + "/shadow", timeout=5).json()["rules_in_force"]
    return any(rule["value"] == "root['price']" for rule in rules)


def test_cli_changes_sampling_and_ignore_rules_on_a_running_proxy(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v1.control(extra={"price": 10, "updated": 1})
    v2.control(extra={"price": 12, "updated": 1})
    # one mirror worker: mirrored requests are sent in the order they came (a marker proves it)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, concurrency=1)
    endpoint = "GET /api/prices/{id}"

    def burst(n: int = 5) -> None:
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for i in range(n):
                assert client.get(f"/api/prices/{i}").status_code == 200

    burst()
    assert wait_row(proxy, endpoint, compared=5)["mismatched"] == 5

    # sampling to 0: nothing more is mirrored; back to 100: mirrored again, no restart
    cli(proxy, "shadow", "set", "--sample", "0")
    wait_until(lambda: in_force(proxy)["sample_percentage"] == 0, timeout=5, message="sample 0")
    burst()
    cli(proxy, "shadow", "set", "--sample", "100")
    wait_until(lambda: in_force(proxy)["sample_percentage"] == 100, timeout=5, message="sample 100")
    # a marker mirrored now is sent after anything (wrongly) queued by the burst at 0%
    assert httpx.get(proxy.url + "/api/marker/1", timeout=10).status_code == 200
    wait_row(proxy, "GET /api/marker/{id}", compared=1)
    assert proxy.metric("strangler_shadow_requests_total", outcome="sent") == 6  # 5 + the marker

    # an ignore rule for the differing field: later comparisons match
    cli(proxy, "shadow", "ignore", "add", "--path", "root['price']", "--endpoint", endpoint)
    assert "root['price']" in cli(proxy, "shadow", "ignore", "list")
    wait_until(lambda: price_rule_in_force(proxy), timeout=5, message="rule in force")
    burst()
    prices = wait_row(proxy, endpoint, compared=10)
    assert (prices["mismatched"], prices["matched"]) == (5, 5)
    cli(proxy, "shadow", "ignore", "remove", "--path", "root['price']", "--endpoint", endpoint)
    wait_until(lambda: not price_rule_in_force(proxy), timeout=5, message="rule removed")
    burst()
    prices = wait_row(proxy, endpoint, compared=15)
    assert (prices["mismatched"], prices["matched"]) == (10, 5)

    # a bad value written straight into Redis is rejected; the last good one stays in force
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.hset("strangler:shadow", "sample_percentage", "abc")
    client.publish("strangler:changes", "shadow")
    client.close()
    wait_refreshed(proxy)  # it has read the bad value
    assert in_force(proxy)["sample_percentage"] == 100
    status = json.loads(cli(proxy, "shadow", "status", "--json"))
    assert any("sample_percentage" in problem for problem in status["problems"])

    # the report through the CLI, then reset
    report = json.loads(cli(proxy, "diffs", "--json"))
    assert report["endpoints"][0]["endpoint"] == endpoint
    one = json.loads(cli(proxy, "diffs", endpoint, "--json"))
    assert one["fields"] == {"root['price']": 10}
    assert "Shadow diffs" in cli(proxy, "diffs")
    text = cli(proxy, "diffs", endpoint)
    assert "/api/prices/{id}" in text and "root['price']" in text and "10 -> 12" in text
    cli(proxy, "diffs", "--reset")
    assert row(proxy, endpoint) is None

"""Metric names and labels our users' dashboards query, with values matching the traffic sent."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support import ProxyProcess, RedisServer, metric_value, wait_until


def send_known_traffic(proxy: ProxyProcess) -> None:
    with httpx.Client(base_url=proxy.url) as client:
        for i in range(30):
            client.get("/", headers={"X-Strangler-Version": "v1", "X-User-ID": str(i)})
        for _ in range(12):
            client.post("/echo", content=b"x", headers={"X-Strangler-Version": "v2"})
        for _ in range(5):
            client.get("/status/503", headers={"X-Strangler-Version": "v2"})
        for _ in range(3):
            client.get("/status/404", headers={"X-Strangler-Version": "v1"})


def check_values(text: str) -> None:
    assert metric_value(text, "http_requests_total", version="v1", method="GET", code="200") == 30
    assert metric_value(text, "http_requests_total", version="v2", method="POST", code="200") == 12
    assert metric_value(text, "http_requests_total", version="v2", method="GET", code="503") == 5
    assert metric_value(text, "http_requests_total", version="v1", method="GET", code="404") == 3
    assert metric_value(text, "http_errors_total", version="v2") == 5
    assert metric_value(text, "http_errors_total", version="v1") == 0
    assert metric_value(text, "http_request_duration_seconds_count", version="v1") == 33
    assert metric_value(text, "http_request_duration_seconds_count", version="v2") == 17
    assert metric_value(text, "http_request_duration_seconds_bucket", version="v1", le="+Inf") == 33
    assert metric_value(text, "strangler_group_requests_total", group="default", version="v2") == 17


def test_metrics_names_labels_and_values(
    start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer
) -> None:
    redis_server.client().set("feature:v2_traffic_percentage", "12.5")
    proxy = start_proxy()
    send_known_traffic(proxy)
    text = proxy.metrics()
    check_values(text)
    buckets = {
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("http_request_duration_seconds_bucket{") and 'version="v1"' in line
    }
    assert {"0.0005", "0.001", "10.0", "+Inf"} <= buckets
    assert metric_value(text, "strangler_split_percentage", group="default") == 12.5
    assert metric_value(text, "strangler_redis_up") == 1
    wait_until(lambda: 0 <= proxy.metric("strangler_snapshot_age_seconds") < 5, timeout=3)
    for name in (
        "strangler_fallbacks_total",
        "strangler_upstream_errors_total",
        "strangler_invalid_control_values_total",
        "strangler_snapshot_age_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_metrics_add_up_across_workers(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(workers=2)
    # new connections per request so both workers take a share
    send_known_traffic(proxy)
    check_values(proxy.metrics())

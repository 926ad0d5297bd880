"""Metric names and labels our users' dashboards query, with values matching the traffic sent."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from proxy.metrics import Metrics
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
    """Each worker keeps its request metrics as plain tallies and writes them to a file of its own
    every 0.5 s; a scrape sums every worker's, so the other worker's share may lag that long."""
    proxy = start_proxy(workers=2)
    # new connections per request so both workers take a share
    send_known_traffic(proxy)

    def adds_up() -> bool:
        check_values(proxy.metrics())
        return True

    wait_until(adds_up, timeout=5, message="both workers' request metrics in one scrape")


def test_a_scrape_sums_every_workers_tally_file_and_skips_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What one worker's scrape reads: its own tallies live, the others' last files (a worker that
    died keeps its counts), and a file it cannot read is skipped, never a failed scrape."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    other, this = Metrics(), Metrics()
    for _ in range(4):
        other.request_done("default", "v2", "GET", 500, 0.02)
    other.flush_tallies()
    # as written by a worker that has since died (another pid than this scraping one)
    (tmp_path / f"strangler_tallies_{os.getpid()}.json").rename(tmp_path / "strangler_tallies_1.json")
    (tmp_path / "strangler_tallies_2.json").write_text("[[1, 2")  # cut short
    (tmp_path / "strangler_tallies_3.json").write_text('[["default", "v1", "GET", 200, 1]]')  # bad width
    this.request_done("default", "v1", "GET", 200, 0.001)
    text = this.render().decode()
    assert metric_value(text, "http_requests_total", version="v2", method="GET", code="500") == 4
    assert metric_value(text, "http_requests_total", version="v1", method="GET", code="200") == 1
    assert metric_value(text, "http_errors_total", version="v2") == 4
    assert metric_value(text, "http_request_duration_seconds_count", version="v1") == 1

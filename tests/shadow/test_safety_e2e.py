"""What mirroring must never do: mirror writes unasked, swallow skips silently, or hurt the primary."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

import httpx

from tests.shadow.helpers import (
    cli,
    detail,
    in_force,
    shadow_entries,
    start_shadow_proxy,
    summary,
    wait_row,
)
from tests.support import Backend, ProxyProcess, free_port, metric_value, wait_until

ORDERS = [{"name": "orders", "patterns": ["/echo/orders/**"]}, {"name": "uploads", "patterns": ["/upload"]}]


def test_post_is_mirrored_only_when_its_group_opts_in(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v2.log(clear=True)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, routes=ORDERS)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/echo/orders/1", json={"n": 1}).json()["version"] == "v1"
        assert client.post("/echo/other", json={"n": 2}).json()["version"] == "v1"
        assert client.get("/echo/orders/1").status_code == 200
    wait_until(lambda: len(shadow_entries(v2)) == 1, timeout=10, message="the GET is mirrored")
    assert [e["method"] for e in shadow_entries(v2)] == ["GET"]
    assert proxy.metric("strangler_shadow_requests_total", group="orders", outcome="skipped_method") == 1
    assert proxy.metric("strangler_shadow_requests_total", group="default", outcome="skipped_method") == 1

    # the "shadow write" phase for one group, live: other groups still never mirror writes
    cli(proxy, "shadow", "set", "--methods", "GET,POST", "--group", "orders")
    wait_until(lambda: "POST" in in_force(proxy, "orders")["methods"], timeout=5, message="live methods")
    assert in_force(proxy, "default")["methods"] == ["GET", "HEAD", "OPTIONS"]
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        assert client.post("/echo/orders/2", json={"n": 3}).status_code == 200
        assert client.post("/echo/other", json={"n": 4}).status_code == 200
    wait_until(lambda: len(shadow_entries(v2)) == 2, timeout=10, message="the POST is mirrored")
    post = shadow_entries(v2)[-1]
    assert (post["method"], post["raw_path"], post["body"]) == ("POST", "/echo/orders/2", '{"n":3}')
    assert proxy.metric("strangler_shadow_requests_total", group="default", outcome="skipped_method") == 2


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        part = min(size, total - sent)
        yield b"z" * part
        sent += part


def test_a_5_mib_body_is_not_mirrored_and_is_counted_as_skipped(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, routes=ORDERS,
                               groups={"uploads": {"methods": ["POST"]}})  # fmt: skip
    body = b"a" * (5 * 1024 * 1024)
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        sized = client.post("/upload", content=body)
        # no Content-Length: found to be too large only while streaming it up
        chunked = client.post("/upload", content=_chunks(len(body)))
        small = client.post("/upload", content=b"small")
    for response in (sized, chunked):
        assert response.status_code == 200
        assert response.json()["length"] == len(body) and response.json()["version"] == "v1"
    assert chunked.json()["chunked"] is True
    assert small.status_code == 200

    def uploads(outcome: str) -> float:
        return proxy.metric("strangler_shadow_requests_total", group="uploads", outcome=outcome)

    # (a streamed body is found too large after the answer went out: poll)
    wait_until(lambda: uploads("skipped_size") == 2, timeout=5, message="both large bodies counted")
    wait_until(lambda: uploads("sent") == 1, timeout=10, message="the small body is mirrored")

    def reported() -> bool:
        groups = summary(proxy)["groups"].get("uploads", {})
        return groups.get("skipped_size") == 2 and groups.get("sent") == 1

    wait_until(reported, timeout=5, message="the report counts them too (all replicas)")
    assert cli(proxy, "diffs").count("uploads") >= 1


def test_v2_down_means_shadow_errors_and_no_client_effect(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, _ = v1v2
    dead_v2 = f"http://127.0.0.1:{free_port()}"
    proxy = start_shadow_proxy(proxy_factory, v1, dead_v2, redis_url)
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(10):
            response = client.get(f"/api/users/{i}")
            assert response.status_code == 200 and response.json()["version"] == "v1"
    users = wait_row(proxy, "GET /api/users/{id}", errors=10)
    assert (users["errors"], users["compared"], users["mismatched"]) == (10, 0, 0)
    assert proxy.metric("strangler_shadow_requests_total", outcome="error") == 10
    sample = detail(proxy, "GET /api/users/{id}")["samples"][0]
    assert sample["result"] == "error" and sample["detail"].startswith("connect")
    assert proxy.metric("http_requests_total", version="v1", code="200") == 10


def test_queue_full_drops_are_counted_and_primaries_unaffected(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v2.control(delay_ms=1000)
    proxy = start_shadow_proxy(proxy_factory, v1, v2, redis_url, queue_size=1, concurrency=1)
    total = 24

    def one(i: int) -> tuple[int, str]:
        response = httpx.get(f"{proxy.url}/api/burst/{i}", timeout=10)
        return response.status_code, response.json()["version"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(total)))
    assert answers == [(200, "v1")] * total

    def outcomes() -> tuple[float, float]:
        text = proxy.metrics()
        return (metric_value(text, "strangler_shadow_requests_total", outcome="sent"),
                metric_value(text, "strangler_shadow_requests_total", outcome="dropped"))  # fmt: skip

    # (submit runs just after each answer went out, and a sent request waits 1 s for v2: poll)
    wait_until(lambda: sum(outcomes()) == total, timeout=15, message="every request either sent or dropped")
    sent, dropped = outcomes()
    assert dropped >= total - 8, f"one in flight and one queued per second of v2 delay; sent {sent}"
    wait_until(lambda: summary(proxy)["groups"].get("default", {}).get("dropped") == dropped, timeout=5)

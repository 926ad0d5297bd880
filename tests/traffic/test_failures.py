"""Upstream failures: fallback to v1, 502/504 with JSON, resets never passed off as complete."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest

from tests.support import Backend, ProxyProcess, RedisServer, free_port


def test_v2_down_falls_back_to_v1_and_both_down_is_502(
    proxy_factory: Callable[..., ProxyProcess],
    backend_factory: Callable[[str], Backend],
    redis_server: RedisServer,
    redis_url: str,
) -> None:
    v1 = backend_factory("v1")
    v2 = backend_factory("v2")
    redis_server.client().set("feature:v2_traffic_percentage", "100")
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url)
    assert httpx.get(proxy.url + "/").headers["x-api-version"] == "v2"

    v2.stop()
    for i in range(20):
        response = httpx.post(proxy.url + "/echo", content=b"payload-%d" % i, headers={"X-User-ID": str(i)})
        assert response.status_code == 200
        assert response.headers["x-api-version"] == "v1"
        assert response.json()["body"] == f"payload-{i}"
    assert proxy.metric("strangler_fallbacks_total", group="default") == 20
    assert proxy.metric("strangler_upstream_errors_total", version="v2", kind="connect") == 20

    v1.stop()
    response = httpx.get(proxy.url + "/")
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "upstream unavailable"
    assert body["version"] == "v1"
    assert "cannot connect" in body["detail"]
    assert proxy.metric("http_errors_total", version="v1") == 1
    assert proxy.metric("http_requests_total", version="v1", code="502") == 1


def test_fallback_can_be_turned_off(start_proxy: Callable[..., ProxyProcess]) -> None:
    dead_port = free_port()  # bound then released: nothing listens
    proxy = start_proxy(v2_url=f"http://127.0.0.1:{dead_port}", fallback_to_v1=False)
    response = httpx.get(proxy.url + "/", headers={"X-Strangler-Version": "v2"})
    assert response.status_code == 502
    assert response.json()["version"] == "v2"


def test_slow_backend_is_a_504(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(read_timeout_seconds=0.3)
    response = httpx.get(proxy.url + "/slow?ms=2000", timeout=10)
    assert response.status_code == 504
    assert response.json() == {"error": "upstream timeout", "version": "v1", "detail": "read timeout"}
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="timeout") == 1
    assert httpx.get(proxy.url + "/slow?ms=10").status_code == 200


def test_reset_mid_answer_closes_the_client_connection(shared_proxy: ProxyProcess) -> None:
    """The backend promises 100000 bytes and dies after 1000: the client must see a short read."""
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(shared_proxy.url + "/reset")
    with socket.create_connection(("127.0.0.1", shared_proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length: 100000" in head.lower()
    assert len(body) < 100000  # closed, not padded or completed
    assert shared_proxy.metric("strangler_upstream_errors_total", kind="reset") >= 2

"""One request lifecycle. What a request is routed by (force and user-key headers,
deprecation on the path a servlet backend routes), the one fallback rule (v2 unreachable with
nothing sent -> v1, whatever the body size, for HTTP and WebSocket alike) and the one ``finish``
that records it (the same accounting on every path; a slow client never counted as the version's
error)."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.sync.client import connect

from tests.support import Backend, ProxyProcess, RedisServer, free_port, wait_until
from tests.wsbackend import WsBackend


@pytest.fixture()
def blackhole() -> Iterator[str]:
    """A v2 whose connects time out: a listener with a full accept queue that never accepts
    (the kernel drops further SYNs), so the proxy's connect attempt ends in its connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    for filler in fillers:
        filler.close()
    listener.close()


def windows(redis_server: RedisServer, prefix: str, version: str) -> tuple[int, int]:
    """(requests, errors) the canary windows hold for ``version`` of the default group."""
    client = redis_server.client()
    requests = errors = 0
    for key in client.scan_iter(f"{prefix}win:default:{version}:*"):
        fields = client.hgetall(key)
        requests += int(fields.get("r", 0))
        errors += int(fields.get("e", 0))
    return requests, errors


def accounting(proxy: ProxyProcess, redis_server: RedisServer, prefix: str) -> dict[str, object]:
    """What a fallback from v2 (connect timeout) to v1 left in the metrics and canary windows."""
    wait_until(lambda: windows(redis_server, prefix, "v2")[0] >= 1, timeout=5)
    time.sleep(0.5)  # a few more flushes: whatever else was recorded has arrived
    return {
        "v2 metric": proxy.metric("http_requests_total", version="v2"),
        "v2 504": proxy.metric("http_requests_total", version="v2", code="504"),
        "v1 metric": proxy.metric("http_requests_total", version="v1"),
        "fallbacks": proxy.metric("strangler_fallbacks_total"),
        "v2 window": windows(redis_server, prefix, "v2"),
        "v1 window": windows(redis_server, prefix, "v1"),
    }


EXPECTED = {
    "v2 metric": 1.0,
    "v2 504": 1.0,  # v2's real failure (a connect timeout), not a hard-coded 502
    "v1 metric": 1.0,
    "fallbacks": 1.0,
    "v2 window": (1, 1),
    "v1 window": (1, 0),
}


def test_http_fallback_records_v2s_real_failure_and_the_v1_answer(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_server: RedisServer,
    blackhole: str,
) -> None:  # fmt: skip
    prefix = f"lc{uuid.uuid4().hex[:8]}:"
    proxy = proxy_factory(
        v1_url=v1v2[0].url, v2_url=blackhole, redis_url=redis_server.url, key_prefix=prefix,
        connect_timeout_seconds=0.3, canary={"flush_interval_seconds": 0.1},
    )  # fmt: skip
    response = httpx.get(proxy.url + "/echo", headers={"X-Strangler-Version": "v2"}, timeout=5)
    assert response.status_code == 200
    assert response.headers["x-api-version"] == "v1"
    assert accounting(proxy, redis_server, prefix) == EXPECTED


def test_websocket_fallback_records_the_same_as_http(
    proxy_factory: Callable[..., ProxyProcess], redis_server: RedisServer, blackhole: str
) -> None:
    v1 = WsBackend("v1").start()
    try:
        prefix = f"lc{uuid.uuid4().hex[:8]}:"
        proxy = proxy_factory(
            v1_url=v1.url, v2_url=blackhole, redis_url=redis_server.url, key_prefix=prefix,
            connect_timeout_seconds=0.3, canary={"flush_interval_seconds": 0.1},
        )  # fmt: skip
        url = proxy.url.replace("http://", "ws://") + "/echo"
        with connect(url, additional_headers={"X-Strangler-Version": "v2"}, open_timeout=5) as ws:
            assert ws.response is not None and ws.response.headers["X-API-Version"] == "v1"
            ws.send("whoami")
            assert ws.recv(timeout=5) == "v1"
        assert accounting(proxy, redis_server, prefix) == EXPECTED
    finally:
        v1.stop()


@pytest.mark.parametrize("size", [100_000, 131_072, 1_000_000])
def test_v2_down_large_bodies_fall_back_to_v1_whole(
    start_proxy: Callable[..., ProxyProcess], size: int
) -> None:
    """The body beyond the buffer is still on its way when v2 is dialled: nothing of it has gone
    upstream, so v1 serves the request, with every byte."""
    proxy = start_proxy(v2_url=f"http://127.0.0.1:{free_port()}")
    body = os.urandom(size)
    response = httpx.post(
        proxy.url + "/upload", content=body, headers={"X-Strangler-Version": "v2"}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-api-version"] == "v1"
    assert response.json()["length"] == size
    assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert proxy.metric("strangler_fallbacks_total") == 1


def test_slow_upload_is_the_clients_408_never_the_versions_error(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """65,537 bytes at once (the buffer and one byte), then 200 B every 0.2 s: 1,000 B/s, below the
    minimum of 2,000 B/s. The buffered first 64 KiB must not count as streamed."""
    proxy = start_proxy(
        read_timeout_seconds=6,
        limits={"min_body_rate_bytes_per_second": 2000, "body_rate_grace_seconds": 1.0},
    )
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 98304\r\n\r\n" + b"a" * 65_537
        )
        sock.settimeout(0.2)
        while time.monotonic() - started < 9 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b"b" * 200)
            except OSError:
                pass
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body too slow" in answer
    assert elapsed < 4, elapsed  # about the grace, long before the 6 s read timeout
    assert proxy.metric("strangler_rejected_requests_total", reason="body_too_slow") == 1
    assert proxy.metric("http_requests_total", version="v1") == 0
    assert proxy.metric("strangler_upstream_errors_total") == 0


def test_disagreeing_force_or_user_key_headers_are_refused(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy()
    url = proxy.url + "/echo"
    twice = httpx.get(url, headers=[("X-Strangler-Version", "v2"), ("X-Strangler-Version", "v2")])
    assert twice.status_code == 200 and twice.headers["x-api-version"] == "v2"
    for values in (("v2", "v1"), ("v1", "v2")):
        refused = httpx.get(
            url, headers=[("X-Strangler-Version", values[0]), ("X-Strangler-Version", values[1])]
        )
        assert refused.status_code == 400, values
        assert refused.json()["error"] == "bad force header"
    refused = httpx.get(url, headers=[("X-User-ID", "alice"), ("X-User-ID", "bob")])
    assert refused.status_code == 400
    assert refused.json()["error"] == "bad user key header"
    same = httpx.get(url, headers=[("X-User-ID", "alice"), ("X-User-ID", "alice")])
    assert same.status_code == 200
    assert proxy.metric("strangler_rejected_requests_total", reason="bad_force_header") == 2
    assert proxy.metric("strangler_rejected_requests_total", reason="bad_user_key_header") == 1


def test_path_parameters_do_not_dodge_a_gone_rule_or_the_route_group(
    start_proxy: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend]
) -> None:
    gone = {"name": "old", "methods": ["GET"], "pattern": "/v1/old/*", "deprecated_at": "2024-01-01",
            "phase": "gone"}  # fmt: skip
    proxy = start_proxy(deprecations=[gone], routes=[{"name": "grp", "patterns": ["/v1/grp/**"]}])
    for spelling in ("/v1/old/x", "/v1/old;v=1/x", "/v1/old/x;jsessionid=1", "/v1;a=b/old;c/x"):
        response = httpx.get(proxy.url + spelling)
        assert response.status_code == 410, spelling
    assert httpx.get(proxy.url + "/v1/older;v=1/x").status_code == 200
    assert httpx.get(proxy.url + "/v1/grp;v=2/a").status_code == 200
    assert proxy.metric("strangler_group_requests_total", group="grp") == 1

"""The cheap mirror path (what shadowing costs the proxy) against real backends and a real proxy.

A mirrored request without a body goes out on a warm pooled connection with no task in the client
(``send_now``); a small answer is buffered whole by the connection, its bytes reserved in the byte
budget when its head arrives; a larger one is read chunk by chunk as before. Small answers are
compared on the event loop, large ones or ones that need deepdiff in the compare thread. Every path
must give the same report and give back every byte of the budget it took.

The proxies run one shadow worker, so the first mirrored request opens the v2 connection (the
pool's coroutine path) and the following ones find it warm (the no-task path): both are exercised.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx

from tests.rawserver import RawServer, read_request_head
from tests.shadow.conftest import Scripted
from tests.shadow.helpers import detail, start_shadow_proxy, wait_row
from tests.support import ProxyProcess, wait_until

Start = Callable[..., ProxyProcess]
Pair = tuple[Scripted, Scripted]


def send(proxy: ProxyProcess, method: str, path: str, times: int) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(times):
            assert client.request(method, path).status_code == 200


def counts(found: dict[str, Any]) -> tuple[int, int, int, int, int]:
    return found["compared"], found["matched"], found["mismatched"], found["noise"], found["skipped"]


def held(proxy: ProxyProcess) -> int:
    return int(httpx.get(proxy.admin + "/shadow", timeout=5).json()["buffered_bytes"])


def test_small_large_and_head_answers_compare_alike_and_give_back_the_budget(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    large = 100 * 1024  # over the size buffered whole by the connection, and over the loop's limit
    v1.script("/c/small", any=[{"json": {"id": 1, "name": "a", "tags": [1, 2]}}])
    v2.script("/c/small", any=[{"json": {"id": 1, "name": "b", "tags": [1, 2]}}])
    v1.script("/c/same", any=[{"size": large}])
    v2.script("/c/same", any=[{"size": large}])
    v1.script("/c/list", any=[{"json": {"items": [{"id": 1}, {"id": 2}]}}])
    v2.script("/c/list", any=[{"json": {"items": [{"id": 1}, {"id": 3}]}}])  # deepdiff's case
    v1.script("/c/big", any=[{"size": large}])
    v2.script("/c/big", any=[{"size": large + 1}])
    v1.script("/c/head", any=[{"json": {"id": 1}}])
    v2.script("/c/head", any=[{"json": {"id": 22}}])
    proxy = shadow_proxy()
    send(proxy, "GET", "/c/small", 3)
    send(proxy, "GET", "/c/same", 3)
    send(proxy, "GET", "/c/list", 3)
    send(proxy, "GET", "/c/big", 3)
    send(proxy, "HEAD", "/c/head", 3)

    assert counts(wait_row(proxy, "GET /c/small", compared=3)) == (3, 0, 3, 0, 0)
    assert detail(proxy, "GET /c/small")["fields"] == {"root['name']": 3}
    assert counts(wait_row(proxy, "GET /c/same", compared=3)) == (3, 3, 0, 0, 0)
    assert counts(wait_row(proxy, "GET /c/list", compared=3)) == (3, 0, 3, 0, 0)
    assert detail(proxy, "GET /c/list")["fields"] == {"root['items'][*]['id']": 3}
    assert counts(wait_row(proxy, "GET /c/big", compared=3)) == (3, 0, 3, 0, 0)
    assert detail(proxy, "GET /c/big")["fields"] == {"root['pad']": 3}
    # HEAD: the answers' Content-Length differ, there is no body: nothing to compare but status
    assert counts(wait_row(proxy, "HEAD /c/head", compared=3)) == (3, 3, 0, 0, 0)
    assert held(proxy) == 0
    assert proxy.metric("strangler_shadow_requests_total", outcome="sent") == 15
    assert proxy.metric("strangler_shadow_requests_total", outcome="error") == 0


def test_an_answer_the_budget_cannot_hold_is_skipped_and_its_bytes_are_given_back(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    v1.script("/c/fits", any=[{"json": {"n": 1}}])
    v2.script("/c/fits", any=[{"size": 200}])
    v1.script("/c/over", any=[{"json": {"n": 1}}])
    v2.script("/c/over", any=[{"size": 1000}])
    # 1,000 bytes: a job is admitted while under 500 (its primary body is 8), an answer is read
    # while the total stays within 1,000; the 1,000-byte answer cannot be, whichever path reads it
    proxy = shadow_proxy(max_buffered_bytes=1000)
    send(proxy, "GET", "/c/fits", 3)
    send(proxy, "GET", "/c/over", 3)
    assert counts(wait_row(proxy, "GET /c/fits", compared=3)) == (3, 0, 3, 0, 0)
    assert counts(wait_row(proxy, "GET /c/over", skipped=3)) == (0, 0, 0, 0, 3)
    wait_until(lambda: held(proxy) == 0, timeout=5, message="the budget is given back")
    assert proxy.metric("strangler_shadow_requests_total", outcome="dropped") == 0


class OneAnswerPerConnection(RawServer):
    """A v2 that answers the first request on a connection (keep-alive) and closes the
    connection, unanswered, when a second one arrives: the keep-alive race, every time."""

    def __init__(self) -> None:
        self.answered = 0
        self.refused = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            if read_request_head(conn) is None:
                return
            body = b'{"n": 1}'
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(body), body))  # fmt: skip
            self.answered += 1
            if conn.recv(65536):
                self.refused += 1  # the second request: closed without an answer


def test_a_warm_connection_closed_under_the_request_is_sent_again_not_an_error(
    proxy_factory: Callable[..., ProxyProcess], scripted: Pair, redis_url: str
) -> None:
    v1, _ = scripted
    v1.script("/c/race", any=[{"json": {"n": 1}}])
    v2 = OneAnswerPerConnection()
    try:
        proxy = start_shadow_proxy(proxy_factory, v1, v2.url, redis_url, concurrency=1, exclude_paths=[])
        send(proxy, "GET", "/c/race", 4)
        assert counts(wait_row(proxy, "GET /c/race", compared=4)) == (4, 4, 0, 0, 0)
        # the first found no warm connection; each later one found the previous connection warm,
        # was refused there and went out again on a new one
        assert (v2.answered, v2.refused) == (4, 3)
        assert proxy.metric("strangler_shadow_requests_total", outcome="sent") == 4
        assert proxy.metric("strangler_shadow_requests_total", outcome="error") == 0
        wait_until(lambda: held(proxy) == 0, timeout=5, message="the budget is given back")
    finally:
        v2.stop()

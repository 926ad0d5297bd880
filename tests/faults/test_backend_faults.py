"""Backends dying, hanging or speaking nonsense: the right status, never a half answer passed off as
whole, no connection left behind, and every case counted."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.load import FixedAnswerServer, Load, established_to, loop_tasks, requests_total
from tests.hostile.rawhttp import exchange
from tests.support import Backend, ProxyProcess, RedisServer, wait_until

SPLIT = "feature:v2_traffic_percentage"
GET = b"GET %s HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n%s\r\n"


def test_v2_killed_requests_fall_back_to_v1(
    proxy_factory: Callable[..., ProxyProcess],
    backend_factory: Callable[[str], Backend],
    v1v2: tuple[Backend, Backend],
    redis_url: str,
    redis_server: RedisServer,
) -> None:
    v1, _ = v1v2
    v2 = backend_factory("v2")
    redis_server.client().set(SPLIT, "100")
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url)
    wait_until(lambda: httpx.get(proxy.url + "/echo").headers["x-api-version"] == "v2", timeout=5)
    fallbacks_before = proxy.metric("strangler_fallbacks_total")
    with Load(proxy.url + "/echo", workers=4, seconds=3.0) as load:
        time.sleep(0.8)
        killed_at = time.monotonic()
        v2.kill()
        dead_at = time.monotonic()
    assert load.outcomes
    # served before the kill by v2, after it by v1; only a request in flight at the kill may fail
    after = [o for o in load.outcomes if o.started > dead_at]
    assert after and load.failures(lambda o: o.started > dead_at) == []
    assert {o.version for o in after} == {"v1"}
    in_flight = load.failures()
    assert len(in_flight) <= 4
    assert all(o.started <= dead_at and o.ended >= killed_at and o.status == 502 for o in in_flight)
    fallbacks = proxy.metric("strangler_fallbacks_total") - fallbacks_before
    assert fallbacks == len([o for o in load.outcomes if o.version == "v1"])
    assert established_to(proxy, v2.port) == 0


def test_v2_frozen_gives_504_after_the_read_timeout_and_v1_is_unaffected(
    proxy_factory: Callable[..., ProxyProcess],
    backend_factory: Callable[[str], Backend],
    v1v2: tuple[Backend, Backend],
    redis_url: str,
) -> None:
    v1, _ = v1v2
    v2 = backend_factory("v2")
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, read_timeout_seconds=1.0,
                          connect_timeout_seconds=1.0)  # fmt: skip
    timeouts_before = proxy.metric("strangler_upstream_errors_total", version="v2", kind="timeout")
    tasks_before = loop_tasks(proxy)
    v2.freeze()
    try:
        with Load(
            proxy.url + "/echo", workers=2, seconds=2.5, headers={"X-Strangler-Version": "v1"}
        ) as v1_load:
            with Load(
                proxy.url + "/echo", workers=3, seconds=2.5, headers={"X-Strangler-Version": "v2"}
            ) as v2_load:
                pass
    finally:
        v2.thaw()
    assert v1_load.outcomes and v1_load.failures() == []
    assert v2_load.outcomes and {o.status for o in v2_load.outcomes} == {504}
    assert all(o.seconds >= 0.9 for o in v2_load.outcomes), "504 only after the read timeout"
    timeouts = proxy.metric("strangler_upstream_errors_total", version="v2", kind="timeout") - timeouts_before
    assert timeouts == len(v2_load.outcomes)
    assert requests_total(proxy, version="v2", code="504") == len(v2_load.outcomes)
    # thawed: served again, and the timed-out connections were closed, not parked in the pool
    wait_until(
        lambda: httpx.get(proxy.url + "/echo", headers={"X-Strangler-Version": "v2"}).status_code == 200
    )
    wait_until(lambda: established_to(proxy, v2.port) <= 3, timeout=10, message="v2 connections released")
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


BAD_ANSWERS = {
    "garbage_status_line": b"HELLO THERE\r\n\r\n",
    "invalid_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "nul_in_header": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "closed_without_answer": b"",
    "truncated_small_body": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this",
}


@pytest.fixture(scope="module")
def bad_v2(
    backends: tuple[Backend, Backend], redis_server: RedisServer, workdir: Path
) -> Iterator[tuple[ProxyProcess, FixedAnswerServer]]:
    """One proxy whose v2 is a raw server; each case swaps the bytes it answers with."""
    bad = FixedAnswerServer(b"")
    settings = {
        "v1_url": backends[0].url,
        "v2_url": bad.url,
        "redis_url": redis_server.url,
        "key_prefix": "badv2:",
        "split_key": "badv2:split",
        "log_level": "warning",
    }
    proxy = ProxyProcess(workdir / "bad-v2", settings).start()
    yield proxy, bad
    proxy.stop()
    bad.stop()


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_v2_answering_invalid_http_is_a_502(
    bad_v2: tuple[ProxyProcess, FixedAnswerServer], case: str
) -> None:
    """Nothing was relayed yet, so the client gets a clean 502 naming v2, counted as such."""
    proxy, bad = bad_v2
    bad.answer = BAD_ANSWERS[case]
    errors_before = proxy.metric("strangler_upstream_errors_total", version="v2")
    answered_before = requests_total(proxy, version="v2", code="502")
    fallbacks_before = proxy.metric("strangler_fallbacks_total")
    tasks_before = loop_tasks(proxy)
    for _ in range(3):
        reply = exchange(proxy.port, GET % (b"/echo", b"X-Strangler-Version: v2\r\n"))
        assert reply.status == 502, reply.raw[:300]
        assert json.loads(reply.body)["version"] == "v2"
        assert reply.headers[b"x-api-version"] == b"v2"
    assert proxy.metric("strangler_upstream_errors_total", version="v2") - errors_before == 3
    assert requests_total(proxy, version="v2", code="502") - answered_before == 3
    assert proxy.metric("strangler_fallbacks_total") == fallbacks_before, "something was sent: no fallback"
    assert established_to(proxy, bad.port) == 0
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


def test_upstream_closing_mid_body_closes_the_client_connection(
    proxy: ProxyProcess, v1v2: tuple[Backend, Backend]
) -> None:
    """/reset promises 100000 bytes, sends 1000 and drops: the client sees the short count and a
    closed connection (so it knows), never a complete-looking answer."""
    v1, _ = v1v2
    tasks_before = loop_tasks(proxy)
    for _ in range(3):
        reply = exchange(proxy.port, b"GET /reset HTTP/1.1\r\nHost: app.test\r\n\r\n", timeout=10)
        assert reply.status == 200
        assert reply.headers[b"content-length"] == b"100000"
        assert len(reply.body) < 100000
        assert reply.closed
    assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="reset") == 3
    wait_until(lambda: established_to(proxy, v1.port) <= 1, timeout=10)
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


def test_chunked_upstream_cut_mid_body_never_gets_a_final_chunk(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    _, v2 = v1v2
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    bad = FixedAnswerServer(head + (b"10000\r\n" + b"z" * 0x10000 + b"\r\n") * 2)  # 128 KiB, then gone
    try:
        proxy = proxy_factory(v1_url=bad.url, v2_url=v2.url, redis_url=redis_url)
        reply = exchange(proxy.port, GET % (b"/big", b""), timeout=10)
        assert reply.status == 200
        assert reply.closed
        assert not reply.body.endswith(b"0\r\n\r\n"), "a truncated answer must not look complete"
        assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="reset") == 1
    finally:
        bad.stop()

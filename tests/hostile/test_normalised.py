"""Odd but unambiguous requests the proxy serves: what reaches the backend is one plainly framed
request (the recording server's strict parser finds nothing to guess about), in the form asserted.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from tests.hostile.rawhttp import exchange
from tests.hostile.recorder import RecordingServer, Request
from tests.support import ProxyProcess, wait_until

H = b"Host: app.test\r\n"
CLOSE = b"Connection: close\r\n"


def only_request(server: RecordingServer) -> Request:
    requests = server.requests
    assert len(requests) == 1, [r.request_line for r in requests]
    assert server.problems == []
    return requests[0]


def framing(request: Request) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower(), v) for k, v in request.headers if k.lower() in (b"content-length", b"transfer-encoding")
    ]


def served(proxy: ProxyProcess, data: bytes) -> None:
    reply = exchange(proxy.port, data)
    assert reply.status == 200, reply.raw[:300]
    assert reply.headers[b"x-api-version"] == b"v1"


def test_content_length_with_trailing_space_is_trimmed(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    served(hostile_proxy, b"POST /echo HTTP/1.1\r\n" + H + CLOSE + b"Content-Length: 5 \r\n\r\nhello")
    request = only_request(v1_recorder)
    assert framing(request) == [(b"content-length", b"5")]
    assert request.body == b"hello"


def test_leading_space_in_transfer_encoding_is_plain_chunked(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    served(hostile_proxy, b"POST /echo HTTP/1.1\r\n" + H + CLOSE + b"Transfer-Encoding:  chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    request = only_request(v1_recorder)
    assert len(framing(request)) == 1
    assert request.body == b"hello"


def test_chunk_extensions_are_dropped(hostile_proxy: ProxyProcess, v1_recorder: RecordingServer) -> None:
    served(hostile_proxy, b"POST /echo HTTP/1.1\r\n" + H + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    request = only_request(v1_recorder)
    assert request.body == b"hello"
    assert b"name=value" not in v1_recorder.raw


def test_absolute_form_never_reaches_the_named_host(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer, recorders: dict[str, RecordingServer]
) -> None:
    other = recorders["other"]
    for target in (f"http://127.0.0.1:{other.port}/abs?q=1", f"http://user@127.0.0.1:{other.port}/abs?q=1"):
        v1_recorder.clear()
        host = b"Host: 127.0.0.1:%d\r\n" % other.port
        served(hostile_proxy, b"GET " + target.encode() + b" HTTP/1.1\r\n" + host + CLOSE + b"\r\n")
        assert only_request(v1_recorder).target == b"/abs?q=1"
    assert other.raw == b"" and other.connections == []


def test_host_header_does_not_choose_the_upstream(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer, recorders: dict[str, RecordingServer]
) -> None:
    other = recorders["other"]
    served(hostile_proxy, b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % other.port + CLOSE + b"\r\n")
    only_request(v1_recorder)
    assert other.connections == []


def test_h2c_upgrade_is_stripped_and_the_connection_closed(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """Served as a plain request (Upgrade is hop-by-hop), never as an upgrade; the parser stops at
    an upgrade, so the proxy closes the connection rather than read anything after it."""
    reply = exchange(
        hostile_proxy.port,
        b"GET /echo HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
    )
    assert reply.status == 200
    assert reply.closed
    request = only_request(v1_recorder)
    names = {k.lower() for k, _ in request.headers}
    assert not names & {b"upgrade", b"http2-settings", b"connection"}
    assert request.target == b"/echo"


def test_connection_cannot_drop_headers_the_proxy_sets(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    served(hostile_proxy, b"GET /echo HTTP/1.1\r\n" + H + b"X-Forwarded-For: 203.0.113.7\r\n"
           b"Connection: close, X-Forwarded-For, X-Request-ID, X-Forwarded-Proto, Host\r\n\r\n")  # fmt: skip
    request = only_request(v1_recorder)
    assert request.header(b"x-forwarded-for") == [b"203.0.113.7, 127.0.0.1"]
    assert len(request.header(b"x-request-id")) == 1
    assert request.header(b"x-forwarded-proto") == [b"http"]
    assert request.header(b"host") == [b"app.test"]


def test_request_hidden_in_a_body_stays_a_body(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    hidden = b"GET /_strangler/metrics HTTP/1.1\r\n" + H + b"\r\n"
    reply = exchange(hostile_proxy.port, b"POST /echo HTTP/1.1\r\n" + H + CLOSE
                     + b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden)  # fmt: skip
    assert reply.status == 200
    assert reply.raw.count(b"HTTP/1.1 200") == 1
    request = only_request(v1_recorder)
    assert request.body == hidden and framing(request) == [(b"content-length", b"%d" % len(hidden))]


def test_pipelined_requests_are_forwarded_one_by_one(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """Real pipelining is legal: each request is framed by the proxy and sent on its own."""
    first = b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
    second = b"GET /two HTTP/1.1\r\n" + H + CLOSE + b"\r\n"
    reply = exchange(hostile_proxy.port, first + second)
    assert reply.raw.count(b"HTTP/1.1 200") == 2
    requests = v1_recorder.requests
    assert sorted(r.target for r in requests) == [b"/one", b"/two"]
    assert v1_recorder.problems == []


def test_http10_without_host_gets_exactly_one_host(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    served(hostile_proxy, b"GET /echo HTTP/1.0\r\n\r\n")
    assert len(only_request(v1_recorder).header(b"host")) == 1


def test_percent_encoded_invalid_utf8_passes_byte_for_byte(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    served(hostile_proxy, b"GET /echo/%ff%fe?x=%c3%28 HTTP/1.1\r\n" + H + CLOSE + b"\r\n")
    assert only_request(v1_recorder).target == b"/echo/%ff%fe?x=%c3%28"


def test_repeated_ordinary_headers_keep_their_order(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    headers = b"X-A: 1\r\nX-A: 2\r\nTransfer-Encoding: CHUNKED\r\n"
    served(hostile_proxy, b"GET /echo HTTP/1.1\r\n" + H + CLOSE + headers + b"\r\n0\r\n\r\n")
    assert only_request(v1_recorder).header(b"x-a") == [b"1", b"2"]


def test_limits_are_inclusive(hostile_proxy: ProxyProcess, v1_recorder: RecordingServer) -> None:
    """Just under every limit is served: the limits refuse abuse, not big-but-normal requests."""
    path = b"/" + b"a" * 8000
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(90))
    served(hostile_proxy, b"GET " + path + b" HTTP/1.1\r\n" + H + CLOSE + headers + b"\r\n")
    assert only_request(v1_recorder).target == path
    v1_recorder.clear()
    body = b"x" * (64 * 1024)
    served(
        hostile_proxy,
        b"POST /echo HTTP/1.1\r\n" + H + CLOSE + b"Content-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert only_request(v1_recorder).body == body


def test_deeply_nested_json_to_a_mirrored_endpoint(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    """100,000 levels of nesting through a mirrored POST: the answer arrives whole, the proxy
    survives, and (once shadow mirroring is wired) the comparison records an outcome."""
    v1 = RecordingServer(echo_body=True).start()
    # v2 answers the same JSON with other whitespace, so a comparison must parse both sides
    v2 = RecordingServer(answer=lambda request: b" " + request.body).start()
    try:
        proxy = proxy_factory(
            process=True,  # a stack overflow would take its process down: not the test run's
            v1_url=v1.url,
            v2_url=v2.url,
            redis_url=redis_url,
            shadow={"enabled": True, "methods": ["GET", "POST"], "sample_percentage": 100},
        )
        deep = b"[" * 100_000 + b"]" * 100_000
        head = b"POST /deep HTTP/1.1\r\n" + H + CLOSE + b"Content-Type: application/json\r\n"
        reply = exchange(proxy.port, head + b"Content-Length: %d\r\n\r\n" % len(deep) + deep, timeout=15)
        assert reply.status == 200
        assert reply.body == deep
        assert len(v1.requests) == 1
        if proxy.metric("strangler_shadow_requests_total") or v2.requests:  # shadow mirroring is wired
            wait_until(lambda: proxy.metric("strangler_shadow_comparisons_total")
                       + proxy.metric("strangler_shadow_requests_total", outcome="error") >= 1,
                       timeout=10, message="the deep comparison finished")  # fmt: skip
        follow = httpx.post(proxy.url + "/after", content=json.dumps({"a": 1}), timeout=10)
        assert follow.status_code == 200
        assert proxy.process is not None and proxy.process.poll() is None
    finally:
        v1.stop()
        v2.stop()


def test_a_refused_request_pipelined_behind_a_good_one_cannot_take_its_answer(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """The good request is answered (its own 200), then the connection closes; the refusal is never
    written where it could be read as the answer to the earlier request."""
    good = b"GET /slow-first HTTP/1.1\r\n" + H + b"\r\n"
    bad = b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    reply = exchange(hostile_proxy.port, good + bad)
    assert reply.status == 200
    assert reply.raw.count(b"HTTP/1.1 ") == 1
    assert reply.closed
    assert [r.target for r in v1_recorder.requests] == [b"/slow-first"]


def test_a_body_over_the_limit_pipelined_behind_a_good_request_cannot_take_its_answer(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    good = b"GET /first HTTP/1.1\r\n" + H + b"\r\n"
    size = 64 * 1024 + 100
    bad = (b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % size + b"x" * size + b"\r\n0\r\n\r\n")  # fmt: skip
    reply = exchange(hostile_proxy.port, good + bad)
    assert reply.status == 200, reply.raw[:200]
    assert reply.raw.count(b"HTTP/1.1 ") == 1
    assert reply.closed
    assert [r.target for r in v1_recorder.requests] == [b"/first"]

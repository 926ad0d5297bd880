"""What a request head is made of, and what it is not: trailers never
join the head, an absolute-form target's authority is the host, a Host header must be a host, and
an upgrade needs HTTP/1.1. Raw bytes in, what the recording backend received out."""

from __future__ import annotations

import socket

from tests.hostile.rawhttp import exchange
from tests.hostile.recorder import RecordingServer
from tests.support import ProxyProcess
from tests.wsbackend import WsBackend

CLOSE = b"Connection: close\r\n"


def test_trailers_never_route_nor_forge_forwarding_headers(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer, recorders: dict[str, RecordingServer]
) -> None:
    """Item 5: llhttp reports a chunked body's trailer fields as headers; they used to be added to
    the request head, so a trailer chose the version and was taken for X-Forwarded-For."""
    reply = exchange(
        hostile_proxy.port,
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\n" + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Strangler-Version: v2\r\nX-Forwarded-For: 127.0.0.9\r\n"
        b"X-Trailer-Probe: yes\r\n\r\n",
    )
    assert reply.status == 200, reply.raw[:300]
    assert reply.headers[b"x-api-version"] == b"v1"
    assert recorders["v2"].requests == []
    [request] = v1_recorder.requests
    assert request.body == b"hello"
    assert request.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert b"127.0.0.9" not in v1_recorder.raw
    assert b"x-trailer-probe" not in v1_recorder.raw.lower()  # trailers are not forwarded (security.md)
    assert v1_recorder.problems == []


def test_the_absolute_form_authority_is_the_host(
    hostile_proxy: ProxyProcess, v1_recorder: RecordingServer
) -> None:
    """Item 11: RFC 9112 3.2.2, the target's authority replaces the Host header's value."""
    evil = b"Host: evil.example\r\n" + CLOSE + b"\r\n"
    reply = exchange(hostile_proxy.port, b"GET http://app.test/x HTTP/1.1\r\n" + evil)
    assert reply.status == 200, reply.raw[:300]
    [request] = v1_recorder.requests
    assert request.target == b"/x"
    assert request.header(b"host") == [b"app.test"]
    assert request.header(b"x-forwarded-host") == [b"app.test"]
    assert b"evil.example" not in v1_recorder.raw
    v1_recorder.clear()
    reply = exchange(hostile_proxy.port, b"GET http://u:p@[::1]:8080/y?q=1 HTTP/1.1\r\n" + evil)
    assert reply.status == 200, reply.raw[:300]
    [request] = v1_recorder.requests
    assert request.target == b"/y?q=1"
    assert request.header(b"host") == [b"[::1]:8080"]


def test_a_malformed_host_is_400(hostile_proxy: ProxyProcess, v1_recorder: RecordingServer) -> None:
    """Item 11: RFC 9112 3.2, a Host that is not ``uri-host [":" port]`` is a 400."""
    for host in (b"[::1", b"::1]", b"a]b", b"[::1]x", b"app.test:8o", b"[[::1]]", b"a b"):
        reply = exchange(hostile_proxy.port, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n" + CLOSE + b"\r\n")
        assert reply.status == 400, (host, reply.raw[:200])
        assert b"bad host" in reply.body or host == b"a b", (host, reply.body)
    good = (b"[::1]", b"[::1]:8080", b"app.test", b"app.test:8080", b"127.0.0.1:1", b"", b"xn--bcher.example")
    for host in good:
        reply = exchange(hostile_proxy.port, b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n" + CLOSE + b"\r\n")
        assert reply.status == 200, (host, reply.raw[:200])
    assert v1_recorder.problems == []


def test_a_websocket_upgrade_over_http10_is_refused(start_proxy: object) -> None:
    """Item 12: RFC 6455 4.1 needs HTTP/1.1 for the handshake; a 1.0 upgrade got a 101."""
    backend = WsBackend("v1").start()
    try:
        proxy = start_proxy(v1_url=backend.url, v2_url=backend.url)  # type: ignore[operator]
        head = (
            b"GET /echo HTTP/1.0\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(head)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"bad upgrade" in answer
    finally:
        backend.stop()

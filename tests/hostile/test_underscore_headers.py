"""Underscore look-alikes of the proxy's own and framing headers.

WSGI/CGI backends turn ``X-Forwarded-Proto`` and ``X_Forwarded_Proto`` into the same key
(``HTTP_X_FORWARDED_PROTO``), so a look-alike the proxy passes on can override what the proxy
set, or reframe the request for the backend. Like nginx (``underscores_in_headers off``), names
with ``_`` are dropped; ``allow_underscore_headers: true`` passes them, but never the look-alikes
of framing, hop-by-hop or proxy-set headers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.hostile.rawhttp import exchange
from tests.hostile.recorder import RecordingServer, Request
from tests.support import ProxyProcess

LOOK_ALIKES = (
    b"X_Forwarded_Proto: https\r\n"
    b"X_Forwarded_Host: evil.example\r\n"
    b"X_Forwarded_For: 10.9.9.9\r\n"
    b"X_Request_ID: forged-id\r\n"
    b"X_Strangler_Version: v2\r\n"
    b"Content_Length: 5\r\n"
    b"X_Custom_Flag: yes\r\n"
)


@pytest.fixture()
def echo_server() -> Iterator[RecordingServer]:
    server = RecordingServer().start()
    yield server
    server.stop()


def underscored(request: Request) -> list[bytes]:
    return [name for name, _ in request.headers if b"_" in name]


def only_request(server: RecordingServer) -> Request:
    requests = server.requests
    assert len(requests) == 1, [r.request_line for r in requests]
    assert server.problems == []
    return requests[0]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /echo HTTP/1.1\r\nHost: app.test\r\n" + LOOK_ALIKES + b"\r\n",
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n"
        + LOOK_ALIKES
        + b"\r\nhello",
    ],
    ids=["get", "post"],
)
def test_underscore_names_are_dropped_by_default(
    proxy_factory: Callable[..., ProxyProcess], echo_server: RecordingServer, redis_url: str,
    request_bytes: bytes,
) -> None:  # fmt: skip
    proxy = proxy_factory(v1_url=echo_server.url, v2_url=echo_server.url, redis_url=redis_url)
    reply = exchange(proxy.port, request_bytes)
    assert reply.status == 200, reply.raw[:300]
    request = only_request(echo_server)
    assert underscored(request) == []
    assert request.header(b"x-forwarded-proto") == [b"http"]
    assert request.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert request.header(b"x-forwarded-host") == [b"app.test"]
    assert request.header(b"x-request-id") != [b"forged-id"]
    if request.method == b"GET":
        assert request.header(b"content-length") == [] and request.body == b""
    else:
        assert request.header(b"content-length") == [b"5"] and request.body == b"hello"
    assert request.header(b"transfer-encoding") == []


def test_allowed_underscores_still_never_pass_protected_look_alikes(
    proxy_factory: Callable[..., ProxyProcess], echo_server: RecordingServer, redis_url: str
) -> None:
    proxy = proxy_factory(
        v1_url=echo_server.url, v2_url=echo_server.url, redis_url=redis_url, allow_underscore_headers=True
    )
    data = (
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nTransfer_Encoding: chunked\r\n"
        + LOOK_ALIKES
        + b"\r\nhello"
    )
    reply = exchange(proxy.port, data)
    assert reply.status == 200, reply.raw[:300]
    assert reply.headers[b"x-api-version"] == b"v1"  # X_Strangler_Version forces nothing
    request = only_request(echo_server)
    assert underscored(request) == [b"x_custom_flag"]  # the only one that is no look-alike
    assert request.header(b"x-forwarded-proto") == [b"http"]
    assert request.body == b"hello"

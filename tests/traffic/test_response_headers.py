"""What a backend's answer head may carry through the proxy: end-to-end headers only.

Hop-by-hop headers (RFC 9110 7.6.1), headers the backend names in Connection, and a forged
X-Api-Version stop at the proxy; the client sees the proxy's own framing and version header. The
edge client strips them while parsing (``UpstreamResponse.headers``), so these answers go through
the fast path and, for the large one, the streamed path."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.hostile.rawhttp import exchange
from tests.support import ProxyProcess

HOSTILE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, X-Backend-Hop\r\n"
    b"X-Backend-Hop: internal-10.0.0.7\r\nKeep-Alive: timeout=5, max=100\r\nX-Api-Version: v9\r\n"
    b"Proxy-Authenticate: Basic\r\nTrailer: X-Checksum\r\nX-Kept: yes\r\nX-Kept: twice\r\n"
)


class RawAnswers:
    """Answers every request on a keep-alive connection with fixed bytes (a body of ``size``)."""

    def __init__(self, size: int) -> None:
        body = b'{"ok":true,"pad":"' + b"p" * max(0, size - 20) + b'"}'
        self.answer = HOSTILE_HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
        self.body = body
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffered = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffered += data
                _, _, buffered = buffered.partition(b"\r\n\r\n")
                conn.sendall(self.answer)

    def stop(self) -> None:
        self._sock.close()


@pytest.fixture(params=[300, 200_000], ids=["small-fast-path", "large-streamed"])
def hostile_backend(
    request: pytest.FixtureRequest, proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> Iterator[tuple[ProxyProcess, RawAnswers]]:
    backend = RawAnswers(request.param)
    proxy = proxy_factory(v1_url=backend.url, v2_url=backend.url, redis_url=redis_url)
    yield proxy, backend
    backend.stop()


def test_only_end_to_end_headers_reach_the_client(hostile_backend: tuple[ProxyProcess, RawAnswers]) -> None:
    proxy, backend = hostile_backend
    request = b"GET /items HTTP/1.1\r\nHost: shop.example\r\n\r\n"
    for _ in range(3):  # the first request opens the upstream connection; the others reuse it
        reply = exchange(proxy.port, request + request, timeout=10)  # two pipelined: both framed right
        assert reply.status == 200, reply.raw[:400]
        head = reply.raw.partition(b"\r\n\r\n")[0].lower()
        for gone in (b"x-backend-hop", b"keep-alive:", b"proxy-authenticate", b"trailer:", b"v9",
                     b"internal-10.0.0.7"):  # fmt: skip
            assert gone not in head, head
        assert head.count(b"\r\nx-api-version: v1") == 1
        assert head.count(b"\r\nx-kept: ") == 2  # repeats kept, in order
        assert b"\r\ncontent-type: application/json" in head
        assert reply.body.startswith(backend.body)

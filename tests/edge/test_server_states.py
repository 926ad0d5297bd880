"""The client connection (proxy/edge/server.py ``ServerProtocol``) across requests: what one
exchange leaves behind must never change how the next one on the same connection is served.
Real proxy, real backends, raw client sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from tests.support import ProxyProcess, wait_until

BIG = 6_700_000


def _read_answer(sock: socket.socket, pause: float = 0.0) -> tuple[bytes, int]:
    """One sized answer: its head and how many body bytes arrived before the close (if any).
    ``pause``: seconds to stop reading once the head is in (the proxy's buffer fills meanwhile)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, -1
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    if pause:
        time.sleep(pause)
    got = len(body)
    while got < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    return head, got


def test_a_big_answer_after_a_streamed_one_is_whole(start_proxy: Callable[..., ProxyProcess]) -> None:
    """The first answer (over the small-answer size, so streamed with a
    disconnect watcher) must leave nothing behind that reads as "client gone" when the second,
    larger answer waits for the client to read."""
    proxy = start_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /stream?bytes=102400&sized=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        head, got = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200 ") and got == 102400
        sock.sendall(b"GET /stream?bytes=%d&sized=1 HTTP/1.1\r\nHost: t\r\n\r\n" % BIG)
        head, got = _read_answer(sock, pause=0.5)  # the proxy's writes pause meanwhile
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert got == BIG
    assert proxy.metric("strangler_client_disconnects_total") == 0


def test_a_client_that_never_reads_is_cut_after_the_send_timeout(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Clients that ask for big answers and never read held their backend
    connections for ever (with the pool full, every other request was 503). After
    ``send_timeout_seconds`` of a full write buffer the client is cut, and its backend connection
    with it."""
    proxy = start_proxy(upstream_pool_size=2, pool_timeout_seconds=0.3, limits={"send_timeout_seconds": 1.0})
    readers = []
    try:
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", proxy.port))
            sock.sendall(b"GET /stream?bytes=8388608&sized=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            readers.append(sock)
        time.sleep(0.3)
        held = proxy.http.get(proxy.url + "/echo")
        assert held.status_code == 503  # both backend connections are held by clients not reading
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proxy.http.get(proxy.url + "/echo").status_code == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the clients that never read still hold the backend connections")
        cut = lambda: proxy.metric("strangler_rejected_requests_total", reason="client_send_timeout") == 2  # noqa: E731
        wait_until(cut, timeout=5, message="both clients cut")
        assert proxy.http.get(proxy.url + "/echo").status_code == 200
    finally:
        for sock in readers:
            sock.close()


def test_a_head_begun_in_the_packet_of_the_previous_request_is_served(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """The first packet holds a whole request and the start of the next one's head; the rest
    comes after the first answer. The connection is then reading a head (READING_HEAD), not idle:
    taking it for idle made the next request an impossible IDLE -> ACTIVE change (the connection
    was aborted, or raised under strict_states)."""
    proxy = start_proxy()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHo")
        head, _ = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head
        time.sleep(0.2)
        sock.sendall(b"st: t\r\n\r\n")
        head, _ = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200 "), head

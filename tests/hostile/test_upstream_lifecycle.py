"""One upstream connection carries one whole exchange at a time (proxy/edge/client.py ``State``).

Raw backends against the real proxy, for the ways the upstream connection's lifecycle went wrong:

- an answer that comes (complete) before the streamed request body has been written put the
  connection back in the pool mid-upload: the next client's request was written into that body;
- a request the backend applied and then closed the connection on was sent again, once per idle
  pooled connection, whatever its method (a POST applied 2-4 times);
- an answer head of any size was relayed;
- the read deadline ran while we were still writing a slow client's body.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.hostile.rawhttp import exchange
from tests.rawserver import RawServer, read_request_head
from tests.support import ProxyProcess

H = b"Host: app.test\r\n"
METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"TRACE ")


def one_backend_proxy(
    proxy_factory: Callable[..., ProxyProcess], backend_url: str, redis_url: str, prefix: str, **settings: Any
) -> ProxyProcess:
    """A proxy whose two versions are one test backend, with Redis keys of its own."""
    return proxy_factory(
        v1_url=backend_url, v2_url=backend_url, redis_url=redis_url, split_key=prefix + "split",
        key_prefix=prefix, **settings,
    )  # fmt: skip


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def read_exactly(conn: socket.socket, buffer: bytes, size: int) -> tuple[bytes, bytes] | None:
    while len(buffer) < size:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    return buffer[:size], buffer[size:]


def answer(target: bytes, extra: bytes = b"") -> bytes:
    body = b"T=" + target
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


# --- item 1: an early answer must not hand the connection to the next request ----------------------


class EarlyAnswerBackend(RawServer):
    """Answers every request as soon as its head is in, then drains its body (as many servers do
    with a request they refuse early). Records each request line and each body it drained; a
    request line inside a body is the splice."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.bodies: list[bytes] = []
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    got = read_request_head(conn, buffer)
                    if got is None:
                        return
                    head, buffer = got
                    self.lines.append(head.split(b"\r\n")[0])
                    conn.sendall(answer(head.split(b" ")[1]))
                    drained = read_exactly(conn, buffer, content_length(head))
                    if drained is None:
                        return
                    body, buffer = drained
                    if body:
                        self.bodies.append(body)
                except OSError:
                    return


def test_an_early_answer_never_hands_the_connection_to_the_next_request_mid_upload(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    backend = EarlyAnswerBackend()
    try:
        proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "early:", read_timeout_seconds=3.0)
        # a warm pooled connection, so that the upload and the GETs could share one
        assert httpx.get(proxy.url + "/warm", timeout=5).text == "T=/warm"
        uploader_got = b""
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as up:
            up.sendall(b"POST /r/early HTTP/1.1\r\n" + H + b"Content-Length: 200000\r\n\r\n" + b"x" * 100_000)
            # the backend has answered; the body is half sent. Other clients now, on the pool
            replies: list[tuple[int, str]] = []
            for i in range(5):
                with httpx.Client(timeout=6) as other:
                    reply = other.get(proxy.url + f"/after-{i}")
                    replies.append((reply.status_code, reply.text))
            time.sleep(0.5)
            try:
                up.sendall(b"x" * 100_000)
            except OSError:
                pass  # the proxy may close the uploader once its answer is out: the answer is read below
            up.settimeout(3)
            try:
                while b"T=/r/early" not in uploader_got:
                    chunk = up.recv(65536)
                    if not chunk:
                        break
                    uploader_got += chunk
            except OSError:
                pass
        assert replies == [(200, f"T=/after-{i}") for i in range(5)]
        assert uploader_got.startswith(b"HTTP/1.1 200 "), uploader_got[:200]
        assert uploader_got.endswith(b"T=/r/early")
        # the backend saw only real request lines, and no body held anything but the upload's bytes
        assert all(line.startswith(METHODS) and line.endswith(b" HTTP/1.1") for line in backend.lines), (
            backend.lines
        )
        for body in backend.bodies:
            assert body.strip(b"x") == b"", body.replace(b"x", b"")[:200]
    finally:
        backend.stop()


# --- item 3: a request is sent twice only when that is safe ------------------------------------------


class DropOnReuseBackend(RawServer):
    """The first request on each connection is answered (``/slow`` once ``hold`` are in); any later one is
    read (with its body), recorded and then the connection is closed without an answer: a
    backend that applied the request and died, or closed a kept-alive connection as it arrived."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []  # "METHOD target" of every request read in full
        self.hold = 1
        self.lock = threading.Lock()
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        first = True
        with conn:
            while True:
                try:
                    got = read_request_head(conn, buffer)
                    if got is None:
                        return
                    head, buffer = got
                    drained = read_exactly(conn, buffer, content_length(head))
                    if drained is None:
                        return
                    _, buffer = drained
                    method, target = head.split(b" ")[:2]
                    with self.lock:
                        self.seen.append(method + b" " + target)
                    if not first:
                        return  # applied, never answered: the connection closes
                    first = False
                    if target == b"/slow":  # held until ``hold`` of them are in: one connection each
                        deadline = time.monotonic() + 5
                        while self.count(b"GET /slow") < self.hold and time.monotonic() < deadline:
                            time.sleep(0.01)
                    conn.sendall(answer(target))
                except OSError:
                    return

    def count(self, request: bytes) -> int:
        with self.lock:
            return self.seen.count(request)


@pytest.fixture()
def drop_on_reuse(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> Iterator[tuple[DropOnReuseBackend, ProxyProcess]]:
    backend = DropOnReuseBackend()
    proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "drop:")
    yield backend, proxy
    backend.stop()


def warm(proxy: ProxyProcess, backend: DropOnReuseBackend, idle: int) -> None:
    """``idle`` pooled connections, each having answered one request (so each drops the next)."""
    backend.hold = idle
    threads = [
        threading.Thread(target=lambda: httpx.get(proxy.url + "/slow", timeout=5).raise_for_status())
        for _ in range(idle)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.connections == idle
    assert backend.count(b"GET /slow") == idle


@pytest.mark.parametrize("idle", [1, 3])
def test_a_post_the_backend_applied_without_answering_is_never_sent_again(
    drop_on_reuse: tuple[DropOnReuseBackend, ProxyProcess], idle: int
) -> None:
    """RFC 9110 9.2.2: a POST is not idempotent; once written, the proxy must not send it again
    (nginx sends it once). Before: once more per idle pooled connection, then a 200."""
    backend, proxy = drop_on_reuse
    warm(proxy, backend, idle)
    reply = httpx.post(proxy.url + "/pay", content=b'{"amount": 100}', timeout=5)
    assert reply.status_code == 502
    assert reply.json()["error"] == "upstream unavailable"
    assert backend.count(b"POST /pay") == 1


@pytest.mark.parametrize("idle", [1, 3])
def test_a_get_the_backend_dropped_is_sent_once_more_on_a_new_connection(
    drop_on_reuse: tuple[DropOnReuseBackend, ProxyProcess], idle: int
) -> None:
    """An idempotent request on a reused connection closed without an answer (the keep-alive race)
    goes again once, on a new connection, never on another idle pooled one."""
    backend, proxy = drop_on_reuse
    warm(proxy, backend, idle)
    reply = httpx.get(proxy.url + "/again", timeout=5)
    assert (reply.status_code, reply.text) == (200, "T=/again")
    assert backend.count(b"GET /again") == 2
    assert backend.connections == idle + 1


@pytest.mark.parametrize("idle", [1, 3])
def test_a_put_with_a_body_the_backend_dropped_is_sent_once_more_on_a_new_connection(
    drop_on_reuse: tuple[DropOnReuseBackend, ProxyProcess], idle: int
) -> None:
    """PUT is idempotent (RFC 9110 9.2.2): its buffered body may go once more, on a new connection."""
    backend, proxy = drop_on_reuse
    warm(proxy, backend, idle)
    reply = httpx.put(proxy.url + "/doc", content=b"v=2", timeout=5)
    assert (reply.status_code, reply.text) == (200, "T=/doc")
    assert backend.count(b"PUT /doc") == 2
    assert backend.connections == idle + 1


# --- item 10: an answer's head has a size limit ---------------------------------------------------------


class BigHeadBackend(RawServer):
    """Answers ``/big-<n>`` with a header of n bytes, anything else plainly."""

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    got = read_request_head(conn, buffer)
                    if got is None:
                        return
                    head, buffer = got
                    target = head.split(b" ")[1]
                    extra = b""
                    if target.startswith(b"/big-"):
                        extra = b"X-Big: " + b"b" * int(target[5:]) + b"\r\n"
                    conn.sendall(answer(target, extra))
                except OSError:
                    return


@pytest.mark.parametrize("size", [2 * 1024 * 1024, 80 * 1024])
def test_an_answer_head_over_the_limit_is_a_502_and_nothing_of_it_is_relayed(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str, size: int
) -> None:
    backend = BigHeadBackend()
    try:
        proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "bighead:")
        assert httpx.get(proxy.url + "/big-60000", timeout=5).status_code == 200  # under 64 KiB: relayed
        reply = exchange(proxy.port, b"GET /big-%d HTTP/1.1\r\n" % size + H + b"\r\n", timeout=10)
        assert reply.status == 502, reply.raw[:300]
        assert b"x-big" not in reply.raw.lower() and b"bbbb" not in reply.raw
        assert json.loads(reply.body) == {
            "error": "upstream unavailable",
            "version": "v1",
            "detail": "answer head larger than max_response_head_bytes",
        }
        assert proxy.metric("strangler_upstream_errors_total", version="v1", kind="protocol") == 1
        connections = backend.connections
        assert httpx.get(proxy.url + "/next", timeout=5).text == "T=/next"
        assert backend.connections == connections + 1  # the connection that carried it was closed
    finally:
        backend.stop()


def test_the_answer_head_limit_is_a_setting(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    backend = BigHeadBackend()
    try:
        proxy = one_backend_proxy(
            proxy_factory, backend.url, redis_url, "bighead2:", limits={"max_response_head_bytes": 4096}
        )
        assert httpx.get(proxy.url + "/big-3000", timeout=5).status_code == 200
        assert httpx.get(proxy.url + "/big-5000", timeout=5).status_code == 502
    finally:
        backend.stop()


# --- item 17 (the upstream half): the read deadline starts when the request is written ------------------


class EchoLengthBackend(RawServer):
    """Reads each request's whole body, ``rate`` bytes a second at most, then answers with its
    length."""

    def __init__(self, rate: int = 0) -> None:
        self.rate = rate
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                try:
                    got = read_request_head(conn, buffer)
                    if got is None:
                        return
                    head, buffer = got
                    left = content_length(head) - len(buffer)
                    size = len(buffer)
                    while left > 0:
                        chunk = conn.recv(min(left, 16384))
                        if not chunk:
                            return
                        size += len(chunk)
                        left -= len(chunk)
                        if self.rate:
                            time.sleep(len(chunk) / self.rate)
                    buffer = b""
                    body = b"%d" % size
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                except OSError:
                    return


def test_a_slow_upload_is_not_the_backends_silence(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    """The client takes 1.5 s to send its body (well above the minimum rate); the backend answers
    as soon as it has it. A 0.5 s read timeout counts from the end of the request, not its start."""
    backend = EchoLengthBackend()
    try:
        proxy = one_backend_proxy(proxy_factory, backend.url, redis_url, "slowup:", read_timeout_seconds=0.5)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 200000\r\n\r\n" + b"x" * 100_000)
            for _ in range(10):
                time.sleep(0.15)
                sock.sendall(b"x" * 10_000)
            reply = b""
            while not reply.endswith(b"200000"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
        assert reply.endswith(b"\r\n\r\n200000")
    finally:
        backend.stop()


@pytest.mark.slow
def test_a_backend_that_reads_the_body_slowly_is_fine(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    """The backend reads 24 MB at about 4 MB/s: the proxy's writes wait on it for far longer than
    the 2.5 s read timeout in all (each wait is short), and what the kernel still holds once the
    request is written (a few MB) is read well within it. Before, the read deadline ran from the
    start of the upload: 504 after 2.5 s."""
    backend = EchoLengthBackend(rate=4_000_000)
    try:
        proxy = one_backend_proxy(
            proxy_factory, backend.url, redis_url, "slowread:", read_timeout_seconds=2.5
        )
        body = b"y" * 24_000_000
        reply = httpx.post(proxy.url + "/up", content=body, timeout=30)
        assert (reply.status_code, reply.text) == (200, "24000000")
    finally:
        backend.stop()

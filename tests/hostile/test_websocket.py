"""Hostile input on the WebSocket path: bad client handshakes, frames that break the masking and
size rules, and backends that answer the upgrade wrongly. Raw sockets on both sides."""

from __future__ import annotations

import base64
import hashlib
import os
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.hostile.rawhttp import parse
from tests.rawserver import RawServer, read_request_head
from tests.support import ProxyProcess, metric_value, wait_until
from tests.wsbackend import WsBackend

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def upgrade(path: bytes = b"/echo", key: bytes | None = b"dGhlIHNhbXBsZSBub25jZQ==", version: bytes = b"13",
            extra: bytes = b"") -> bytes:  # fmt: skip
    head = b"GET %s HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" % path
    if key is not None:
        head += b"Sec-WebSocket-Key: %s\r\n" % key
    return head + b"Sec-WebSocket-Version: %s\r\n%s\r\n" % (version, extra)


def frame(
    opcode: int, payload: bytes, mask: bool = True, fin: bool = True, length: int | None = None
) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, (0x80 if mask else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_head(sock: socket.socket) -> tuple[int, bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        if not chunk:
            break
        raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    reply = parse(head + b"\r\n\r\n", False)
    return reply.status, rest


def read_frame(sock: socket.socket, buffered: bytes = b"") -> tuple[int, bytes]:
    data = buffered
    while True:
        if len(data) >= 2:
            opcode, n = data[0] & 0x0F, data[1] & 0x7F
            offset = 2
            if n == 126:
                n, offset = struct.unpack("!H", data[2:4])[0], 4
            elif n == 127:
                n, offset = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) >= offset + n:
                return opcode, data[offset : offset + n]
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0])


class RawUpgradeServer(RawServer):
    """Answers each upgrade request with ``answer(target, key)`` as raw bytes, then holds the
    connection open until the proxy closes it."""

    def __init__(self, answer: Callable[[bytes, bytes], bytes]) -> None:
        self.answer = answer
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            got = read_request_head(conn)
            if got is None:
                return
            lines = got[0].split(b"\r\n")
            key = next((line.split(b":", 1)[1].strip() for line in lines
                        if line.lower().startswith(b"sec-websocket-key:")), b"")  # fmt: skip
            conn.sendall(self.answer(lines[0].split(b" ")[1], key))
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                return


@pytest.fixture()
def ws_edge(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> Iterator[tuple[ProxyProcess, WsBackend, RawUpgradeServer]]:
    """A proxy with a real WebSocket backend as v1 and a raw, misbehaving one as v2."""
    v1 = WsBackend("v1").start()
    v2 = RawUpgradeServer(_bad_backend)
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, split_key=f"wsh{uuid.uuid4().hex[:8]}:split",
        websocket={"max_message_bytes": 4096, "handshake_timeout_seconds": 1.0},
    )  # fmt: skip
    yield proxy, v1, v2
    v1.stop()
    v2.stop()


def _bad_backend(target: bytes, key: bytes) -> bytes:
    good = base64.b64encode(hashlib.sha1(key + GUID).digest())
    if target == b"/badkey":
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
               b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"  # fmt: skip
    if target == b"/silent":  # accepts the connection, never answers the upgrade
        return b""
    if target == b"/nokey":
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    if target == b"/evil":
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: Upgrade\r\n\r\nRAW"
    if target == b"/first-frame":  # a valid 101 and the first message in the same packet
        first = frame(0x1, b"hello first", mask=False)
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
               b"Sec-WebSocket-Accept: %s\r\n\r\n%s" % (good, first)  # fmt: skip
    if target == b"/sink":  # a valid 101, then reads everything and answers nothing (not even pings)
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
               b"Sec-WebSocket-Accept: %s\r\n\r\n" % good  # fmt: skip
    if target == b"/protocol":  # a subprotocol the client never offered
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
               b"Sec-WebSocket-Protocol: admin\r\nSec-WebSocket-Accept: %s\r\n\r\n" % good  # fmt: skip
    # a valid 101, then a masked frame (a server must never mask)
    return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
           b"Sec-WebSocket-Accept: %s\r\n\r\n%s" % (good, frame(0x1, b"masked by a server"))  # fmt: skip


def rejected(proxy: ProxyProcess, reason: str) -> float:
    return metric_value(httpx.get(proxy.admin + "/metrics", timeout=5).text,
                        "strangler_rejected_requests_total", reason=reason)  # fmt: skip


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(upgrade(key=None), id="no-key"),
        pytest.param(upgrade(key=b"short"), id="bad-key"),
        pytest.param(upgrade(version=b"8"), id="old-version"),
    ],
)
def test_bad_client_handshakes_are_400_and_reach_no_backend(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer], request_bytes: bytes
) -> None:
    proxy, v1, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        status, _ = read_head(sock)
    assert status == 400
    assert v1.connections == 0
    assert rejected(proxy, "bad_websocket_handshake") == 1


def test_unmasked_client_frame_is_a_protocol_error(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer],
) -> None:
    proxy, _, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        # frames sent in the same write as the upgrade request are kept and relayed after the 101
        sock.sendall(upgrade() + frame(0x1, b"early"))
        status, rest = read_head(sock)
        assert status == 101
        opcode, payload = read_frame(sock, rest)
        assert (opcode, payload) == (0x1, b"early")
        sock.sendall(frame(0x1, b"not masked", mask=False))
        opcode, payload = read_frame(sock)
        assert opcode == 0x8 and close_code(payload) == 1002


def test_oversized_frame_is_refused_from_its_header(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer],
) -> None:
    proxy, _, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(upgrade())
        status, rest = read_head(sock)
        assert status == 101
        # claims 2**40 bytes: refused at once, without waiting for (or buffering) the payload
        sock.sendall(frame(0x2, b"", length=2**40)[:14])
        opcode, payload = read_frame(sock, rest)
        assert opcode == 0x8 and close_code(payload) == 1009
        # and fragments that add up past the limit are refused too
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(upgrade())
        status, rest = read_head(sock)
        sock.sendall(frame(0x2, b"a" * 3000, fin=False) + frame(0x0, b"b" * 3000))
        opcode, payload = read_frame(sock, rest)
        assert opcode == 0x8 and close_code(payload) == 1009


@pytest.mark.parametrize("path", [b"/badkey", b"/nokey", b"/evil", b"/protocol"])
def test_backend_with_an_invalid_101_gives_the_client_502_never_a_101(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer], path: bytes
) -> None:
    proxy, _, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(upgrade(path, extra=b"X-Strangler-Version: v2\r\nSec-WebSocket-Protocol: chat\r\n"))
        status, body = read_head(sock)
    assert status == 502
    assert b"invalid websocket handshake from upstream" in body
    text = httpx.get(proxy.admin + "/metrics", timeout=5).text
    assert metric_value(text, "strangler_websocket_handshake_failures_total", version="v2") == 1
    assert metric_value(text, "strangler_websocket_connections_total", version="v2") == 0


def test_masked_frame_from_the_backend_closes_the_client_with_1011(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer],
) -> None:
    proxy, _, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(upgrade(b"/masked", extra=b"X-Strangler-Version: v2\r\n"))
        status, rest = read_head(sock)
        assert status == 101, rest
        opcode, payload = read_frame(sock, rest)
        assert opcode == 0x8 and close_code(payload) == 1011
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = httpx.get(proxy.admin + "/metrics", timeout=5).text
        if metric_value(text, "strangler_websocket_closed_total", version="v2", code="1011") == 1:
            break
        time.sleep(0.05)
    assert metric_value(text, "strangler_websocket_open_connections", version="v2") == 0


def test_backend_that_never_answers_the_upgrade_is_a_504(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer],
) -> None:
    proxy, _, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(upgrade(b"/silent", extra=b"X-Strangler-Version: v2\r\n"))
        status, _ = read_head(sock)
    assert status == 504
    text = httpx.get(proxy.admin + "/metrics", timeout=5).text
    assert (
        metric_value(text, "strangler_websocket_handshake_failures_total", version="v2", reason="timeout")
        == 1
    )


def test_first_frame_in_the_same_packet_as_the_101_reaches_the_client(
    ws_edge: tuple[ProxyProcess, WsBackend, RawUpgradeServer],
) -> None:
    proxy, _, _ = ws_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=3) as sock:
        sock.sendall(upgrade(b"/first-frame", extra=b"X-Strangler-Version: v2\r\n"))
        status, rest = read_head(sock)
        assert status == 101, rest
        assert read_frame(sock, rest) == (0x1, b"hello first")


# --- control-frame floods: automatic answers (pongs) obey backpressure --------------------------------

FLOOD_BYTES = 20 * 1024 * 1024
FLOOD_GROWTH_LIMIT = 10 * 1024 * 1024  # what the proxy may grow by while taking in FLOOD_BYTES
EMPTY_FLOOD_GROWTH_LIMIT = 3 * 1024 * 1024  # ... when it is all empty frames


def zero_masked(opcode: int, payload: bytes) -> bytes:
    """A client frame masked with the all-zero key: valid masking, and no XOR to compute."""
    assert len(payload) < 126
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + b"\0\0\0\0" + payload


def send_until_stalled(sock: socket.socket, data: bytes, stall: float = 1.0) -> int:
    """Send ``data`` until all is sent or the peer took nothing for ``stall`` seconds; bytes sent."""
    view = memoryview(data)
    sent = 0
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while sent < len(data):
            _, writable, _ = select.select([], [sock], [], stall)
            if not writable:
                break
            try:
                sent += sock.send(view[sent : sent + (1 << 20)])
            except BlockingIOError:
                continue
    finally:
        sock.settimeout(timeout)
    return sent


class Reader(threading.Thread):
    """Reads a socket until it closes, noting when ``marker`` went by."""

    def __init__(self, sock: socket.socket, marker: bytes = b"\xff") -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.marker = marker
        self.received = 0
        self.found = threading.Event()

    def run(self) -> None:
        tail = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            self.received += len(chunk)
            if self.marker in tail + chunk:
                self.found.set()
            tail = chunk[-len(self.marker) :]


class StuckBackend(RawServer):
    """Accepts the upgrade (a valid 101), sends ``then`` (counting what the proxy took) and never
    reads a byte: its receive buffer is kept small, so what the proxy writes to it stays with the proxy."""

    def __init__(self, then: bytes = b"") -> None:
        self.then = then
        self.sent = 0
        super().__init__()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def serve(self, conn: socket.socket) -> None:
        with conn:
            got = read_request_head(conn)
            if got is None:
                return
            key = next((line.split(b":", 1)[1].strip() for line in got[0].split(b"\r\n")
                        if line.lower().startswith(b"sec-websocket-key:")), b"")  # fmt: skip
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept)  # fmt: skip
            view = memoryview(self.then)
            try:
                while self.sent < len(view):
                    self.sent += conn.send(view[self.sent : self.sent + 65536])
                while not self._stopping:
                    time.sleep(0.1)
            except OSError:
                return


def small_window_client(port: int) -> socket.socket:
    """A client socket whose receive buffer is small: what the proxy writes to it stays with the proxy."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def settled_growth(proxy: ProxyProcess, before: int) -> int:
    time.sleep(0.5)  # what the proxy already read is handled
    return proxy.rss() - before


def test_ping_flood_from_a_client_that_never_reads_keeps_memory_bounded(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    sink = RawUpgradeServer(_bad_backend)  # takes every ping, answers none: only the proxy's pongs
    proxy = proxy_factory(
        process=True, v1_url=sink.url, v2_url=sink.url, redis_url=redis_url,
        split_key=f"wsh{uuid.uuid4().hex[:8]}:split",
    )  # fmt: skip
    try:
        with small_window_client(proxy.port) as sock:
            sock.sendall(upgrade(b"/sink"))
            status, rest = read_head(sock)
            assert status == 101 and rest == b""
            ping = zero_masked(0x9, b"p" * 125)
            flood = ping * (FLOOD_BYTES // len(ping))
            before = proxy.rss()
            sent = send_until_stalled(sock, flood)
            grown = settled_growth(proxy, before)
            assert grown < FLOOD_GROWTH_LIMIT, (grown, sent)
            # the connection still works: once the client reads its pongs, the proxy reads on
            reader = Reader(sock, b"\x8a\x04last")
            reader.start()
            sock.sendall(flood[sent : sent + (-sent % len(ping))] + zero_masked(0x9, b"last"))
            assert reader.found.wait(30), reader.received
    finally:
        sink.stop()


def test_ping_flood_from_a_backend_that_never_reads_keeps_memory_bounded(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    ping = frame(0x9, b"p" * 125, mask=False)
    backend = StuckBackend(then=ping * (FLOOD_BYTES // len(ping)))
    proxy = proxy_factory(
        process=True, v1_url=backend.url, v2_url=backend.url, redis_url=redis_url,
        split_key=f"wsh{uuid.uuid4().hex[:8]}:split",
    )  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(upgrade(b"/flood"))
            status, _ = read_head(sock)
            assert status == 101
            before = proxy.rss()
            reader = Reader(sock)  # the client reads every ping passed on to it
            reader.start()
            wait_until(lambda: backend.sent > 0, timeout=5)
            last = -1
            while backend.sent != last and backend.sent < len(backend.then):  # until it stalls or ends
                last = backend.sent
                time.sleep(1.0)
            grown = settled_growth(proxy, before)
            assert grown < FLOOD_GROWTH_LIMIT, (grown, backend.sent)
            assert reader.received > 0
    finally:
        backend.stop()


def test_empty_frames_toward_a_backend_that_never_reads_keep_memory_bounded(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> None:
    # an empty frame is 6 bytes on the wire and a parsed object in the proxy: queued frames must
    # be counted by what they cost, not by their payload (0), or the queue never says "full"
    backend = StuckBackend()
    proxy = proxy_factory(
        process=True, v1_url=backend.url, v2_url=backend.url, redis_url=redis_url,
        split_key=f"wsh{uuid.uuid4().hex[:8]}:split",
    )  # fmt: skip
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(upgrade(b"/stuck"))
            status, _ = read_head(sock)
            assert status == 101
            empty = zero_masked(0x1, b"")
            flood = empty * (FLOOD_BYTES // len(empty))
            before = proxy.rss()
            sent = send_until_stalled(sock, flood)
            grown = settled_growth(proxy, before)
            # about 1 MiB; 5 MiB when a whole read (256 KiB: 40,000 frames) is parsed at once;
            # 19 MiB, growing with the flood, when the queue counts payload only
            assert grown < EMPTY_FLOOD_GROWTH_LIMIT, (grown, sent)
    finally:
        backend.stop()


# --- closing handshakes that go wrong ---------------------------------------------------------------


class CloseRecorder(RawUpgradeServer):
    """A valid 101, then reads to the end without ever answering (no close echo); records what the
    proxy sent and when the proxy dropped the connection."""

    def __init__(self) -> None:
        self.received = b""
        self.ended = threading.Event()
        super().__init__(_bad_backend)

    def serve(self, conn: socket.socket) -> None:
        with conn:
            got = read_request_head(conn)
            if got is None:
                return
            key = next((line.split(b":", 1)[1].strip() for line in got[0].split(b"\r\n")
                        if line.lower().startswith(b"sec-websocket-key:")), b"")  # fmt: skip
            conn.sendall(self.answer(b"/sink", key))
            conn.settimeout(10)
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
            except OSError:
                pass
            self.ended.set()


def unmask(data: bytes) -> tuple[int, bytes]:
    """The first frame of what a client (the proxy, upstream) sent: opcode and unmasked payload."""
    opcode, n = data[0] & 0x0F, data[1] & 0x7F
    key, payload = data[2:6], data[6 : 6 + n]
    return opcode, bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@pytest.fixture()
def close_edge(
    proxy_factory: Callable[..., ProxyProcess], redis_url: str
) -> Iterator[tuple[ProxyProcess, CloseRecorder]]:
    backend = CloseRecorder()
    proxy = proxy_factory(
        v1_url=backend.url, v2_url=backend.url, redis_url=redis_url,
        split_key=f"wsh{uuid.uuid4().hex[:8]}:split", websocket={"close_timeout_seconds": 0.5},
    )  # fmt: skip
    yield proxy, backend
    backend.stop()


def ws_metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    return metric_value(httpx.get(proxy.admin + "/metrics", timeout=5).text, name, **labels)


def test_backend_that_never_answers_the_close_is_dropped_after_the_close_timeout(
    close_edge: tuple[ProxyProcess, CloseRecorder],
) -> None:
    proxy, backend = close_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(upgrade(b"/sink"))
        status, rest = read_head(sock)
        assert status == 101
        sock.sendall(frame(0x8, struct.pack("!H", 4000) + b"bye"))
        opcode, payload = read_frame(sock, rest)  # the client's handshake completes at once
        assert opcode == 0x8 and close_code(payload) == 4000
        assert sock.recv(65536) == b""  # and its connection is closed by the proxy
        started = time.monotonic()
        assert backend.ended.wait(5)  # the silent backend is dropped after close_timeout_seconds
        assert time.monotonic() - started < 3
    assert unmask(backend.received) == (0x8, struct.pack("!H", 4000) + b"bye")  # passed on as sent
    wait_until(lambda: ws_metric(proxy, "strangler_websocket_open_connections", version="v1") == 0, timeout=5)
    assert ws_metric(proxy, "strangler_websocket_closed_total", version="v1", code="4xxx") == 1


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param(struct.pack("!H", 1005), 1002, id="reserved-code-1005"),
        pytest.param(struct.pack("!H", 999), 1002, id="code-999"),
        pytest.param(struct.pack("!H", 5000), 1002, id="code-5000"),
        pytest.param(b"\x03", 1002, id="one-byte-payload"),
        pytest.param(struct.pack("!H", 1000) + b"\xff\xfe", 1007, id="reason-not-utf8"),
    ],
)
def test_invalid_close_frame_from_the_client_is_refused_and_never_passed_on(
    close_edge: tuple[ProxyProcess, CloseRecorder], payload: bytes, code: int
) -> None:
    proxy, backend = close_edge
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(upgrade(b"/sink"))
        status, rest = read_head(sock)
        assert status == 101
        sock.sendall(frame(0x8, payload))
        opcode, answer = read_frame(sock, rest)
        assert opcode == 0x8 and close_code(answer) == code  # 1002 protocol error, 1007 bad UTF-8
    assert backend.ended.wait(5)
    # the backend is told the client went away (1001), never handed the invalid frame
    assert unmask(backend.received) == (0x8, struct.pack("!H", 1001) + b"client gone")
    label = str(code)
    wait_until(
        lambda: ws_metric(proxy, "strangler_websocket_closed_total", version="v1", code=label) == 1, timeout=5
    )

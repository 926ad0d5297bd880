"""A graceful stop loses no request (neither queued connections nor requests in flight): real
proxy processes, SIGTERM, raw keep-alive clients.

What "lost" means here: a request the proxy accepted bytes of and never answered. From the
client's side: a request written on a connection that the kernel had accepted (connect()
succeeded, so a connection still waiting in the listen queue counts) that got no complete answer.
A connect() refused because the listener is closed is not a loss: nothing was accepted, and the
client knows it (as it knows a ``Connection: close`` answer means "ask elsewhere").
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.support import ProxyProcess, wait_until

SLOW = b"GET /slow?ms=100 HTTP/1.1\r\nHost: app.test\r\n\r\n"


@dataclass
class Answer:
    status: int
    close: bool
    at: float
    connection: int


def read_answer(sock: socket.socket) -> tuple[int, bool] | None:
    """One sized answer: (status, says close), or None if the connection ended before it was complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        body += chunk
    return int(lines[0].split()[1]), headers.get(b"connection", b"").lower() == b"close"


@dataclass
class Client:
    """Sends requests back to back on a keep-alive connection; reconnects after a close answer;
    stops when the listener refuses it."""

    port: int
    request: bytes = SLOW
    answers: list[Answer] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    refused: bool = False

    def run(self, until: float) -> None:
        connection = 0
        while time.monotonic() < until:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            except ConnectionRefusedError:
                self.refused = True
                return
            connection += 1
            with sock:
                while time.monotonic() < until:
                    try:
                        sock.sendall(self.request)
                    except OSError as exc:
                        self.lost.append(f"connection {connection}: send failed: {exc!r}")
                        break
                    answer = read_answer(sock)
                    if answer is None:
                        self.lost.append(f"connection {connection}: closed before a complete answer")
                        break
                    self.answers.append(Answer(answer[0], answer[1], time.monotonic(), connection))
                    if answer[1]:
                        break


def _run_clients(proxy: ProxyProcess, count: int, before: float) -> tuple[list[Client], float]:
    """``count`` clients run for ``before`` seconds, then the proxy gets SIGTERM; returns when all
    have stopped (refused by the closed listener), and when the signal was sent."""
    clients = [Client(proxy.port) for _ in range(count)]
    until = time.monotonic() + 30
    threads = [threading.Thread(target=c.run, args=(until,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    time.sleep(before)
    assert proxy.process is not None
    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(20)
    return clients, signalled


@pytest.mark.parametrize("workers", [1, 2])
def test_keep_alive_clients_lose_nothing_and_are_told_to_close(
    start_proxy: Callable[..., ProxyProcess], workers: int
) -> None:
    """Item 4: 8 clients sending back to back; SIGTERM. Every request gets a complete answer; the
    answer in flight and every later one say ``Connection: close`` (so at most one answer per
    connection after the signal lacks it: the one whose head had left before the signal); then
    the clients are refused at connect, and the proxy exits on its own."""
    proxy = start_proxy(process=True, workers=workers, drain_timeout_seconds=10)
    clients, signalled = _run_clients(proxy, 8, before=1.0)
    assert proxy.process is not None
    proxy.process.wait(10)
    assert proxy.process.returncode == 0, proxy.output()[-2000:]
    for client in clients:
        assert client.lost == [], client.lost
        assert client.refused
        assert all(a.status == 200 for a in client.answers)
        after = [a for a in client.answers if a.at > signalled]
        assert after, "no answer after the signal: the drain ended the requests in flight"
        by_connection: dict[int, list[Answer]] = {}
        for answer in after:
            by_connection.setdefault(answer.connection, []).append(answer)
        for answers in by_connection.values():
            assert answers[-1].close  # the proxy closed no connection without saying so
            assert sum(not a.close for a in answers) <= 1, [(a.close, a.at - signalled) for a in answers]


def test_a_connection_idle_at_the_signal_may_send_one_more_request(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """An idle keep-alive connection gets ``drain_idle_grace_seconds`` for one more request,
    answered with ``Connection: close``; one that stays idle is closed after the grace."""
    proxy = start_proxy(process=True, limits={"drain_idle_grace_seconds": 1.0})
    busy, idle = (socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(2))
    with busy, idle:
        for sock in (busy, idle):
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
            assert read_answer(sock) == (200, False)
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        busy.sendall(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert read_answer(busy) == (200, True)
        assert busy.recv(10) == b""
        started = time.monotonic()
        assert idle.recv(10) == b""  # closed, without an answer it never asked for
        assert time.monotonic() - started < 2
    proxy.process.wait(5)


def test_a_second_signal_ends_the_drain_at_once(start_proxy: Callable[..., ProxyProcess]) -> None:
    """The drain waits for the answer in flight (here 4 s away) up to ``drain_timeout_seconds``;
    a second SIGTERM ends it at once."""
    proxy = start_proxy(process=True, drain_timeout_seconds=30)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /slow?ms=4000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        time.sleep(0.3)
        assert proxy.process is not None
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.process.poll() is None  # draining: the slow answer is awaited
        proxy.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proxy.process.wait(10)
        assert time.monotonic() - started < 2.0


def test_the_drain_ends_when_nothing_is_in_flight(start_proxy: Callable[..., ProxyProcess]) -> None:
    proxy = start_proxy(process=True, drain_timeout_seconds=30)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET /slow?ms=500 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        time.sleep(0.2)
        assert proxy.process is not None
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        assert read_answer(sock) == (200, True)
        proxy.process.wait(10)
        assert time.monotonic() - signalled < 3.0


@pytest.mark.parametrize("workers", [1, 2])
def test_connections_in_the_listen_queue_are_answered_not_reset(
    start_proxy: Callable[..., ProxyProcess], workers: int
) -> None:
    """Item 18: connections the kernel accepted but no worker took yet (the proxy is frozen while
    they arrive) each get an answer when the stop comes, not a reset (before: 37 and 35 of 40 reset)."""
    proxy = start_proxy(process=True, workers=workers)
    assert proxy.process is not None
    import psutil

    pids = [proxy.process.pid, *(c.pid for c in psutil.Process(proxy.process.pid).children())]
    for pid in pids:
        psutil.Process(pid).suspend()
    socks = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
            socks.append(sock)
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    finally:
        for pid in pids:
            psutil.Process(pid).resume()
    answers = [read_answer(sock) for sock in socks]
    for sock in socks:
        sock.close()
    # each one answered; with "close" unless a worker took it before it saw the signal
    statuses = [answer[0] if answer else None for answer in answers]
    assert statuses == [200] * 40, f"{statuses.count(None)} of 40 not answered: {answers}"
    wait_until(lambda: proxy.process is not None and proxy.process.poll() is not None, timeout=10)


def test_a_stop_while_workers_start_answers_what_their_sockets_queued(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """Each worker's listening socket exists (and the kernel queues connections on it) from before
    the fork, so a worker still starting up (importing, connecting to Redis) already holds
    connections. A SIGTERM then must not kill it by the default action, resetting them (before: the
    listen-queue test above lost one worker's share, about 20 of 40, whenever /health was answered
    by the other worker while this one was still starting): it finishes starting, then drains."""
    proxy = start_proxy(process=True, workers=2, wait=False)
    assert proxy.process is not None

    def connect() -> socket.socket:  # refused until the parent listens, queued from then on
        return socket.create_connection(("127.0.0.1", proxy.port), timeout=15)

    socks = [wait_until(connect, timeout=20, interval=0.005, message="the listener")]
    socks += [connect() for _ in range(39)]
    for sock in socks:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
    proxy.process.send_signal(signal.SIGTERM)  # the workers are still importing, well before /health
    answers = [read_answer(sock) for sock in socks]
    for sock in socks:
        sock.close()
    statuses = [answer[0] if answer else None for answer in answers]
    assert statuses == [200] * 40, f"{statuses.count(None)} of 40 not answered: {answers}"
    proxy.process.wait(15)
    assert proxy.process.returncode == 0, proxy.output()[-2000:]


def test_websockets_get_1001_after_their_grace(start_proxy: Callable[..., ProxyProcess]) -> None:
    """A relayed WebSocket is told 1001 ("going away") once ``websocket.drain_grace_seconds`` has
    passed (bounded so the closing handshake fits in the drain), not at the signal."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from tests.wsbackend import WsBackend

    backend = WsBackend("v1").start()
    try:
        proxy = start_proxy(process=True, v1_url=backend.url, v2_url=backend.url,
                            websocket={"drain_grace_seconds": 1.0})  # fmt: skip
        with connect(
            proxy.url.replace("http://", "ws://") + "/echo", open_timeout=10, compression=None
        ) as ws:
            ws.send("a")
            assert ws.recv(timeout=5) == "a"
            assert proxy.process is not None
            signalled = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.send("b")  # the relay still works during the grace
                    assert ws.recv(timeout=5) == "b"
                    time.sleep(0.1)
            waited = time.monotonic() - signalled
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert 0.9 <= waited < 4, waited
        proxy.process.wait(10)
    finally:
        backend.stop()

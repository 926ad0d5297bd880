"""Clients that vanish or crawl: the proxy lets go of the upstream side, counts it, and keeps
serving everyone else."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from tests.faults.load import Load, established_to, loop_tasks, requests_total
from tests.support import Backend, ProxyProcess, wait_until

HEAD = b"Host: app.test\r\n"


def test_clients_disconnecting_mid_upload(proxy: ProxyProcess, v1v2: tuple[Backend, Backend]) -> None:
    """10 MB promised, 1 MB sent, then gone: the upstream request is abandoned, not left hanging."""
    v1, _ = v1v2
    before = proxy.metric("strangler_client_disconnects_total", stage="request")
    errors_before = proxy.metric("strangler_upstream_errors_total")
    tasks_before = loop_tasks(proxy)
    with Load(proxy.url + "/echo", workers=2, seconds=2.0) as load:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(b"POST /upload HTTP/1.1\r\n" + HEAD + b"Content-Length: 10000000\r\n\r\n")
                sock.sendall(b"u" * 1_000_000)
                time.sleep(0.05)
        # ordinary traffic runs until the proxy has handled every abandoned upload, then stops
        wait_until(lambda: proxy.metric("strangler_client_disconnects_total", stage="request") - before == 5,
                   timeout=10, message="every abandoned upload counted")  # fmt: skip
        wait_until(lambda: len(load.outcomes) >= 20, timeout=10, message="ordinary traffic ran beside")
        load.stop()
    assert load.outcomes and load.failures() == []
    assert proxy.metric("strangler_upstream_errors_total") == errors_before, "not the backend's fault"
    wait_until(lambda: established_to(proxy, v1.port) <= 2, timeout=10, message="upload connections released")
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


def test_clients_disconnecting_mid_download(proxy: ProxyProcess, v1v2: tuple[Backend, Backend]) -> None:
    """50 MB answers abandoned after 1 MB: the upstream connection is closed, not parked half-read."""
    v1, _ = v1v2
    before = proxy.metric("strangler_client_disconnects_total", stage="response")
    tasks_before = loop_tasks(proxy)
    with Load(proxy.url + "/echo", workers=2, seconds=2.0) as load:
        for chunked in (b"0", b"1") * 3:
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(
                    b"GET /stream?bytes=50000000&sized=" + chunked + b" HTTP/1.1\r\n" + HEAD + b"\r\n"
                )
                received = 0
                while received < 1_000_000:
                    chunk = sock.recv(65536)
                    assert chunk, "the proxy closed a healthy download"
                    received += len(chunk)
        # ordinary traffic runs until the proxy has handled every abandoned download, then stops
        wait_until(lambda: proxy.metric("strangler_client_disconnects_total", stage="response") - before == 6,
                   timeout=15, message="every abandoned download counted")  # fmt: skip
        wait_until(lambda: len(load.outcomes) >= 20, timeout=10, message="ordinary traffic ran beside")
        load.stop()
    assert load.outcomes and load.failures() == []
    wait_until(
        lambda: established_to(proxy, v1.port) <= 2, timeout=10, message="download connections released"
    )
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


def test_slowloris_is_closed_after_the_header_timeout_and_blocks_nobody(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
                          limits={"header_timeout_seconds": 1.5})  # fmt: skip
    before = proxy.metric("strangler_rejected_requests_total", reason="header_timeout")
    tasks_before = loop_tasks(proxy)
    request = b"GET /echo HTTP/1.1\r\n" + HEAD + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n"
    slow: list[socket.socket] = []
    closed_after: dict[int, float] = {}
    answers: dict[int, bytes] = {}

    def crawl(index: int, sock: socket.socket) -> None:
        """One byte a second (a bit faster here, to keep the test short) until the proxy hangs up."""
        opened = time.monotonic()
        sock.settimeout(0.25)
        for byte in request:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            answers[index] = data
            break
        closed_after[index] = time.monotonic() - opened

    threads = []
    for index in range(15):
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        slow.append(sock)
        threads.append(threading.Thread(target=crawl, args=(index, sock), daemon=True))
    idle = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(5)]  # never send a byte
    for thread in threads:
        thread.start()
    with Load(proxy.url + "/echo", workers=3, seconds=2.5) as load:
        pass
    for thread in threads:
        thread.join(15)
    assert load.outcomes and load.failures() == [], "slow clients must not block the others"
    assert len(closed_after) == 15
    assert all(seconds < 10 for seconds in closed_after.values()), closed_after
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers.values()), answers
    for sock in idle:
        sock.settimeout(10)
        assert sock.recv(100) == b"", "an idle connection is closed after the header timeout"
    for sock in slow + idle:
        sock.close()
    timed_out = lambda: proxy.metric("strangler_rejected_requests_total", reason="header_timeout")  # noqa: E731
    wait_until(lambda: timed_out() - before == 20, timeout=5, message="every slow or idle client counted")
    assert requests_total(proxy, code="200") >= len(load.outcomes)
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


def test_stalled_upload_is_cut_after_the_body_timeout(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    """Headers, ten bytes of a promised thousand, then silence: 408 and closed, the upstream
    request abandoned (a stalled upload must not hold a pooled connection forever)."""
    v1, v2 = v1v2
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
                          limits={"body_timeout_seconds": 1.0})  # fmt: skip
    before = proxy.metric("strangler_rejected_requests_total", reason="body_timeout")
    tasks_before = loop_tasks(proxy)
    stalled = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.sendall(b"POST /upload HTTP/1.1\r\n" + HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
        stalled.append(sock)
    with Load(proxy.url + "/echo", workers=2, seconds=1.5) as load:
        pass
    assert load.outcomes and load.failures() == []
    for sock in stalled:
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        sock.close()
    timed_out = lambda: proxy.metric("strangler_rejected_requests_total", reason="body_timeout")  # noqa: E731
    assert timed_out() - before == 4
    wait_until(lambda: established_to(proxy, v1.port) <= 2, timeout=10, message="upload connections released")
    wait_until(lambda: loop_tasks(proxy) <= tasks_before + 2, timeout=10, message="no task left behind")


def test_a_slow_backend_reading_an_upload_is_not_a_stalled_client(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    """When we stop reading because the upstream is slow (backpressure), the body timer must not
    blame the client: a big upload to a backend that sleeps first still completes."""
    v1, v2 = v1v2
    v1.control(delay_ms=1500)
    try:
        proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis_url,
                              limits={"body_timeout_seconds": 0.5})  # fmt: skip
        body = b"b" * 8_000_000
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\n" + HEAD + b"Connection: close\r\n"
                         + b"Content-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    finally:
        v1.control(delay_ms=0)


def test_stop_ends_after_the_drain_timeout_though_a_client_never_reads(
    start_proxy: Callable[..., ProxyProcess],
) -> None:
    """A client that asked for a large answer and stopped reading must not hold the shutdown: at
    the drain deadline its connection is aborted (a close would wait to flush, forever)."""
    proxy = start_proxy(drain_timeout_seconds=1)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /stream?bytes=200000000&sized=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.recv(1024)  # the answer has started; from now on nothing is read
        started = time.monotonic()
        proxy.stop()  # fails with where it hung if the shutdown does not finish
        assert time.monotonic() - started < 1 + 3
    finally:
        sock.close()

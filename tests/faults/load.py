"""Bounded background load through the proxy, and the counters the fault tests assert on."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

from tests.rawserver import RawServer, read_request_head
from tests.support import ProxyProcess


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0 when the client saw an error instead of an answer
    version: str
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """``workers`` threads, each with a keep-alive client, until ``seconds`` or ``max_requests``."""

    url: str
    workers: int = 4
    seconds: float = 3.0
    max_requests: int = 4000
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "GET"
    timeout: float = 10.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)
        ]

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.join()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(self.seconds + self.timeout + 5)
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, index: int) -> None:
        deadline = self.t0 + self.seconds
        with httpx.Client(
            timeout=self.timeout, headers={"X-User-ID": f"load-{index}", **self.headers}
        ) as client:
            while time.monotonic() < deadline and not self._stop.is_set():
                with self._lock:
                    if len(self.outcomes) >= self.max_requests:
                        return
                started = time.monotonic()
                try:
                    response = client.request(self.method, self.url)
                    outcome = Outcome(started, time.monotonic(), response.status_code,
                                      response.headers.get("x-api-version", ""))  # fmt: skip
                except httpx.HTTPError as exc:
                    outcome = Outcome(started, time.monotonic(), 0, "", repr(exc))
                with self._lock:
                    self.outcomes.append(outcome)

    # --- reading the results -------------------------------------------------------------------

    def failures(self, when: Callable[[Outcome], bool] = lambda o: True) -> list[Outcome]:
        return [o for o in self.outcomes if when(o) and o.status != 200]

    def between(self, start: float, end: float) -> list[Outcome]:
        """Requests that started and ended inside [start, end] (monotonic seconds)."""
        return [o for o in self.outcomes if o.started >= start and o.ended <= end]


def established_to(proxy: ProxyProcess, port: int) -> int:
    """ESTABLISHED TCP connections from the proxy process (and its children) to ``port``; for a
    proxy in a thread, from this process (the test itself holds none to a backend meanwhile)."""
    root = psutil.Process(proxy.process.pid if proxy.process is not None else None)
    count = 0
    for proc in [root, *root.children(recursive=True)]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port == port:
                count += 1
    return count


def requests_total(proxy: ProxyProcess, **labels: str) -> float:
    return proxy.metric("http_requests_total", **labels)


class FixedAnswerServer(RawServer):
    """Answers every request with fixed bytes (then closes, or holds the connection 5 s)."""

    def __init__(self, answer: bytes, close: bool = True) -> None:
        self.answer = answer
        self.close = close
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if read_request_head(conn) is None:
                return
            conn.sendall(self.answer)
            if not self.close:
                time.sleep(5)
        except OSError:
            pass
        finally:
            conn.close()


def loop_tasks(proxy: ProxyProcess) -> float:
    """asyncio tasks alive in the proxy (the scrape's own task included)."""
    return proxy.metric("strangler_event_loop_tasks")

"""Test helpers for the canary end-to-end tests: traffic, webhook receivers, the CLI in-process."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from typer.testing import CliRunner

from tests.support import free_port

FAST_CANARY: dict[str, Any] = {
    "window_seconds": 2,
    "check_interval_seconds": 0.5,
    "flush_interval_seconds": 0.2,
    "consecutive_failures": 3,
    "leader_lock_ttl_seconds": 1.5,
    # a loaded 2-core machine gives small samples the odd slow request: only the latency test
    # (which sets its own floor) should fail on latency
    "thresholds": {"min_requests": 10, "p95_floor_seconds": 0.2},
    "notify_backoff_seconds": 0.1,
    "notify_timeout_seconds": 1.0,
    "notify_retries": 2,
}


def canary(**overrides: Any) -> dict[str, Any]:
    merged = {**FAST_CANARY, **overrides}
    merged["thresholds"] = {**FAST_CANARY["thresholds"], **overrides.get("thresholds", {})}
    return merged


class Traffic:
    """A bounded loop of requests with distinct X-User-ID values, in a background thread."""

    def __init__(
        self, urls: list[str], concurrency: int = 8, max_requests: int = 30000, path: str = "/t"
    ) -> None:
        self.urls = urls
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.path = path
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.failures = 0
        self._sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(*(self._worker(client, w) for w in range(self.concurrency)))

    async def _worker(self, client: httpx.AsyncClient, worker: int) -> None:
        while not self._stop.is_set() and self._sent < self.max_requests:
            self._sent += 1
            n = self._sent
            url = self.urls[n % len(self.urls)] + self.path
            try:
                response = await client.get(url, headers={"X-User-ID": f"user-{n}"})
                self.statuses[response.status_code] += 1
                self.versions[response.headers.get("x-api-version", "?")] += 1
            except httpx.HTTPError:
                self.failures += 1


class Receiver:
    """A local webhook receiver: records every POSTed JSON body with its path."""

    def __init__(self) -> None:
        received: list[tuple[str, Any]] = []
        self.received = received
        self.failing = False  # answer 503 (and record nothing) while set: a target that is down
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if outer.failing:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                received.append((self.path, json.loads(body or b"null")))
                self.send_response(202 if self.path == "/pd" else 200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status":"success"}')

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in list(self.received) if p == path]


class Blackhole:
    """Accepts connections and never answers (a receiver that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def close(self) -> None:
        self.sock.close()


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}/down"


def cli(*args: str) -> Any:
    """Run ``strangler ARGS`` in-process (the real typer app, real Redis)."""
    from proxy.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result

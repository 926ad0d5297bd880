"""Small real HTTP servers on 127.0.0.1 for the gate tests: a metrics answerer whose answer the
test changes at will (JSON, HTML, huge, slow, redirect), and a Prometheus exporter."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    delay: float = 0.0
    endless: bool = False  # chunked, never ending (until the client goes away)
    claimed_length: int | None = None  # a Content-Length that is not the body's
    barrier: threading.Barrier | None = None  # answer only once this many requests are in (else 503)


class AnswerServer:
    """Answers every GET with ``self.answer``; keeps the paths, queries and headers it saw."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.seen: list[tuple[str, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.seen.append((self.path, dict(self.headers.items())))
                answer = outer.answer
                if answer.delay:
                    time.sleep(answer.delay)
                status = answer.status
                if answer.barrier is not None:
                    try:
                        answer.barrier.wait()
                    except threading.BrokenBarrierError:
                        status = 503
                self.send_response(status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                try:
                    if answer.endless:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        chunk = b"[" * 65536
                        for _ in range(100_000):  # ~6.5 GB if nobody stops reading
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        return
                    length = answer.claimed_length if answer.claimed_length is not None else len(answer.body)
                    self.send_header("Content-Length", str(length))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(answer.body)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AnswerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Exporter(AnswerServer):
    """A Prometheus exporter of one business metric, ``shop_checkout_success_ratio{group=...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.set(1.0)

    def set(self, ratio: float) -> None:
        text = (
            "# HELP shop_checkout_success_ratio Share of checkouts that succeed.\n"
            "# TYPE shop_checkout_success_ratio gauge\n"
            f'shop_checkout_success_ratio{{group="default",version="v2"}} {ratio}\n'
        )
        self.answer = Answer(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4"})

"""A real WebSocket backend (v1 or v2) on 127.0.0.1, served by ``websockets`` in a thread.

Paths: ``/echo`` (echoes; ``whoami`` -> the version name; ``headers`` -> the upgrade request's
headers as JSON; ``close:<code>:<reason>`` -> closes with them; ``die`` -> drops the TCP
connection without a close frame; ``flood:<n>:<size>`` -> sends n binary messages as fast as the
proxy takes them), ``/refuse`` (answers the upgrade 403 with a body). The subprotocol chosen is
``chat.v2`` when offered, else the first offered.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Sequence
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol


class WsBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.server: Server | None = None
        self.thread: threading.Thread | None = None
        self.sent = 0  # flood messages handed to the socket so far
        self.connections = 0
        self.seen: list[dict[str, Any]] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.socket.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WsBackend:
        self.server = serve(
            self._handle, "127.0.0.1", 0, max_size=None, compression=None,
            process_request=self._process_request, select_subprotocol=_select,
        )  # fmt: skip
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        if self.thread is not None:
            self.thread.join(5)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/refuse"):
            body = b'{"error":"no entry","version":"%s"}' % self.name.encode()
            headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return Response(403, "Forbidden", headers, body)
        return None

    def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        request = ws.request
        assert request is not None
        self.seen.append({k.lower(): v for k, v in request.headers.raw_items()} | {"path": request.path})
        for message in ws:
            if message == "whoami":
                ws.send(self.name)
            elif message == "headers":
                ws.send(json.dumps(self.seen[-1]))
            elif isinstance(message, str) and message.startswith("close:"):
                _, code, reason = message.split(":", 2)
                ws.close(int(code), reason)
                return
            elif message == "die":
                ws.socket.shutdown(socket.SHUT_RDWR)
                ws.socket.close()
                return
            elif isinstance(message, str) and message.startswith("flood:"):
                _, count, size = message.split(":")
                payload = b"x" * int(size)
                for _ in range(int(count)):
                    ws.send(payload)
                    self.sent += 1
            else:
                ws.send(message)


def _select(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    if "chat.v2" in offered:
        return Subprotocol("chat.v2")
    return offered[0] if offered else None

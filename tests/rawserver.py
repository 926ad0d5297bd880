"""The base of the tests' raw-socket backends: each one decides byte by byte what a connection
gets, misbehaviour included (a second answer, a close mid-exchange, an upgrade nobody asked for),
which no HTTP server library would write for us."""

from __future__ import annotations

import socket
import threading


class RawServer:
    """Listens on 127.0.0.1 (an ephemeral port); every accepted connection gets a thread that runs
    ``serve``. Subclasses set their own attributes before calling ``__init__``: the listener
    starts here."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0  # accepted so far
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping = True
        self.sock.close()


def read_request_head(conn: socket.socket, buffer: bytes = b"") -> tuple[bytes, bytes] | None:
    """A request head (without its blank line) and the bytes after it, read on from ``buffer``;
    None if the peer closed first. Socket errors propagate."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest

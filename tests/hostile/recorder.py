"""A tiny raw-socket HTTP/1.1 server that records the exact bytes it receives and answers 200.

Why raw: an HTTP framework would normalise or reject what it reads, hiding what the proxy really
sent. This one keeps every byte per connection, splits the stream into requests with a strict
minimal parser (Content-Length xor chunked), and flags anything a real backend could read
differently from the proxy (both framings, duplicate lengths, odd bytes in the head).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    """One request as the backend framed it."""

    head: bytes
    body: bytes
    request_line: bytes
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> list[bytes]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]

    @property
    def method(self) -> bytes:
        return self.request_line.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        parts = self.request_line.split(b" ")
        return parts[1] if len(parts) > 1 else b""


@dataclass
class Connection:
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Ambiguous(Exception):
    """The stream cannot be framed without guessing: a smuggling risk."""


class RecordingServer:
    """Threaded raw server. Answers 200 with ``ok``, the request body (``echo_body``), or ``answer(req)``."""

    def __init__(self, echo_body: bool = False, answer: Callable[[Request], bytes] | None = None) -> None:
        self.echo_body = echo_body
        self.answer = answer
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port: int = self._sock.getsockname()[1]
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._accepter = threading.Thread(target=self._accept, daemon=True, name=f"recorder-{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingServer:
        self._accepter.start()
        return self

    def stop(self) -> None:
        self._closing = True
        self._sock.close()
        with self._lock:
            for conn in list(self._open):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def clear(self) -> None:
        """Forget what arrived; pooled connections stay open and keep recording."""
        with self._lock:
            for conn in self.connections:
                conn.raw.clear()
                conn.requests.clear()
                conn.problems.clear()

    # --- what arrived --------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return [req for conn in self.connections for req in conn.requests]

    @property
    def raw(self) -> bytes:
        with self._lock:
            return b"".join(bytes(conn.raw) for conn in self.connections)

    @property
    def problems(self) -> list[str]:
        with self._lock:
            return [p for conn in self.connections for p in conn.problems]

    # --- serving -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            record = Connection()
            with self._lock:
                self.connections.append(record)
                self._open.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn, record), daemon=True)
            thread.start()

    def _serve(self, conn: socket.socket, record: Connection) -> None:
        buffer = b""
        try:
            while True:
                try:
                    request, buffer = _frame(buffer)
                except Ambiguous as exc:
                    with self._lock:
                        record.problems.append(str(exc))
                    conn.sendall(
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    return
                if request is None:
                    data = conn.recv(65536)
                    if not data:
                        if buffer:
                            with self._lock:
                                record.problems.append(f"connection closed with {len(buffer)} unframed bytes")
                        return
                    with self._lock:
                        record.raw += data
                    buffer += data
                    continue
                with self._lock:
                    record.requests.append(request)
                if self.answer is not None:
                    body = self.answer(request)
                else:
                    body = request.body if self.echo_body else b"ok"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
        except OSError:
            return
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()


def _frame(buffer: bytes) -> tuple[Request | None, bytes]:
    """One complete request off the front of ``buffer``, or (None, buffer) if more is needed."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if b"\n" in buffer and b"\r\n" not in buffer:
            raise Ambiguous("bare LF line ending")
        return None, buffer
    head = buffer[:end]
    lines = head.split(b"\r\n")
    request_line, header_lines = lines[0], lines[1:]
    if request_line.count(b" ") != 2 or not request_line.endswith(b" HTTP/1.1"):
        raise Ambiguous(f"odd request line {request_line!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in header_lines:
        if not line or line[:1] in (b" ", b"\t"):
            raise Ambiguous(f"folded or empty header line {line!r}")
        name, sep, value = line.partition(b":")
        if not sep or name != name.strip() or not name or any(c < 0x21 or c > 0x7E for c in name):
            raise Ambiguous(f"bad header name {line!r}")
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
            raise Ambiguous(f"control byte in header value {line!r}")
        headers.append((name, value.strip()))
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    codings = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    hosts = [v for k, v in headers if k.lower() == b"host"]
    if len(hosts) != 1:
        raise Ambiguous(f"{len(hosts)} Host headers")
    if lengths and codings:
        raise Ambiguous("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1 or len(codings) > 1:
        raise Ambiguous("repeated framing header")
    rest = buffer[end + 4 :]
    if codings:
        if codings[0].lower() != b"chunked":
            raise Ambiguous(f"transfer-encoding {codings[0]!r}")
        body = bytearray()
        pos = 0
        while True:
            line_end = rest.find(b"\r\n", pos)
            if line_end < 0:
                return None, buffer
            size_text = rest[pos:line_end]
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise Ambiguous(f"chunk size {size_text!r}")
            size = int(size_text, 16)
            start = line_end + 2
            if size == 0:
                if rest[start : start + 2] != b"\r\n":
                    if len(rest) < start + 2:
                        return None, buffer
                    raise Ambiguous("trailers after the last chunk")
                request = Request(head, bytes(body), request_line, headers)
                return request, rest[start + 2 :]
            if len(rest) < start + size + 2:
                return None, buffer
            if rest[start + size : start + size + 2] != b"\r\n":
                raise Ambiguous("chunk data not followed by CRLF")
            body += rest[start : start + size]
            pos = start + size + 2
    length = 0
    if lengths:
        if not lengths[0].isdigit():
            raise Ambiguous(f"content-length {lengths[0]!r}")
        length = int(lengths[0])
    if len(rest) < length:
        return None, buffer
    return Request(head, rest[:length], request_line, headers), rest[length:]

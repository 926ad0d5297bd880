"""What a differential session is: the client's requests and the backend's scripted answers, as
plain data (Hypothesis draws them in strategies.py), and the bytes each side writes for them.

Bodies are slices of one fixed pseudo-random pool, each starting with a tag naming its request
(``[q:<id>]`` for a request body, ``[a:<id>]`` for an answer), so a body that lands on the wrong
request, is shifted, cut or repeated never compares equal.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

MAX_ANSWER = 8 * 1024 * 1024
_POOL = random.Random(23).randbytes(MAX_ANSWER + 1024 * 1024)


def _body(tag: bytes, size: int) -> bytes:
    if size <= len(tag):
        return tag[:size]
    rest = size - len(tag)
    offset = zlib.crc32(tag) % (len(_POOL) - rest + 1)
    return tag + _POOL[offset : offset + rest]


def request_body(diff_id: str, size: int) -> bytes:
    return _body(b"[q:%s]" % diff_id.encode(), size)


def answer_body(diff_id: str, size: int) -> bytes:
    return _body(b"[a:%s]" % diff_id.encode(), size)


@dataclass(frozen=True)
class Answer:
    """How the backend answers one request."""

    status: int = 200
    size: int = 0  # body bytes (none for HEAD, 204, 304)
    framing: str = "length"  # length | chunked | close (close-delimited: the backend closes after it)
    chunk: int = 65536  # chunk size when chunked
    close: bool = False  # say Connection: close and close after the answer (any framing)
    interim: tuple[int, ...] = ()  # 1xx answers before the final one
    early: bool = False  # answer as soon as the head is read, then drain the request body
    # read the whole request, then close without a byte of answer (a backend that applied it and
    # died): the client must get a clean 502; a POST reaches it once, an idempotent method at most
    # twice (one retry, on a new connection)
    drop: bool = False
    pause_at: int | None = None  # body bytes written before a pause
    pause_ms: int = 0
    hop: bool = False  # hop-by-hop headers the proxy must drop (Keep-Alive, one named in Connection)
    extra: tuple[tuple[str, str], ...] = ()  # end-to-end headers, relayed as they are


@dataclass(frozen=True)
class Request:
    """One client request and the answer scripted for it."""

    method: str = "GET"
    size: int = 0  # body bytes (POST, PUT, DELETE only)
    chunked: bool = False  # the client sends its body chunked
    chunk: int = 65536
    length_zero: bool = False  # a bodiless request says Content-Length: 0
    expect: bool = False  # Expect: 100-continue (the body is sent at once all the same)
    hop: bool = False  # hop-by-hop headers the proxy must drop
    forwarded: bool = False  # the client sends its own X-Forwarded-For and X-Request-ID
    extra: tuple[tuple[str, str], ...] = ()
    pause_at: int | None = None  # request bytes written before a pause
    pause_ms: int = 0
    version: str = "v1"  # X-Strangler-Version: which listener of the backend serves it
    answer: Answer = field(default_factory=Answer)


@dataclass(frozen=True)
class Session:
    """Requests on one client connection, sequential or pipelined, and how the client behaves."""

    requests: tuple[Request, ...]
    pipelined: bool = False
    read_size: int = 65536
    read_pause: tuple[int, int, int] | None = None  # (request index, answer body bytes read, ms)
    # (send|recv, request index, fraction of the request's bytes / of the answer body, reset?)
    disconnect: tuple[str, int, float, bool] | None = None
    close_last: bool = False  # the last request says Connection: close


def has_body(request: Request) -> bool:
    return request.method in ("POST", "PUT", "DELETE") and (request.size > 0 or request.chunked)


def request_bytes(request: Request, diff_id: str, target: str, last: bool, close_last: bool) -> bytes:
    """The request exactly as the client writes it."""
    lines = [f"{request.method} {target} HTTP/1.1", "host: diff.test", f"x-diff-id: {diff_id}",
             f"x-strangler-version: {request.version}"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in request.extra]
    connection = []
    if request.hop:
        connection.append("x-c-drop")
        lines += ["x-c-drop: 1", "keep-alive: timeout=5", "te: trailers", "proxy-connection: keep-alive"]
        connection.append("te")
    if last and close_last:
        connection.append("close")
    if connection:
        lines.append("connection: " + ", ".join(connection))
    if request.forwarded:
        lines += ["x-forwarded-for: 10.1.2.3", f"x-request-id: rid-{diff_id}"]
    body = b""
    if has_body(request):
        if request.expect:
            lines.append("expect: 100-continue")
        body = request_body(diff_id, request.size)
        if request.chunked:
            lines.append("transfer-encoding: chunked")
            step = max(1, request.chunk)
            body = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + step]), body[i : i + step])
                            for i in range(0, len(body), step)) + b"0\r\n\r\n"  # fmt: skip
        else:
            lines.append(f"content-length: {request.size}")
    elif request.length_zero and request.method not in ("GET", "HEAD"):
        lines.append("content-length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def answer_headers(answer: Answer, diff_id: str, head_only: bool) -> list[tuple[str, str]]:
    """The scripted answer's head fields, in order (the backend writes them; the oracle expects them)."""
    headers = [("x-diff-answer", diff_id), ("content-type", "application/octet-stream")]
    headers += list(answer.extra)
    if answer.hop:
        headers += [("keep-alive", "timeout=5"), ("x-b-drop", "1"), ("connection", "x-b-drop")]
    headers.append(("x-api-version", "forged"))  # the proxy sets its own
    status = answer.status
    if status not in (204, 304):
        if answer.framing == "length":
            headers.append(("content-length", str(answer.size)))
        elif answer.framing == "chunked":
            headers.append(("transfer-encoding", "chunked"))
    if answer.close or answer.framing == "close":
        headers.append(("connection", "close"))
    return headers

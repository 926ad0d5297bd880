"""Exact bytes in, the proxy's exact answer out: a client with no opinions about HTTP."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    closed: bool  # the proxy closed the connection after answering
    raw: bytes


def exchange(port: int, data: bytes | list[bytes], timeout: float = 5.0, pause: float = 0.0) -> Reply:
    """Send ``data`` (parts separated by ``pause`` seconds), read until EOF or ``timeout``."""
    parts = data if isinstance(data, list) else [data]
    raw = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for i, part in enumerate(parts):
                if i and pause:
                    time.sleep(pause)
                sock.sendall(part)
        except OSError:
            pass  # the proxy may refuse before we finish sending; its answer is still readable
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
            if _complete_without_close(raw):
                # an answer that keeps the connection open: give the proxy a moment to close it anyway
                sock.settimeout(0.3)
                deadline = min(deadline, time.monotonic() + 0.3)
    return parse(raw, closed)


def _complete_without_close(raw: bytes) -> bool:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def parse(raw: bytes, closed: bool) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1]) if lines[0].startswith(b"HTTP/1.") else 0
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body, closed, raw)

"""The parent's control socket: a Unix socket (mode 0600, so only its user can connect; no remote
client can reach it), one JSON request line in, one JSON answer line out.

``ControlServer`` runs inside the parent's loop (non-blocking; the parent polls its sockets). A
command is a handler in a dict: ``reload``, ``status`` and ``upgrade``. A handler answers at once
or keeps the ``Request`` and answers when it is done."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024


class Request:
    """One client connection waiting for its answer."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""
        self.doc: dict[str, Any] = {}
        self.answered = False

    def answer(self, doc: dict[str, Any]) -> None:
        if self.answered:
            return
        self.answered = True
        with contextlib.suppress(OSError):
            self.conn.setblocking(True)
            self.conn.settimeout(2.0)
            self.conn.sendall(json.dumps(doc).encode() + b"\n")
        self.conn.close()


Handler = Callable[[Request], None]


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Handler], sock: socket.socket | None = None) -> None:
        """``sock``: the listening socket an upgrade handed over (the same file, kept as it is)."""
        self.path = path
        self.handlers = handlers
        self.requests: dict[int, Request] = {}  # fd -> a connection still sending its request
        if sock is not None:
            self.sock = sock
            self.sock.setblocking(False)
            self.inode = path.stat().st_ino
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            stale.connect(str(path))
        except OSError:  # nobody answers there: a socket left by a killed proxy, replaced
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            stale.close()
            raise OSError(f"another proxy answers at its control socket {path}")
        finally:
            stale.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: never a moment when others could connect
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.inode = path.stat().st_ino

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(False)
        self.requests[conn.fileno()] = Request(conn)
        return conn

    def readable(self, fd: int) -> bool:
        """Read from a client; True when its connection is done with (dispatched or dropped)."""
        request = self.requests[fd]
        try:
            data = request.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        request.buffer += data
        if b"\n" not in request.buffer and data and len(request.buffer) < MAX_REQUEST:
            return False
        del self.requests[fd]
        line = request.buffer.split(b"\n", 1)[0]
        try:
            doc = json.loads(line)
            command = doc["command"]
            handler = self.handlers[command]
        except (ValueError, KeyError, TypeError):
            known = ", ".join(sorted(self.handlers))
            problem = f"unknown request (commands: {known})"
            request.answer({"ok": False, "result": "invalid", "error": problem})
            return True
        request.doc = doc
        handler(request)
        return True

    def close(self, handed_over: bool = False) -> None:
        """Stop listening and remove the socket file (unless another proxy replaced it meanwhile, or
        ``handed_over``: a new generation listens on the same socket file)."""
        for request in self.requests.values():
            request.conn.close()
        self.requests.clear()
        self.sock.close()
        if handed_over:
            return
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()


class Unreachable(Exception):
    """No proxy answers at the control socket: one line saying where we looked."""


def request(path: Path, doc: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the parent at ``path`` and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            problem = "no such socket; is strangler serve running here?"
            raise Unreachable(f"no proxy answers at {path} ({problem})") from None
        except OSError as exc:
            raise Unreachable(f"no proxy answers at {path} ({exc.strerror or exc})") from None
        sock.sendall(json.dumps(doc).encode() + b"\n")
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise Unreachable(f"the proxy at {path} did not answer within {timeout:g} s") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise Unreachable(f"the proxy at {path} closed the connection without an answer") from None
    if not isinstance(answer, dict):
        raise Unreachable(f"the proxy at {path} answered something else than a JSON object")
    return answer

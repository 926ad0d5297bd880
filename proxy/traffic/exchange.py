"""The client side of one request, as the forwarding core sees it, whichever server carries it.

Two servers implement it: our native HTTP/1.1 protocol (``proxy/edge/server.py``: no ASGI dicts,
head and body written in one go) and the ASGI adapter below (``proxy.app:app`` under any ASGI
server). The core (``proxy/traffic/forward.py``) is written once against this interface.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected (while we read its body, or before its answer was complete)."""


class ClientExchange(Protocol):
    method: str
    path: str  # percent-decoded
    raw_path: bytes  # as sent (for an absolute-form target, its path only)
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case
    client_host: str | None
    scheme: str

    async def read(self) -> tuple[bytes, bool]:
        """The next chunk of the request body and whether more follows; raises ``ClientGone``."""
        ...

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        """The answer's head and first bytes (the whole answer when ``more`` is False)."""
        ...

    async def write(self, body: bytes, more: bool) -> None:
        """More of the answer; raises ``ClientGone`` (or OSError) if the client has left."""
        ...

    async def wait_gone(self) -> None:
        """Returns when the client disconnects. Only once the request body has been read."""
        ...

    async def asgi(self, app: ASGIApp) -> None:
        """Serve this request with an ASGI application (the admin API)."""
        ...


class AsgiExchange:
    """The interface over one ASGI ``http`` call."""

    __slots__ = ("scope", "_receive", "_send", "method", "path", "raw_path", "query", "headers",
                 "client_host", "scheme")  # fmt: skip

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        self.query: bytes = scope.get("query_string") or b""
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        self.client_host: str | None = client[0] if client else None
        self.scheme: str = scope.get("scheme", "http")

    async def read(self) -> tuple[bytes, bool]:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        return message.get("body", b""), message.get("more_body", False)

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        if body or not more:
            await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def write(self, body: bytes, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def wait_gone(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def asgi(self, app: ASGIApp) -> None:
        await app(self.scope, self._receive, self._send)

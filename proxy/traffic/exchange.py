"""The client side of one request, as the forwarding core sees it, whichever server carries it.

Two servers implement it: our native HTTP/1.1 protocol (``proxy/edge/server.py``: no ASGI dicts,
head and body written in one go) and the ASGI adapter below (``proxy.app:app`` under any ASGI
server). The core (``proxy/traffic/forward.py``) is written once against this interface.
"""

from __future__ import annotations

from typing import Protocol

from websockets.frames import Close, Frame, Opcode

from proxy.edge.asgi import ASGIApp, ClientGone, Message, Receive, Scope, Send

__all__ = ["ASGIApp", "ClientGone", "Message", "Receive", "Scope", "Send"]


class ClientExchange(Protocol):
    method: str
    path: str  # percent-decoded
    raw_path: bytes  # as sent (for an absolute-form target, its path only)
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case
    client_host: str | None
    scheme: str

    @property
    def http2(self) -> bool:
        """An HTTP/2 stream (proxy/edge/h2server.py): trailers can be sent with ``end``."""
        ...

    async def read(self) -> tuple[bytes, bool]:
        """The next chunk of the request body and whether more follows; raises ``ClientGone``."""
        ...

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        """The answer's head and first bytes (the whole answer when ``more`` is False)."""
        ...

    async def write(self, body: bytes, more: bool) -> None:
        """More of the answer; raises ``ClientGone`` (or OSError) if the client has left."""
        ...

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Ends an answer begun with ``respond(..., more=True)``, with ``trailers`` where the
        protocol carries them (HTTP/2); over HTTP/1.1 and ASGI they are dropped (for now)."""
        ...

    async def wait_gone(self) -> None:
        """Returns when the client disconnects. Only once the request body has been read."""
        ...

    async def asgi(self, app: ASGIApp) -> None:
        """Serve this request with an ASGI application (the admin API)."""
        ...

    def websocket(self) -> ClientWebSocket | None:
        """The client side of a WebSocket upgrade this request is, or None."""
        ...


class ClientWebSocket(Protocol):
    """The client side of a relayed WebSocket (``proxy/traffic/websocket.py`` relays it)."""

    def problem(self) -> str | None:
        """Why the client's handshake is invalid, or None."""
        ...

    async def accept(
        self, subprotocol: str | None, headers: list[tuple[bytes, bytes]], max_size: int
    ) -> None:
        """Answer 101 with the subprotocol the upstream chose; raises ``ClientGone``."""
        ...

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Answer the upgrade with a plain HTTP status instead."""
        ...

    async def recv(self) -> Frame | None: ...

    async def send(self, frame: Frame) -> None: ...

    async def close(self, code: int | None, reason: str = "") -> None: ...

    def failed_code(self) -> int | None: ...

    def abort(self) -> None: ...


class AsgiExchange:
    """The interface over one ASGI ``http`` call."""

    __slots__ = ("scope", "_receive", "_send", "method", "path", "raw_path", "query", "headers",
                 "client_host", "scheme")  # fmt: skip

    http2 = False

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

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        await self.write(b"", False)  # ASGI trailers (http.response.trailers) are not sent yet

    async def wait_gone(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return

    async def asgi(self, app: ASGIApp) -> None:
        await app(self.scope, self._receive, self._send)

    def websocket(self) -> None:
        return None  # ASGI servers hand upgrades over as websocket scopes (AsgiWebSocket)


class AsgiWebSocket:
    """An ASGI ``websocket`` scope: both the request (as the core reads it) and its client side.

    ASGI carries whole messages, not frames: fragmented messages from the upstream are joined
    (bounded by the upstream side's message limit) and pings/pongs stay with the ASGI server.
    A refusal uses the ``websocket.http.response`` extension when the server has it (the client
    then gets the real status), else a close before accepting (servers answer that with 403).
    """

    method = "GET"
    http2 = False

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.path: str = scope["path"]
        self.raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        self.query: bytes = scope.get("query_string") or b""
        self.headers: list[tuple[bytes, bytes]] = scope["headers"]
        client = scope.get("client")
        self.client_host: str | None = client[0] if client else None
        self.scheme: str = "https" if scope.get("scheme") == "wss" else "http"
        self._accepted = False
        self._closed = False
        self._parts: list[bytes] = []
        self._text = False

    # --- the request side the core reads ------------------------------------------------------------

    async def read(self) -> tuple[bytes, bool]:
        return b"", False

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        await self.reject(status, headers, body)

    async def write(self, body: bytes, more: bool) -> None:
        return None

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        return None

    async def wait_gone(self) -> None:
        return None

    async def asgi(self, app: ASGIApp) -> None:
        await self.reject(404, [], b"")

    def websocket(self) -> AsgiWebSocket:
        return self

    # --- the client side -----------------------------------------------------------------------------

    def problem(self) -> str | None:
        return None  # the ASGI server checked the handshake

    async def _connected(self) -> None:
        message = await self._receive()
        if message["type"] != "websocket.connect":
            raise ClientGone()

    async def accept(
        self, subprotocol: str | None, headers: list[tuple[bytes, bytes]], max_size: int
    ) -> None:
        await self._connected()
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": headers})
        self._accepted = True

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self._accepted or self._closed:
            return
        self._closed = True
        with _suppress_gone():
            await self._connected()
        if "websocket.http.response" in (self.scope.get("extensions") or {}):
            await self._send({"type": "websocket.http.response.start", "status": status, "headers": headers})
            await self._send({"type": "websocket.http.response.body", "body": body})
        else:
            await self._send({"type": "websocket.close", "code": 1008})

    async def recv(self) -> Frame | None:
        message = await self._receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return Frame(Opcode.TEXT, text.encode())
            return Frame(Opcode.BINARY, message.get("bytes") or b"")
        code = int(message.get("code", 1005))
        if kind != "websocket.disconnect" or code == 1006:
            return None
        try:
            data = Close(code, str(message.get("reason") or "")).serialize()
        except Exception:  # noqa: BLE001 - 1005 and other codes that cannot be sent: no code
            data = b""
        return Frame(Opcode.CLOSE, data)

    async def send(self, frame: Frame) -> None:
        if self._closed:
            return
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.BINARY:
            self._text = frame.opcode is Opcode.TEXT
            self._parts = [bytes(frame.data)]
        elif frame.opcode is Opcode.CONT:
            self._parts.append(bytes(frame.data))
        else:
            return  # ping/pong: the ASGI server's business
        if frame.fin:
            data = b"".join(self._parts)
            self._parts = []
            message: Message = {"type": "websocket.send"}
            if self._text:
                message["text"] = data.decode("utf-8", "replace")
            else:
                message["bytes"] = data
            try:
                await self._send(message)
            except OSError:
                self._closed = True

    async def close(self, code: int | None, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        if code is None or code in (1005, 1006, 1015):
            code = 1000
        with _suppress_gone():
            await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def failed_code(self) -> int | None:
        return None

    def abort(self) -> None:
        return None


class _suppress_gone:
    """Sending to an ASGI client that already left raises server-specific errors: ignore them."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ClientGone | OSError | RuntimeError)  # type: ignore[arg-type]

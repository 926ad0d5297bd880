"""Our HTTP/1.1 server protocol on httptools (llhttp): limits, strict framing, timeouts, pipelining.

Why our own and not uvicorn's: the proxy's speed is decided here (one transport write per answer
or chunk, no ASGI message dicts, no framework), and so is its safety (every limit and refusal below
is ours, with no private name of another library to break on an upgrade).

Each connection parses requests with llhttp and hands each one to the forwarding core as a
``NativeExchange`` (``proxy/traffic/exchange.py`` is the interface). Pipelined requests are
answered in order: one is active, the rest wait and reading pauses. Refusals (the table in
docs/security.md) are answered here with a small JSON body and ``Connection: close``, counted in
``strangler_rejected_requests_total{reason}`` and never logged per request; nothing refused here
reaches a backend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import http
import logging
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Protocol
from urllib.parse import unquote

import httptools
from websockets.datastructures import Headers as WsHeaders
from websockets.frames import Frame
from websockets.http11 import Request as WsRequest
from websockets.protocol import OPEN
from websockets.server import ServerProtocol as WsServerProtocol
from websockets.typing import Subprotocol

from proxy.edge.asgi import ASGIApp, ClientGone, Message
from proxy.edge.bodyqueue import BodyQueue
from proxy.edge.flow import FlowControl
from proxy.edge.websocket import FrameSocket, quiet_log
from proxy.edge.writebatch import WriteBatch

log = logging.getLogger("strangler")

# RFC 9110 7.2 / RFC 3986 3.2.2: uri-host [":" port]; an IP literal is one closed bracket pair
_HOST_OK: Final = re.compile(
    rb"^(?:\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+)\]"
    rb"|[A-Za-z0-9.\-_~!$&'()*+,;=%]*)(?::[0-9]*)?\Z"
)
HOST_OK: Final = _HOST_OK  # also checks HTTP/2's :authority (proxy/edge/h2server.py)
_OWS: Final = b" \t"
_URL_SPECIAL: Final = re.compile(rb"[?#]")  # a target with a query or fragment goes through parse_url
_FRAMING_HEADERS: Final = frozenset({b"host", b"transfer-encoding", b"content-length", b"expect"})
STATUS_LINES: Final = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in http.HTTPStatus}
NO_BODY_STATUS: Final = frozenset({204, 304})
BODY_HIGH_WATER: Final = 256 * 1024  # request bytes buffered before we stop reading the client
# how long a connection closed after an early answer keeps discarding what the client still sends
LINGER_SECONDS: Final = 2.0
WS_EARLY_BYTES: Final = 64 * 1024  # bytes a client may send after its upgrade request before we stop reading
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
OVER_CAPACITY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 74\r\n"
    b'connection: close\r\n\r\n{"error":"over capacity","detail":"too many connections, try again later"}'
)


class State(enum.IntEnum):
    """The client connection's states (docs/architecture.md "The client connection's states").
    Every change goes through ``ServerProtocol._to``; ``TRANSITIONS`` lists the allowed ones.
    An IntEnum: the per-request checks are integer operations (an Enum hashes in Python)."""

    # the states in which bytes are parsed as HTTP come first (``data_received``: one comparison)
    IDLE = 0  # between requests (keep-alive, or a new connection): nothing of the next one yet
    READING_HEAD = 1  # bytes of a request head, no request being answered
    ACTIVE = 2  # requests received and not yet fully answered (bodies may still arrive)
    DRAIN_IDLE = 3  # idle during a graceful stop: one more request within the grace
    UPGRADING = 4  # a WebSocket upgrade handed to the relay; bytes after it are held
    WEBSOCKET = 5  # frames, relayed
    MUST_CLOSE = 6  # nothing more is read; answers in progress finish, then the close
    CLOSED = 7


IDLE: Final = State.IDLE
READING_HEAD: Final = State.READING_HEAD
ACTIVE: Final = State.ACTIVE
UPGRADING: Final = State.UPGRADING
WEBSOCKET: Final = State.WEBSOCKET
DRAIN_IDLE: Final = State.DRAIN_IDLE
MUST_CLOSE: Final = State.MUST_CLOSE
CLOSED: Final = State.CLOSED

TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    IDLE: frozenset({READING_HEAD, DRAIN_IDLE, MUST_CLOSE, CLOSED}),
    READING_HEAD: frozenset({ACTIVE, MUST_CLOSE, CLOSED}),
    ACTIVE: frozenset({IDLE, READING_HEAD, DRAIN_IDLE, UPGRADING, MUST_CLOSE, CLOSED}),
    UPGRADING: frozenset({WEBSOCKET, MUST_CLOSE, CLOSED}),
    WEBSOCKET: frozenset({MUST_CLOSE, CLOSED}),
    DRAIN_IDLE: frozenset({READING_HEAD, MUST_CLOSE, CLOSED}),
    MUST_CLOSE: frozenset({CLOSED}),
    CLOSED: frozenset(),
}
# the same table as one bit mask per state, indexed by the state's value: what ``_to`` reads
_ALLOWED: Final[tuple[int, ...]] = tuple(
    sum(1 << target.value for target in TRANSITIONS[state]) for state in State
)


class StateError(Exception):
    """A connection state change the table does not allow: a bug in this module."""


H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Takeover(Protocol):
    """HTTP/2 on this listener (``proxy/edge/h2server.py``'s ``H2Config``): given the connection
    once its first bytes are the h2c preface (or ALPN chose ``h2``)."""

    def take_over(self, conn: ServerProtocol, data: bytes) -> None: ...

    def protocol(self, handler: Any, limits: ServerLimits, scheme: str) -> asyncio.Protocol: ...


class ClientConnection(Protocol):
    """What the limits and the drain need of any client connection (HTTP/1.1 or HTTP/2)."""

    transport: asyncio.Transport | None
    _limits: ServerLimits

    @property
    def _ws(self) -> FrameSocket | None: ...

    @property
    def idle(self) -> bool: ...

    def begin_drain(self) -> None: ...

    def _close(self, linger: bool = False) -> None: ...


Handler = Callable[["NativeExchange"], Awaitable[None]]
# takes a request synchronously when it can (no task); else returns the coroutine to run as a task
FastHandler = Callable[["NativeExchange"], Coroutine[Any, Any, None] | None]


class ServerLimits:
    """Limits resolved once per server, the refusal counter and the open connections."""

    __slots__ = ("max_line", "max_header_bytes", "max_headers", "max_head", "max_body", "header_timeout",
                 "body_timeout", "keepalive_timeout", "max_connections", "max_pipelined", "count",
                 "connections", "send_timeout", "drain_idle_grace", "strict_states",
                 "draining")  # fmt: skip

    def __init__(
        self,
        *,
        max_request_line_bytes: int = 8192,
        max_header_bytes: int = 65536,
        max_headers: int = 100,
        max_body_bytes: int = 0,
        header_timeout_seconds: float = 10.0,
        body_timeout_seconds: float = 60.0,
        keepalive_timeout_seconds: float = 5.0,
        max_connections: int = 4096,
        max_pipelined_requests: int = 64,
        send_timeout_seconds: float = 60.0,
        drain_idle_grace_seconds: float = 1.0,
        strict_states: bool = False,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.max_line = max_request_line_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        # bytes of an unfinished head we are willing to buffer (request line + headers + CRLFs)
        self.max_head = max_request_line_bytes + max_header_bytes + 4 * (max_headers + 2)
        self.max_body = max_body_bytes
        self.header_timeout = header_timeout_seconds
        self.body_timeout = body_timeout_seconds
        self.keepalive_timeout = keepalive_timeout_seconds
        self.max_connections = max_connections
        # requests parsed ahead of their answers on one connection (llhttp parses all it is fed)
        self.max_pipelined = max_pipelined_requests
        # an answer our write buffer holds (the client not reading) this long aborts the connection
        self.send_timeout = send_timeout_seconds
        # during a graceful stop, an idle connection may send one more request within this
        self.drain_idle_grace = drain_idle_grace_seconds
        self.strict_states = strict_states  # an impossible state change raises (tests)
        self.draining = False  # a graceful stop has begun: every answer from now on says close
        self.count: Callable[[str], None] = count or (lambda reason: None)
        # every open connection, oldest first: idle ones are closed first at the cap
        self.connections: dict[ClientConnection, None] = {}


class Refused(Exception):
    """Raised inside a parser callback to stop parsing; the protocol answers ``status``."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class NativeExchange:
    """One request on one connection, and its answer: the ``ClientExchange`` of our server."""

    __slots__ = ("method", "path", "raw_path", "query", "headers", "client_host", "scheme", "http_version",
                 "keep_alive", "expect_continue", "_conn", "_body", "_body_done", "_responded", "_complete",
                 "_chunked", "_no_body", "gone", "upgradable", "upgrade", "trailers")  # fmt: skip

    http2: Final = False

    def __init__(self, conn: ServerProtocol, method: str, raw_path: bytes, path: str, query: bytes,
                 headers: list[tuple[bytes, bytes]], http_version: str, keep_alive: bool,
                 expect_continue: bool) -> None:  # fmt: skip
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.path = path
        self.query = query
        self.headers = headers
        self.client_host = conn.client_host
        self.scheme = conn.scheme
        self.http_version = http_version
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self._body: BodyQueue | None = None  # made when a body arrives or is waited for
        self._body_done = False
        self._responded = False
        self._complete = False
        self._chunked = False
        self._no_body = False
        self.gone = False
        self.upgradable = False  # set by the connection: a WebSocket upgrade it can hand over
        self.upgrade = False  # the request asks for an upgrade (known at the end of its head)
        # a chunked body's trailer fields, kept apart: never merged into ``headers``, never read for
        # routing or forwarding headers, not forwarded (docs/security.md "Trailers")
        self.trailers: list[tuple[bytes, bytes]] | None = None

    # --- fed by the connection -------------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        body = self._body
        if body is None:
            body = self._new_body()
        body.feed(chunk)

    def _end_body(self) -> None:
        self._body_done = True
        self._wake()

    def _disconnect(self) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        if self._body is not None:
            self._body.wake()

    def _new_body(self) -> BodyQueue:
        self._body = BodyQueue(BODY_HIGH_WATER, self._conn)
        return self._body

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def body_done(self) -> bool:
        return self._body_done

    # --- ClientExchange ----------------------------------------------------------------------------

    async def read(self) -> tuple[bytes, bool]:
        if self.expect_continue and not self._responded:
            self.expect_continue = False
            self._conn.write(CONTINUE)
        body = self._body
        while True:
            if body is not None:
                chunk = body.pop()
                if chunk is not None:
                    return chunk, bool(body) or not self._body_done
            if self._body_done:
                return b"", False
            if self.gone:
                raise ClientGone()
            if body is None:
                body = self._new_body()
            await body.wait()

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        if self.gone:
            raise ClientGone()
        self._respond(status, headers, body, more)
        if more and self._conn.flow.write_paused:
            await self._conn.drain()

    def respond_now(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole answer, written at once: the fast path's ``respond`` (no coroutine)."""
        if self.gone:
            raise ClientGone()
        self._respond(status, headers, body, False)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Go on with this request in a task (a streamed answer, an error to report)."""
        self._conn.run(self, work)

    def _respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        self._responded = True
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        sized = False
        close = not self.keep_alive
        for name, value in headers:
            if name == b"content-length":
                sized = True
            elif name == b"connection":
                if value.lower() == b"close":
                    close = True
                continue  # written below, once
            elif name == b"transfer-encoding":
                continue  # we frame the answer ourselves
            parts += (name, b": ", value, b"\r\n")
        no_body = self.method == "HEAD" or status in NO_BODY_STATUS or status < 200
        self._no_body = no_body
        if not no_body and not sized:
            if not more:
                parts.append(b"content-length: %d\r\n" % len(body))
            elif self.http_version == "1.1":
                parts.append(b"transfer-encoding: chunked\r\n")
                self._chunked = True
            else:
                close = True  # HTTP/1.0 and unsized: the close ends the body
        # an answer to HEAD keeps the backend's length (if any, passed on above); none is invented
        if not self._body_done:
            # answered before the whole request body arrived, streamed or not: the rest cannot be
            # skipped safely, so the connection ends with this answer, and the head says so (a
            # streamed answer's head is the last chance to tell the client)
            close = True
        conn = self._conn
        if conn._limits.draining and not conn._queue:
            close = True  # a graceful stop: the last request received on this connection is the last
        if close:
            self.keep_alive = False
            parts.append(b"connection: close\r\n")
        elif self.http_version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        parts.append(b"\r\n")
        if body and not no_body:
            parts.append(b"%x\r\n%s\r\n" % (len(body), body) if self._chunked else body)
        if not more and self._chunked:
            parts.append(b"0\r\n\r\n")
        self._conn.write(b"".join(parts))
        if not more:
            self._finish()

    async def write(self, body: bytes, more: bool) -> None:
        if self.gone:
            raise ClientGone()
        if self._no_body:
            data = b""
        elif self._chunked:
            data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            data = body
        if data:
            self._conn.write(data)
        if not more:
            self._finish()
        elif self._conn.flow.write_paused:
            await self._conn.drain()

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Ends a streamed answer. HTTP/1.1 trailers are not sent (yet): dropped."""
        await self.write(b"", False)

    async def wait_gone(self) -> None:
        """Returns when the client disconnects. Each call waits on a future of its own, so a
        cancelled waiter (a finished answer's disconnect watcher) changes nothing for the next."""
        await self._conn.wait_lost()

    def websocket(self) -> NativeWebSocket | None:
        """The client side of a WebSocket upgrade, if this request is one we can relay."""
        if not self.upgradable:
            return None
        return NativeWebSocket(self, self._conn)

    async def asgi(self, app: ASGIApp) -> None:
        """Run an ASGI app for this request (the admin API): dicts only here, off the hot path."""
        conn = self._conn
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version, "method": self.method, "scheme": self.scheme,
            "path": self.path, "raw_path": self.raw_path, "query_string": self.query, "root_path": "",
            "headers": self.headers,
            "client": (self.client_host, conn.client_port) if self.client_host else None,
            "server": conn.server_address,
        }  # fmt: skip
        start: dict[str, Any] = {}
        body_sent = False  # ASGI: the first receive() is an http.request, even for no body

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent or not self._body_done or self._body:
                try:
                    body, more = await self.read()
                except ClientGone:
                    return {"type": "http.disconnect"}
                body_sent = not more
                return {"type": "http.request", "body": body, "more_body": more}
            await self.wait_gone()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body" or self._complete:
                return
            body, more = message.get("body", b""), message.get("more_body", False)
            headers = [(bytes(k).lower(), bytes(v)) for k, v in start.get("headers", [])]
            if not self._responded:
                await self.respond(start["status"], headers, body, more)
            else:
                await self.write(body, more)

        await app(scope, receive, send)

    def _finish(self) -> None:
        if not self._complete:
            self._complete = True
            self._conn.exchange_done(self)


class NativeWebSocket:
    """The client side of a relayed WebSocket on our own server: frames as the client sent them
    (fragments, pings and pongs included), parsed and checked by ``websockets``' sans-I/O protocol."""

    def __init__(self, ex: NativeExchange, conn: ServerProtocol) -> None:
        self._ex = ex
        self._conn = conn
        self._socket: FrameSocket | None = None

    def _request(self) -> WsRequest:
        headers = WsHeaders()
        for name, value in self._ex.headers:
            headers[name.decode("latin-1")] = value.decode("latin-1")
        return WsRequest(self._ex.raw_path.decode("latin-1"), headers)

    def problem(self) -> str | None:
        """Why the client's handshake is invalid (missing key, wrong version...), or None."""
        response = WsServerProtocol(logger=quiet_log).accept(self._request())
        if response.status_code == 101:
            return None
        return (response.body or b"invalid websocket handshake").decode("utf-8", "replace").strip()

    async def accept(
        self, subprotocol: str | None, headers: list[tuple[bytes, bytes]], max_size: int
    ) -> None:
        chosen = Subprotocol(subprotocol) if subprotocol is not None else None
        handshake = WsServerProtocol(
            select_subprotocol=lambda _, offered: chosen if chosen in offered else None, logger=quiet_log
        )
        response = handshake.accept(self._request())
        for name, value in headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        transport = self._conn.transport
        if self._ex.gone or transport is None or transport.is_closing():
            raise ClientGone()
        self._conn._writes.flush()  # from here on the frame socket writes to the transport itself
        transport.write(response.serialize())
        self._ex._responded = True
        # the frames get a protocol of their own that starts OPEN: the handshake was parsed by us
        protocol = WsServerProtocol(state=OPEN, max_size=max_size, logger=quiet_log)
        frames = FrameSocket(protocol, transport)
        self._socket = frames
        self._conn.upgraded(frames)

    async def reject(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        await self._ex.respond(status, headers, body, False)

    async def recv(self) -> Frame | None:
        assert self._socket is not None
        return await self._socket.recv()

    async def send(self, frame: Frame) -> None:
        assert self._socket is not None
        await self._socket.send(frame)

    async def close(self, code: int | None, reason: str = "") -> None:
        if self._socket is not None:
            await self._socket.close(code, reason)

    def failed_code(self) -> int | None:
        return self._socket.failed_code() if self._socket is not None else None

    def abort(self) -> None:
        if self._socket is not None and not self._socket.lost:
            self._conn._close()


class ServerProtocol(asyncio.Protocol):
    """One client connection: a state machine (``State``; every change through ``_to``)."""

    def __init__(
        self, handler: Handler, limits: ServerLimits, scheme: str = "http", fast: FastHandler | None = None,
        writes: WriteBatch | None = None, h2: H2Takeover | None = None,
    ) -> None:  # fmt: skip
        self._handler = handler
        self._h2 = h2
        # the first bytes while they may be the h2c preface (None: decided, or no HTTP/2 here)
        self._sniff: bytes | None = b"" if h2 is not None else None
        self._writes = writes if writes is not None else WriteBatch()
        self._fast = fast
        self._limits = limits
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_host: str | None = None
        self.client_port = 0
        self.server_address: tuple[str, int] | None = None
        self.state = IDLE
        self.flow = FlowControl()  # write pause/drain (with the send timeout) and read pause
        self._lost_waiters: list[asyncio.Future[None]] = []  # wait_lost(): one future per waiter
        self._refusal: Refused | None = None
        # WebSocket: bytes after an upgrade request, held until the relay accepts (UPGRADING); then
        # the frame socket (WEBSOCKET)
        self._ws_early = bytearray()
        self._host_checked = b""  # the last Host value found valid on this connection
        self._ws: FrameSocket | None = None
        # request being parsed
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = True  # the parser is in a request head (not in a body or its trailers)
        self._head_started = False  # llhttp began a request head (on_message_begin) not yet complete
        self._head_bytes = 0
        self._reset_request()
        self._parsing: NativeExchange | None = None  # the request whose body is being read
        # requests and answers
        self._active: NativeExchange | None = None
        self._queue: collections.deque[NativeExchange] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        # timers: one for the head/keep-alive/drain deadlines, one for body stalls
        self._head_since: float | None = None
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_body = 0.0

    # --- the state machine -------------------------------------------------------------------------

    def _to(self, new: State) -> bool:
        """The one way to change state. An impossible change is a bug here: it raises when
        ``strict_states`` is on (tests); otherwise this connection is aborted with one log line
        (never a guess at what it should do next). False when the connection was aborted."""
        old = self.state
        if new is old:
            return True
        if _ALLOWED[old] >> new & 1:
            self.state = new
            return True
        old_name, new_name = old.name.lower(), new.name.lower()
        if self._limits.strict_states:
            raise StateError(f"client connection: {old_name} -> {new_name} is not a transition")
        log.error("client connection aborted: impossible state change %s -> %s", old_name, new_name)
        self.state = MUST_CLOSE
        if self.transport is not None:
            self.transport.abort()
        return False

    @property
    def idle(self) -> bool:
        return self.state is IDLE or self.state is DRAIN_IDLE

    # --- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flow.attach(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client_host, self.client_port = str(peer[0]), int(peer[1])
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple) and len(sock) >= 2:
            self.server_address = (str(sock[0]), int(sock[1]))
        limits = self._limits
        if len(limits.connections) >= limits.max_connections and not self._make_room():
            # at the cap and every connection is busy: refuse at once, before reading a byte
            limits.count("connection_limit")
            self._to(MUST_CLOSE)
            transport.write(OVER_CAPACITY)  # type: ignore[attr-defined]
            transport.close()
            return
        limits.connections[self] = None
        if self._h2 is not None and self.scheme == "https":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._sniff = None
                self._h2.take_over(self, b"")
                return
        self._head_since = self.loop.time()
        if limits.draining:  # taken from the listen queue during a graceful stop
            self.begin_drain()
        else:
            self._timer = self.loop.call_later(limits.header_timeout, self._check_deadlines)

    def _make_room(self) -> bool:
        """Close the oldest idle connection, as nginx reuses idle keep-alive connections when
        worker_connections run out. False if none is idle."""
        for conn in self._limits.connections:
            if conn.idle:
                self._limits.count("idle_closed")
                conn._limits.connections.pop(conn, None)
                conn._close()
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED  # from any state: the peer or the kernel decides this one
        self._limits.connections.pop(self, None)
        self._cancel_timers()
        self.flow.lost()
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        for ex in (self._active, *self._queue, self._parsing):
            if ex is not None:
                ex._disconnect()
        if self._ws is not None:
            self._ws.connection_lost()

    async def wait_lost(self) -> None:
        """Returns once the connection is lost. The future is this waiter's own: cancelling the
        waiter (a disconnect watcher whose answer is done) cancels nothing the connection keeps."""
        if self.state is CLOSED:
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._lost_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._lost_waiters:
                self._lost_waiters.remove(waiter)

    def eof_received(self) -> bool | None:
        if self._ws is not None:
            self._ws.feed_eof()
        return None

    def handed_over(self) -> None:
        """This connection now speaks HTTP/2 through another protocol: forget it here."""
        self._limits.connections.pop(self, None)
        self._cancel_timers()
        self.state = CLOSED

    def data_received(self, data: bytes) -> None:
        if self._sniff is not None:
            # the h2c preface (HTTP/2 with prior knowledge)? Decided within the first 24 bytes
            seen = self._sniff + data
            if len(seen) < 24 and H2_PREFACE.startswith(seen):
                self._sniff = seen
                return
            self._sniff = None
            if seen.startswith(H2_PREFACE) and self.state is IDLE and self._h2 is not None:
                self._h2.take_over(self, seen)
                return
            data = seen
        state = self.state
        if state > DRAIN_IDLE:  # not HTTP any more
            if state is WEBSOCKET:
                assert self._ws is not None
                self._ws.feed(data)
            elif state is UPGRADING:
                self._ws_early += data
                if len(self._ws_early) > WS_EARLY_BYTES:
                    self.flow.pause_reading()
            return  # MUST_CLOSE, CLOSED: nothing more is read
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # nothing after an upgrade request can be read as HTTP. A WebSocket upgrade that is the
            # only request in flight may be handed to the relay (what follows is frames, kept until
            # it accepts); any other upgrade (h2c...) is answered as plain HTTP, then the connection
            # closes
            active = self._active
            if active is not None and not self._queue and _is_websocket(active) and self.state is ACTIVE:
                active.upgradable = True
                self._ws_early = bytearray(data[upgrade.args[0] :] if upgrade.args else b"")
                self._to(UPGRADING)
                return
            self._refused_reading()
            return
        except httptools.HttpParserError:
            refusal = self._refusal or Refused(400, "malformed", "invalid HTTP request")
            self._refuse(refusal)
            return
        if self._in_head and self._head_bytes > self._limits.max_head:
            if self._header_count == 0 and len(self._url) >= self._limits.max_line:
                self._refuse(Refused(414, "request_line_too_long", "request line over the limit"))
            else:
                self._refuse(Refused(431, "headers_too_large", "request headers over the limit"))

    def upgraded(self, frames: FrameSocket) -> None:
        """The relay accepted the upgrade: from now on the bytes are frames for ``frames``."""
        if not self._to(WEBSOCKET):
            return
        self._ws = frames
        early, self._ws_early = self._ws_early, bytearray()
        frames._flush()  # the 101
        self.flow.resume_reading()
        if early:
            frames.feed(bytes(early))

    def _refused_reading(self) -> None:
        last = self._queue[-1] if self._queue else self._active
        if last is not None:
            last.keep_alive = False
        self._to(MUST_CLOSE)  # read nothing more

    # --- a graceful stop ----------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """The server stops (``limits.draining`` is set): every answer from now on says
        ``Connection: close`` (``NativeExchange._respond``); an idle connection gets
        ``drain_idle_grace`` for one more request, then closes; WebSockets are closed by the server."""
        if self.state is IDLE:
            self._to_drain_idle()

    def _to_drain_idle(self) -> None:
        if not self._to(DRAIN_IDLE):
            return
        self._idle_since = self.loop.time()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self._limits.drain_idle_grace, self._check_deadlines)

    # --- writing and flow control ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._writes.write(transport, data)  # at the end of this loop pass, in order

    def pause_writing(self) -> None:
        self.flow.writing_paused()
        if self._ws is not None:
            self._ws.pause_writing()

    def resume_writing(self) -> None:
        self.flow.writing_resumed()
        if self._ws is not None:
            self._ws.resume_writing()
        elif self._active is None:
            self._continue()  # requests held while the client was not reading its answers

    async def drain(self) -> None:
        """Wait while the client leaves our writes unread: ``ClientGone`` once it is gone, or after
        ``send_timeout`` without progress (then the connection is aborted and counted as
        ``client_send_timeout``: a client that never reads must not hold a backend connection)."""
        try:
            await self.flow.drain(self._limits.send_timeout)
        except ConnectionResetError:
            raise ClientGone() from None
        except TimeoutError:
            self._limits.count("client_send_timeout")
            self._to(MUST_CLOSE)
            if self.transport is not None:
                self.transport.abort()
            raise ClientGone() from None

    def pause_reading(self) -> None:
        self.flow.pause_reading()

    def resume_reading(self) -> None:
        if not self._queue:
            self.flow.resume_reading()

    # --- parser callbacks ------------------------------------------------------------------------

    def _reset_request(self) -> None:
        """Per-request parse state: counters the limits and framing checks read."""
        self._url = b""
        self._headers = []
        self._header_count = 0
        self._header_bytes = 0
        self._hosts = 0
        self._codings = 0
        self._content_length = -1
        self._body_bytes = 0
        self._expect = False

    def on_message_begin(self) -> None:
        state = self.state
        if state is IDLE or state is DRAIN_IDLE:
            self._to(READING_HEAD)  # pipelined behind an answer: stays ACTIVE
        self._in_head = True
        self._head_started = True
        self._reset_request()
        self._idle_since = None
        if self._head_since is None:
            self._head_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line:
            raise self._stop(414, "request_line_too_long", "request line over the limit")

    def on_header(self, name: bytes, value: bytes) -> None:
        value = value.strip(_OWS)  # OWS is not part of a field value (RFC 9110 5.5)
        count = self._header_count = self._header_count + 1
        size = self._header_bytes = self._header_bytes + len(name) + len(value) + 4
        limits = self._limits
        if count > limits.max_headers:
            raise self._stop(431, "too_many_headers", "too many request headers")
        if size > limits.max_header_bytes:
            raise self._stop(431, "headers_too_large", "request headers over the limit")
        lower = name.lower()
        if not self._in_head:
            # a chunked body's trailer (llhttp reports it as a header): kept apart, never merged
            # into the head the exchange was made with (a trailer must not add or change what the
            # routing, the framing or the backend already read from the head)
            ex = self._parsing
            if ex is not None:
                if ex.trailers is None:
                    ex.trailers = []
                ex.trailers.append((lower, value))
            return
        self._headers.append((lower, value))
        if lower in _FRAMING_HEADERS:  # most headers are none of these: one set lookup for them
            self._framing_header(lower, value)

    def _framing_header(self, lower: bytes, value: bytes) -> None:
        if lower == b"host":
            self._hosts += 1
            if self._hosts > 1:
                raise self._stop(400, "bad_host", "more than one Host header")
            if value != self._host_checked:  # a keep-alive client repeats its Host: checked once
                if not _HOST_OK.match(value):
                    raise self._stop(400, "bad_host", "invalid Host header")
                self._host_checked = value
        elif lower == b"transfer-encoding":
            self._codings += 1
            if self._codings > 1 or value.lower() != b"chunked":
                raise self._stop(400, "bad_framing", "Transfer-Encoding must be one 'chunked'")
        elif lower == b"content-length":
            self._content_length = int(value) if value.isdigit() else -1  # llhttp checked the syntax
        elif value.lower() == b"100-continue":  # expect
            self._expect = True

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._head_started = False
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise self._stop(400, "bad_version", "only HTTP/1.0 and HTTP/1.1 are served")
        if self._hosts == 0 and version == "1.1":
            raise self._stop(400, "bad_host", "HTTP/1.1 requires a Host header")
        if self._codings and version == "1.0":
            raise self._stop(400, "bad_framing", "Transfer-Encoding is not allowed in HTTP/1.0")
        method = parser.get_method()
        if method == b"CONNECT":
            raise self._stop(400, "connect_refused", "CONNECT is not served: this is not a forward proxy")
        has_body = self._codings > 0 or self._content_length > 0
        upgrade = parser.should_upgrade()
        if upgrade and version == "1.0":
            # RFC 9110 7.8: Upgrade is HTTP/1.1; a WebSocket handshake needs 1.1 (RFC 6455 4.1)
            raise self._stop(400, "bad_upgrade", "an upgrade needs HTTP/1.1")
        if has_body and upgrade:
            # llhttp stops at an upgrade without reading the body: whatever follows could be a
            # request hidden from us (h2c smuggling)
            raise self._stop(400, "bad_upgrade", "an upgrade request must not carry a body")
        max_body = self._limits.max_body
        if max_body and self._content_length > max_body:
            raise self._stop(413, "body_too_large", "request body over the limit")
        url = self._url
        absolute = False
        try:
            if url[:1] == b"/" and not _URL_SPECIAL.search(url):
                raw_path, query = url, b""  # a plain path (most requests): nothing to split
            else:
                # Any: its parts are None when absent, whatever the stubs say (compiled code
                # checks declared types)
                parsed: Any = httptools.parse_url(url)
                raw_path = parsed.path or b""
                query = parsed.query or b""
                absolute = parsed.schema is not None
            path = raw_path.decode("ascii")
            if "%" in path:
                path = unquote(path)
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError, ValueError):
            raise self._stop(400, "malformed", "invalid request target") from None
        if absolute:
            self._host_from_target(url)
        self._in_head = False
        self._head_bytes = 0
        ex = NativeExchange(
            self, method.decode("ascii"), raw_path, path, query, self._headers, version,
            parser.should_keep_alive() and not upgrade, self._expect,
        )  # fmt: skip
        ex.upgrade = upgrade
        if not has_body:
            ex._body_done = True
        else:
            self._parsing = ex
            self._last_body = self.loop.time()
            self._body_timer = self.loop.call_later(self._limits.body_timeout, self._check_body)
        if self._active is None and not self._queue and not self.flow.write_paused:
            self._start(ex)
        else:
            # pipelined (or held while the client leaves its answers unread): answered in order
            if len(self._queue) >= self._limits.max_pipelined:
                raise self._stop(400, "too_many_pipelined", "too many requests sent ahead of their answers")
            self._queue.append(ex)
            self.flow.pause_reading()
            if self._active is None:
                if self.state is not MUST_CLOSE:
                    self._to(ACTIVE)  # received, held until the client reads its answers
                self._continue()  # held, not pipelined: the keep-alive deadline runs meanwhile

    def _host_from_target(self, url: bytes) -> None:
        """An absolute-form target's authority replaces the Host header (RFC 9112 3.2.2), so
        the backend and our forwarding headers see the host the client really asked for."""
        rest = url.split(b"://", 1)[1] if b"://" in url else b""
        authority = _URL_SPECIAL.split(rest.split(b"/", 1)[0], 1)[0].rpartition(b"@")[2]
        if not authority or not _HOST_OK.match(authority):
            raise self._stop(400, "bad_host", "invalid authority in the request target")
        headers = self._headers
        for i, (name, _) in enumerate(headers):
            if name == b"host":
                headers[i] = (b"host", authority)
                return
        headers.append((b"host", authority))

    def on_body(self, body: bytes) -> None:
        self._last_body = self.loop.time()
        max_body = self._limits.max_body
        if max_body:
            self._body_bytes += len(body)
            if self._body_bytes > max_body:
                raise self._stop(413, "body_too_large", "request body over the limit")
        if self._parsing is not None:
            self._parsing._feed(body)

    def on_message_complete(self) -> None:
        self._head_since = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._parsing is not None:
            self._parsing._end_body()
            self._parsing = None
        self._in_head = True
        self._head_bytes = 0

    # --- answering ---------------------------------------------------------------------------------

    def _start(self, ex: NativeExchange) -> None:
        self._active = ex
        self._idle_since = None
        if self.state is not MUST_CLOSE:  # MUST_CLOSE: requests received before it are still answered
            self._to(ACTIVE)
        fast = self._fast
        if fast is not None and ex._body_done and not ex.upgrade:
            # a request without a body: the core may take it now, with no task (the fast path)
            try:
                work = fast(ex)
            except Exception:  # noqa: BLE001 - a bug must cost one request, never the connection
                log.exception("request handler failed")
                self._internal_error(ex)
                return
            if work is not None:
                self.run(ex, work)
            return
        self.run(ex, self._handler(ex))

    def run(self, ex: NativeExchange, work: Awaitable[None]) -> None:
        self._task = self.loop.create_task(self._run(ex, work))

    def _internal_error(self, ex: NativeExchange) -> None:
        """A bug answered as a 500 (if nothing was answered yet), then the connection closes."""
        if not ex._responded and not ex.gone:
            body = b'{"error":"internal error","detail":"the proxy failed to handle this request"}'
            ex.keep_alive = False
            ex.respond_now(500, [(b"content-type", b"application/json")], body)
        if not ex.complete:
            self._close()

    async def _run(self, ex: NativeExchange, work: Awaitable[None]) -> None:
        try:
            await work
        except ClientGone:
            pass
        except Exception:  # noqa: BLE001 - a bug must cost one request, never the connection's others
            log.exception("request handler failed")
            self._internal_error(ex)
        if not ex.complete:
            # the handler ended without finishing its answer (a backend reset mid-body): the client
            # must not take a truncated answer as complete
            self._close()

    def exchange_done(self, ex: NativeExchange) -> None:
        """An answer is complete: close, or go on with the next pipelined request."""
        if ex is not self._active:
            return
        self._active = None
        if not ex.body_done:
            self._close(linger=True)  # answered before the whole request body arrived
            return
        if not ex.keep_alive or self.state is MUST_CLOSE and not self._queue:
            self._close()
            return
        self._continue()

    def _continue(self) -> None:
        """Between answers: the next pipelined request, or read the next one. Held while the
        client leaves its answers unread (our write buffer over its high-water mark), or a client
        that sends requests and never reads would make us buffer answers without end;
        ``resume_writing`` comes back here. Held or idle, ``keepalive_timeout`` closes it."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._active is not None:
            return
        state = self.state
        if self._queue:
            if not self.flow.write_paused:
                self._start(self._queue.popleft())
                self.resume_reading()
                return
        elif state is ACTIVE:  # the last answer is done
            if self._head_started:
                self._to(READING_HEAD)  # part of the next head came with the answer's requests
            elif self._limits.draining:
                self._to_drain_idle()
            else:
                self._to(IDLE)
        if self.state is DRAIN_IDLE:
            # the grace timer runs; reading stops while the client leaves answers unread
            if self.flow.write_paused:
                self.flow.pause_reading()
            else:
                self.resume_reading()
            return
        if self.state is not IDLE and self.state is not READING_HEAD and not self._queue:
            return  # closing, or upgraded: nothing more to start
        self._idle_since = self.loop.time()
        if self.flow.write_paused:
            self.flow.pause_reading()
            if self._timer is not None:  # the deadline counts from now: a pending timer may be due later
                self._timer.cancel()
                self._timer = None
        else:
            self.resume_reading()
        if self._timer is None:
            self._timer = self.loop.call_later(self._limits.keepalive_timeout, self._check_deadlines)

    def _close(self, linger: bool = False) -> None:
        """Close after what is queued. ``linger``: the client may still be sending (the answer came
        before its whole request body): a close with unread input makes the kernel answer with a
        reset, which destroys what of our answer is still on its way (found by the differential
        test: early answers cut after a few KB). So half-close instead (FIN after the answer),
        discard what still comes, and close at the client's EOF or after ``LINGER_SECONDS``, as
        nginx's lingering_close does."""
        if self.state is not CLOSED:
            self._to(MUST_CLOSE)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._writes.flush()  # what this connection queued goes before the close
        if linger and transport.can_write_eof():
            transport.write_eof()
            self._cancel_timers()
            self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)
            self.flow.resume_reading()  # MUST_CLOSE: data_received discards it
            return
        transport.close()

    # --- refusing ----------------------------------------------------------------------------------

    def _stop(self, status: int, reason: str, detail: str) -> Refused:
        """Remember why; httptools turns the raised exception into an HttpParserError."""
        self._refusal = Refused(status, reason, detail)
        return self._refusal

    def _refuse(self, refusal: Refused) -> None:
        """Answer (if no answer has started) and close; the running request, if any, sees a disconnect.

        If the refused request is pipelined behind answers still in progress, writing our answer
        now would make it read as the answer to an earlier request (a response desync): the earlier
        answers finish instead, then the connection closes without a word about this one.
        """
        self._refusal = None
        self._to(MUST_CLOSE)
        self._cancel_timers()
        self._limits.count(refusal.reason)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        refused = self._parsing  # refused mid-body: that request has an exchange
        active = self._active
        if active is not None and active is not refused and not active.complete:
            if refused is not None and refused in self._queue:
                self._queue.remove(refused)
            last = self._queue[-1] if self._queue else active
            last.keep_alive = False  # answered, then the connection closes
            return
        self._writes.flush()  # answers queued before this refusal go first
        if refused is None or not refused._responded:
            reason = refusal.reason.replace("_", " ").encode()
            body = b'{"error":"%s","detail":"%s"}' % (reason, refusal.detail.encode())
            transport.write(b"".join((STATUS_LINES[refusal.status],
                                      b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                                      b"connection: close\r\n\r\n", body)))  # fmt: skip
        if refused is not None and not refused.complete:
            refused._disconnect()  # its handler sees the client gone; its later writes are dropped
        transport.close()

    # --- deadlines: one timer per connection, re-armed for the remainder -----------------------------

    def _check_deadlines(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        limits = self._limits
        if self.state is DRAIN_IDLE:
            waited = now - (self._idle_since or now)
            if waited >= limits.drain_idle_grace:
                if self.flow.write_paused:
                    transport.abort()  # answers the client never reads would hold the close
                else:
                    self._close()
                return
            self._timer = self.loop.call_later(limits.drain_idle_grace - waited, self._check_deadlines)
            return
        if self._head_since is not None:
            waited = now - self._head_since
            if waited >= limits.header_timeout:
                if self._url or self._head_bytes:
                    self._refuse(Refused(408, "header_timeout", "request headers not received in time"))
                else:  # a connection that never sent a byte of this request: just close it
                    limits.count("header_timeout")
                    self._close()
                return
            self._timer = self.loop.call_later(limits.header_timeout - waited, self._check_deadlines)
        elif self._idle_since is not None:
            waited = now - self._idle_since
            if waited >= limits.keepalive_timeout:
                self._to(MUST_CLOSE)
                if self.flow.write_paused:
                    # a client that does not read its answers: a close would wait to flush them
                    # to it for ever, holding the buffer; drop them with the connection
                    limits.count("answers_unread")
                    transport.abort()
                else:
                    self._close()
                return
            self._timer = self.loop.call_later(limits.keepalive_timeout - waited, self._check_deadlines)
        # otherwise a request is being answered: re-armed when the connection is idle again

    def _check_body(self) -> None:
        """A stalled upload: the longest silence between two reads of a body (not counted while we
        ourselves stopped reading because the backend is slow)."""
        self._body_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self._parsing is None:
            return
        now = self.loop.time()
        if self.flow.read_paused:
            self._last_body = now
        idle = now - self._last_body
        timeout = self._limits.body_timeout
        if idle >= timeout:
            self._refuse(Refused(408, "body_timeout", "request body stalled"))
        else:
            self._body_timer = self.loop.call_later(timeout - idle, self._check_body)

    def _cancel_timers(self) -> None:
        for name in ("_timer", "_body_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)


def _is_websocket(ex: NativeExchange) -> bool:
    if ex.method != "GET":
        return False
    return any(name == b"upgrade" and value.strip().lower() == b"websocket" for name, value in ex.headers)


class HttpServer:
    """Our listener(s) for one handler: start, then stop gracefully (drain, then close)."""

    def __init__(
        self, handler: Handler, limits: ServerLimits, tls: ssl.SSLContext | None = None,
        fast: FastHandler | None = None, h2: H2Takeover | None = None, h2_only: bool = False,
    ) -> None:  # fmt: skip
        self._handler = handler
        self._fast = fast
        self._h2 = h2  # HTTP/2: h2c prior knowledge and ALPN h2 beside HTTP/1.1
        self._h2_only = h2_only and h2 is not None  # a listener that speaks only h2c
        self._writes = WriteBatch()  # its clients' answers of one loop pass go out together
        self.limits = limits
        self.tls = tls  # TLS termination: handshakes use whatever certificate the context holds now
        self.servers: list[asyncio.Server] = []
        self.started = False
        self.forced = False

    def protocol(self) -> asyncio.Protocol:
        scheme = "https" if self.tls is not None else "http"
        if self._h2_only and self._h2 is not None:
            return self._h2.protocol(self._handler, self.limits, scheme)
        return ServerProtocol(self._handler, self.limits, scheme, self._fast, self._writes, self._h2)

    async def listen(self, host: str, port: int, sock: Any = None, backlog: int = 2048) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        if sock is not None:
            server = await loop.create_server(self.protocol, sock=sock, backlog=backlog, ssl=self.tls)
        else:
            server = await loop.create_server(
                self.protocol, host, port, backlog=backlog, reuse_address=True, ssl=self.tls
            )
        self.servers.append(server)
        return server

    @property
    def ports(self) -> list[int]:
        servers: list[Any] = list(self.servers)  # Any: see _close_listeners
        return [s.getsockname()[1] for server in servers for s in server.sockets]

    def force(self) -> None:
        """A second stop signal: the drain in progress ends at once."""
        self.forced = True

    def stop_listening(self) -> None:
        """Stop accepting; the connections are drained by the server whose limits they share."""
        for server in self.servers:
            server.close()

    def _close_listeners(self) -> list[socket.socket]:
        """Stop listening, taking first every connection the kernel already queued: closing a
        listener resets those (their clients sent a request we would never answer). A duplicate of
        each listening descriptor keeps the queue while the loop's servers close; it is then read
        until empty (EAGAIN) and closed. With SO_REUSEPORT workers each does this for its socket."""
        dups: list[socket.socket] = []
        for server in self.servers:
            # Any: uvloop's sockets are a list where the stubs say tuple (compiled code checks it)
            loose: Any = server
            for listener in loose.sockets:
                with contextlib.suppress(OSError):
                    dups.append(socket.socket(fileno=os.dup(listener.fileno())))
        for server in self.servers:
            server.close()
        queued: list[socket.socket] = []
        for dup in dups:
            dup.setblocking(False)
            while True:
                try:
                    sock, _ = dup.accept()
                except OSError:  # EAGAIN: the queue is empty (or EMFILE: nothing more we can take)
                    break
                sock.setblocking(False)
                queued.append(sock)
            dup.close()
        return queued

    async def stop(self, drain_timeout: float, ws_grace: float = 0.0) -> None:
        """A graceful stop (docs/architecture.md "Graceful stop (drain)"): take the queued
        connections and stop listening; from now on every answer says ``Connection: close``; idle
        connections get ``drain_idle_grace`` for one more request; WebSockets get 1001 after
        ``ws_grace``; the drain ends once no connection is left, at ``drain_timeout``, or at once
        when ``force()`` is called (a second signal). Whatever is left then is aborted."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        limits.draining = True
        queued = self._close_listeners()
        for conn in list(limits.connections):
            conn.begin_drain()
        # connections taken from the queue: served like the others (their protocol starts draining)
        taking = [loop.create_task(self._take(sock)) for sock in queued]
        # connections the loop accepted just before the stop get connection_made in its next pass
        # (they start draining there): look at limits.connections only after it
        await asyncio.sleep(0)
        started = loop.time()
        deadline = started + drain_timeout
        ws_at = started + min(ws_grace, drain_timeout)
        while not self.forced and loop.time() < deadline:
            if loop.time() >= ws_at:
                for conn in list(limits.connections):
                    if conn._ws is not None:  # relayed WebSockets are told to reconnect elsewhere
                        conn._ws.close_now(1001, "server shutting down")
            if not limits.connections and all(task.done() for task in taking):
                break
            await asyncio.sleep(0.02)
        for task in taking:
            task.cancel()
        for conn in list(limits.connections):
            if conn.transport is not None:
                # abort, not close: a close waits to flush what a client that stopped reading will
                # never take, and the shutdown would wait with it
                conn.transport.abort()
        for server in self.servers:
            await server.wait_closed()

    async def _take(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.protocol, sock, ssl=self.tls)
        except (OSError, ssl.SSLError, asyncio.CancelledError):
            sock.close()

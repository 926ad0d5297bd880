"""WebSocket framing on our asyncio transports, with the ``websockets`` sans-I/O protocol.

Why the sans-I/O layer and not ``websockets.serve``/``connect``: our own server protocol already
owns the client connection (the upgrade request was parsed there), and the upstream connection
must be opened by us to the configured origin only, with the same origin-form target rules as
HTTP. ``websockets.protocol`` parses and validates frames (masking, UTF-8, control frame rules,
message size) and nothing else, so it fits between our transports.

A ``FrameSocket`` is one side of a relayed connection: frames in (bounded queue, reading paused
above a high-water mark), frames out (``await send`` waits while the transport is paused), so a
slow reader on one side slows the writer on the other and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import ssl
from collections.abc import Callable, Sequence

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import CLOSED, OPEN, Protocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from proxy.edge.client import Origin, request_head
from proxy.edge.errors import UpstreamConnectError, UpstreamConnectTimeout, UpstreamError, UpstreamTimeout

# websockets logs "connection closed" per connection at INFO: never per-connection lines from us
quiet_log = logging.getLogger("strangler.websocket")
quiet_log.setLevel(logging.WARNING)

QUEUE_HIGH_WATER = 256 * 1024  # received payload bytes held before we stop reading that side
HANDSHAKE_BODY_LIMIT = 64 * 1024  # an upstream refusal's body passed on to the client, at most
ABNORMAL = 1006


class Handshake:
    """The upstream's answer to our upgrade request."""

    __slots__ = ("status", "headers", "body", "subprotocol")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, subprotocol: str | None):
        self.status = status
        self.headers = headers
        self.body = body
        self.subprotocol = subprotocol


class WsHandshakeRefused(UpstreamError):
    """The upstream answered the upgrade with something other than a valid 101."""

    kind = "ws_handshake"

    def __init__(self, version: str, detail: str, answer: Handshake | None) -> None:
        super().__init__(version, detail)
        self.answer = answer  # the upstream's own non-101 answer (its 4xx is passed on), else None


class FrameSocket:
    """One side of a relay: a websockets ``Protocol`` driven by an asyncio transport."""

    def __init__(self, protocol: Protocol, transport: asyncio.Transport | None = None) -> None:
        self.protocol = protocol
        self.transport = transport
        self._events: collections.deque[Frame] = collections.deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self.write_paused = False
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    # --- fed by the transport ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        self._collect()

    def feed_eof(self) -> None:
        if self.protocol.state is not CLOSED:
            try:
                self.protocol.receive_eof()
            except Exception:  # noqa: BLE001 - EOF after the parser already stopped
                pass
        self._collect()

    def connection_lost(self) -> None:
        self.lost = True
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _collect(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._events.append(event)
                self._queued += len(event.data)
        self._flush()  # automatic pongs, close echoes, failures
        if self._queued > QUEUE_HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if transport.is_closing():
                return
            if data:
                transport.write(data)
            else:  # SEND_EOF: this side is done
                if transport.can_write_eof():
                    transport.write_eof()
                transport.close()

    # --- used by the relay -------------------------------------------------------------------------

    async def recv(self) -> Frame | None:
        """The next frame (close frames included), or None once the connection is gone."""
        while True:
            if self._events:
                frame = self._events.popleft()
                self._queued -= len(frame.data)
                if self._read_paused and self._queued <= QUEUE_HIGH_WATER // 4 and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
                return frame
            if self.lost or self.protocol.state is CLOSED or self.protocol.parser_exc is not None:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def is_open(self) -> bool:
        return self.protocol.state is OPEN and not self.lost

    async def send(self, frame: Frame) -> None:
        """Pass one data or control frame on (close frames go through ``close``)."""
        if not self.is_open:
            return
        protocol = self.protocol
        opcode = frame.opcode
        if opcode is Opcode.TEXT:
            protocol.send_text(frame.data, frame.fin)
        elif opcode is Opcode.BINARY:
            protocol.send_binary(frame.data, frame.fin)
        elif opcode is Opcode.CONT:
            protocol.send_continuation(frame.data, frame.fin)
        elif opcode is Opcode.PING:
            protocol.send_ping(frame.data)
        elif opcode is Opcode.PONG:
            protocol.send_pong(frame.data)
        self._flush()
        if self.write_paused and not self.lost:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    async def close(self, code: int | None, reason: str = "") -> None:
        self.close_now(code, reason)

    def close_now(self, code: int | None, reason: str = "") -> None:
        """Start the closing handshake with ``code``; no-op once closing."""
        if self.is_open:
            if code is None or code in (1005, 1006, 1015):
                self.protocol.send_close()
            else:
                self.protocol.send_close(code, reason)
            self._flush()

    def fail(self, code: int, reason: str = "") -> None:
        if self.is_open:
            self.protocol.fail(code, reason)
            self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def failed_code(self) -> int | None:
        """Set when the protocol itself refused the peer (1009 too big, 1002 protocol error...)."""
        if self.protocol.parser_exc is None:
            return None
        sent: Close | None = self.protocol.close_sent
        return None if sent is None or sent.code == ABNORMAL else int(sent.code)


class _UpstreamProtocol(asyncio.Protocol):
    """The asyncio side of an upstream WebSocket connection."""

    def __init__(self, socket: FrameSocket) -> None:
        self.socket = socket
        self.handshake: asyncio.Future[Response] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.socket.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        protocol = self.socket.protocol
        if not self.handshake.done():
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Response):
                    self.handshake.set_result(event)
                    break
            self.socket._collect()  # frames that came with the 101, if any
            return
        self.socket.feed(data)

    def eof_received(self) -> bool | None:
        if not self.handshake.done():
            self.socket.protocol.receive_eof()
            for event in self.socket.protocol.events_received():
                if isinstance(event, Response):
                    self.handshake.set_result(event)
                    break
        self.socket.feed_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError("upstream closed during the handshake"))
        self.socket.connection_lost()

    def pause_writing(self) -> None:
        self.socket.pause_writing()

    def resume_writing(self) -> None:
        self.socket.resume_writing()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


async def open_upstream(
    version: str,
    origin: Origin,
    ssl_context: ssl.SSLContext | None,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    subprotocols: Sequence[str],
    *,
    max_size: int,
    connect_timeout: float,
    handshake_timeout: float,
    add_host: bool = True,
) -> tuple[FrameSocket, str | None]:
    """Connect to the configured origin and complete the upgrade; raises ``UpstreamError``.

    The request head is built by the HTTP client's ``request_head``, so the same target rules
    apply (origin-form only, under the origin's base path). Extensions are never offered: frames
    are relayed as they are, so both sides must speak plain RFC 6455.
    """
    uri = parse_uri(("wss://" if ssl_context is not None else "ws://") + "upstream.invalid/")
    protocol = ClientProtocol(
        uri,
        subprotocols=[Subprotocol(p) for p in subprotocols] or None,
        max_size=max_size or None,
        logger=quiet_log,
    )
    socket = FrameSocket(protocol)
    conn = _UpstreamProtocol(socket)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(
                lambda: conn, origin.host, origin.port, ssl=ssl_context,
                server_hostname=origin.host if ssl_context is not None else None,
            )  # fmt: skip
    except TimeoutError:
        raise UpstreamConnectTimeout(version, "connect timeout") from None
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamConnectError(version, f"cannot connect: {type(exc).__name__}") from None
    upgrade = [
        *headers,
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", protocol.key.encode()),
        (b"sec-websocket-version", b"13"),
    ]
    if subprotocols:
        upgrade.append((b"sec-websocket-protocol", ", ".join(subprotocols).encode()))
    assert socket.transport is not None
    socket.transport.write(request_head(b"GET", origin, target, upgrade, add_host, b""))
    try:
        async with asyncio.timeout(handshake_timeout):
            response = await conn.handshake
    except TimeoutError:
        socket.abort()
        raise UpstreamTimeout(version, "websocket handshake timeout") from None
    except ConnectionError:
        socket.abort()
        raise WsHandshakeRefused(version, "upstream closed during the websocket handshake", None) from None
    failure = protocol.handshake_exc
    if failure is not None:
        socket.abort()
        raise _refusal(version, failure, response) from None
    return socket, protocol.subprotocol


def _refusal(version: str, exc: Exception, response: Response) -> WsHandshakeRefused:
    if isinstance(exc, InvalidStatus) and response.status_code != 101:
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.raw_items()
        ]
        body = bytes(response.body or b"")[:HANDSHAKE_BODY_LIMIT]
        return WsHandshakeRefused(
            version, f"upstream refused the upgrade ({response.status_code})",
            Handshake(response.status_code, headers, body, None),
        )  # fmt: skip
    detail = "invalid websocket handshake from upstream"
    if isinstance(exc, InvalidHandshake):
        detail = f"invalid websocket handshake from upstream: {type(exc).__name__}"
    return WsHandshakeRefused(version, detail, None)

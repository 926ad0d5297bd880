"""WebSocket framing on our asyncio transports, with the ``websockets`` sans-I/O protocol.

Why the sans-I/O layer and not ``websockets.serve``/``connect``: our own server protocol already
owns the client connection (the upgrade request was parsed there), and the upstream connection
must be opened by us to the configured origin only, with the same origin-form target rules as
HTTP. ``websockets.protocol`` parses and validates frames (masking, UTF-8, control frame rules,
message size) and nothing else, so it fits between our transports.

A ``FrameSocket`` is one side of a relayed connection: frames in (bounded queue, reading paused
above a high-water mark), frames out (``await send`` waits while the transport is paused), so a
slow reader on one side slows the writer on the other and memory stays bounded. The protocol
answers pings and close frames by itself; those answers obey the same backpressure: while they
sit in a write buffer the peer does not empty, nothing more is read from that peer (a ping flood
from a peer that never reads costs one read's worth of pongs, not the whole flood). The flow
control itself is ``proxy.edge.flow.FlowControl``, shared with the HTTP server and client.

On the upstream side the bytes after the 101 head (frames the backend sent in the same packet)
are parsed by the same protocol in the same call and queued like any later frame.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from typing import Final

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import CLOSED, OPEN, Protocol
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from proxy.edge.client import Origin, request_head
from proxy.edge.errors import UpstreamConnectError, UpstreamConnectTimeout, UpstreamError, UpstreamTimeout
from proxy.edge.flow import FlowControl

# websockets logs "connection closed" per connection at INFO: never per-connection lines from us
quiet_log = logging.getLogger("strangler.websocket")
quiet_log.setLevel(logging.WARNING)

# received frames held for the relay (payload + FRAME_COST each) before we stop reading that
# side, and the level they must fall to before we read on
QUEUE_HIGH_WATER: Final = 256 * 1024
QUEUE_LOW_WATER: Final = QUEUE_HIGH_WATER // 4
FRAME_COST: Final = 144  # what a parsed frame costs beyond its payload (measured): empty frames count too
FEED_SLICE: Final = 16 * 1024  # received bytes parsed at a time (see FrameSocket._parse)
HANDSHAKE_BODY_LIMIT: Final = 64 * 1024  # an upstream refusal's body passed on to the client, at most
ABNORMAL: Final = 1006


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
    """One side of a relay: a websockets ``Protocol`` driven by an asyncio transport.

    Flow control (``FlowControl``): reading pauses while more than ``QUEUE_HIGH_WATER`` of received
    frames wait for the relay, and while answers the protocol wrote by itself (pongs, close echoes)
    sit in a write buffer the peer does not empty; ``send`` waits while the write buffer is full."""

    def __init__(self, protocol: Protocol, transport: asyncio.Transport | None = None) -> None:
        self.protocol = protocol
        self.flow = FlowControl()
        if transport is not None:
            self.flow.attach(transport)
        self._events: collections.deque[Frame] = collections.deque()
        self._queued = 0  # what the queued frames cost: payload plus FRAME_COST each
        self._answers_held = False  # reading paused until the peer reads our automatic answers
        self._unparsed = b""  # received, not parsed yet: waits while the queue is full or answers held
        self._waiter: asyncio.Future[None] | None = None
        # the upstream side: set once the peer's answer to our upgrade request has been parsed
        self.handshake: asyncio.Future[Response] | None = None
        self.on_lost: Callable[[], None] | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.flow.transport

    def attach(self, transport: asyncio.BaseTransport) -> None:
        self.flow.attach(transport)

    @property
    def write_paused(self) -> bool:
        return self.flow.write_paused

    @property
    def lost(self) -> bool:
        return self.flow.gone

    # --- fed by the transport ----------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._unparsed = self._unparsed + data if self._unparsed else data
        self._parse()

    def feed_eof(self) -> None:
        if self._unparsed:  # reading was paused, so nothing should wait here; never lose it anyway
            data, self._unparsed = self._unparsed, b""
            self.protocol.receive_data(data)
            self._collect()
        if self.protocol.state is not CLOSED:
            try:
                self.protocol.receive_eof()
            except Exception:  # noqa: BLE001 - EOF after the parser already stopped
                pass
        self._collect()
        self._wake()

    def connection_lost(self) -> None:
        self.flow.lost()
        self._wake()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        self.flow.writing_paused()

    def resume_writing(self) -> None:
        self.flow.writing_resumed()
        if self._answers_held:  # the peer read our answers: it may send more
            self._answers_held = False
            self._read_on()

    def _full(self) -> bool:
        return self._answers_held or self._queued > QUEUE_HIGH_WATER

    def _parse(self) -> None:
        """Parse what was received, a slice at a time, until done or full; the rest waits, with
        reading paused. Slices bound what one read costs: a 256 KiB read of 6-byte frames would
        otherwise become 40,000 parsed frames (6 MiB) and as many pongs in one call."""
        data = self._unparsed
        offset = 0
        size = len(data)
        while offset < size and not self._full():
            piece = data if offset == 0 and size <= FEED_SLICE else data[offset : offset + FEED_SLICE]
            offset += len(piece)
            self.protocol.receive_data(piece)
            self._collect()
        self._unparsed = data[offset:] if offset < size else b""
        self._steer_reading()
        self._wake()

    def _read_on(self) -> None:
        """The relay took frames or the peer read our answers: parse what waits, read on."""
        if self._full() or self._queued > QUEUE_LOW_WATER:
            return
        if self._unparsed:
            self._parse()
        else:
            self._steer_reading()

    def _collect(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._events.append(event)
                self._queued += len(event.data) + FRAME_COST
            elif isinstance(event, Response):
                handshake = self.handshake
                if handshake is not None and not handshake.done():
                    handshake.set_result(event)
        # what the protocol wrote by itself (automatic pongs, close echoes, failures) goes out
        # now; if it lands in a full write buffer, nothing more is parsed or read from this peer
        # until it reads: otherwise a peer that pings and never reads grows our buffer for ever
        if self._flush() and self.flow.write_paused:
            self._answers_held = True

    def _steer_reading(self) -> None:
        if self._full() or self._unparsed:
            self.flow.pause_reading()
        elif self.flow.read_paused and self._queued <= QUEUE_LOW_WATER:
            self.flow.resume_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> bool:
        """Write what the protocol has to send; True if anything was written."""
        transport = self.flow.transport
        if transport is None:
            return False
        wrote = False
        for data in self.protocol.data_to_send():
            if transport.is_closing():
                break
            wrote = True
            if data:
                transport.write(data)
            else:  # SEND_EOF: this side is done
                if transport.can_write_eof():
                    transport.write_eof()
                transport.close()
        return wrote

    # --- used by the relay -------------------------------------------------------------------------

    async def recv(self) -> Frame | None:
        """The next frame (close frames included), or None once the connection is gone."""
        while True:
            if self._events:
                frame = self._events.popleft()
                self._queued -= len(frame.data) + FRAME_COST
                if self.flow.read_paused or self._unparsed:
                    self._read_on()
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
        try:
            await self.flow.drain()
        except ConnectionResetError:
            return  # the relay learns it from this side's recv (None), with the right blame

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
    """The asyncio side of an upstream WebSocket connection: every byte goes to the frame socket,
    whose protocol parses the 101 and then, from the same bytes on, frames."""

    def __init__(self, socket: FrameSocket) -> None:
        self.socket = socket
        self.handshake: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        socket.handshake = self.handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.socket.attach(transport)

    def data_received(self, data: bytes) -> None:
        # frames in the same packet as the 101 are parsed in the same call and queued
        self.socket.feed(data)

    def eof_received(self) -> bool | None:
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

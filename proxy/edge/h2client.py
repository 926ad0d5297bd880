"""The upstream HTTP/2 client: a pool of multiplexed connections to one configured origin.

Built on the ``h2`` state machine (sans-I/O: it frames, does HPACK and checks every stream's
state; we do the I/O). One connection carries up to the backend's SETTINGS_MAX_CONCURRENT_STREAMS
streams; a second one is opened only when every open one is full (bounded by the pool size).

Why these rules (RFC 9113):
- where a request goes comes only from settings: ``:scheme``/``:authority`` are the configured
  origin's (or the client's Host with ``preserve_host``), ``:path`` is the base path plus an
  origin-form target; nothing a client sends picks the host;
- flow control both ways: ``send`` waits for the backend's window (bounded by the read timeout),
  and a received DATA frame is credited back only when the caller takes it (``chunks()``), so a
  slow client slows its backend stream instead of growing our buffers;
- GOAWAY: no new stream goes on that connection; streams above its last stream id were not
  processed (RFC 9113 6.8) and fail with ``nothing_sent``, as does REFUSED_STREAM, so the caller
  may send them again once or fall back; streams below it finish. (``h2`` closes its state machine
  on any GOAWAY; we put it back to open so those streams can finish, and never open another.)
- an https origin must choose ``h2`` by ALPN, else it is an upstream protocol error.

Errors are ``proxy.edge.errors`` classes with details safe to show (no addresses).
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
from collections.abc import AsyncIterator
from typing import Final, cast

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.settings import SettingCodes

from proxy.edge.client import Headers, Origin, PoolLimits, _reason
from proxy.edge.errors import (
    H2NotNegotiated,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamRefusedStream,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.edge.headers import HOP_BY_HOP

STREAM_WINDOW: Final = 1 << 20  # what we advertise per stream: buffered per stream at most
CONNECTION_WINDOW: Final = 16 << 20  # and per connection, across its streams
IDLE_SECONDS: Final = 60.0  # a connection with no stream for this long is closed (GOAWAY)
_BAD_IN_TARGET: Final = re.compile(rb"[ \r\n\t#\x00]")


class H2Stream:
    """One request/answer exchange on a pooled HTTP/2 connection. Used by one task (the
    forwarding core): ``send`` the body, await ``response``, iterate ``chunks``, read ``trailers``."""

    __slots__ = ("_conn", "stream_id", "read_timeout", "deadline", "_head", "_data", "_readable", "_window",
                 "ended", "headers_only", "trailers", "_error", "closed", "_unacked", "sent_end")  # fmt: skip

    def __init__(self, conn: _H2Conn, stream_id: int, read_timeout: float, deadline: float | None) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.read_timeout = read_timeout
        self.deadline = deadline  # loop time after which the call has failed (a gRPC deadline)
        self._head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = conn.loop.create_future()
        self._data: collections.deque[tuple[bytes, int]] = collections.deque()
        self._readable = asyncio.Event()
        self._window = asyncio.Event()
        self.ended = False  # the backend ended its side (END_STREAM)
        self.headers_only = False  # the answer was one HEADERS frame with END_STREAM (gRPC trailers-only)
        self.trailers: list[tuple[bytes, bytes]] = []  # filled when chunks() ends
        self._error: UpstreamError | None = None
        self.closed = False  # both sides done, reset or failed: forgotten by the connection
        self._unacked = 0  # flow-controlled bytes handed out and not credited back yet
        self.sent_end = False  # our side ended (END_STREAM sent)

    # --- the caller's side ---------------------------------------------------------------------------

    async def send(self, data: bytes, end: bool) -> None:
        """Body bytes, as the backend's flow-control window allows (waiting for WINDOW_UPDATE at
        most the read timeout); ``end`` ends our side. Raises ``UpstreamError``."""
        conn = self._conn
        offset = 0
        size = len(data)
        while True:
            self._check()
            if offset >= size:
                if end:
                    conn.end(self)
                break
            window = min(conn.h2.local_flow_control_window(self.stream_id), conn.h2.max_outbound_frame_size)
            if window <= 0:
                self._window.clear()
                await self._wait(self._window, "send timeout")
                continue
            piece = data[offset : offset + window]
            offset += len(piece)
            conn.send(self, piece, end and offset >= size)
            if end and offset >= size:
                break
        await conn.drained()
        self._check()

    async def response(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The answer's status and headers (1xx interim answers skipped), within the read timeout."""
        if not self._head.done():
            try:
                async with asyncio.timeout(self._timeout()):
                    await asyncio.shield(self._head)
            except TimeoutError:
                self._fail_timeout("read timeout")
        return self._head.result()

    def chunks(self) -> AsyncIterator[bytes]:
        """The answer's DATA, each credited back to the backend's window as the next is asked for."""
        return _Chunks(self)

    def cancel(self) -> None:
        """RST_STREAM(CANCEL) if the stream is still open (the client left, or a deadline passed)."""
        if not self.closed:
            self._conn.reset(self, ErrorCodes.CANCEL)
            self._fail(UpstreamReset(self._conn.version, "stream cancelled"))

    # --- internals ---------------------------------------------------------------------------------------

    def _timeout(self) -> float:
        timeout = self.read_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - self._conn.loop.time())
        return max(timeout, 0.0)

    async def _wait(self, event: asyncio.Event, what: str) -> None:
        try:
            async with asyncio.timeout(self._timeout()):
                await event.wait()
        except TimeoutError:
            self._fail_timeout(what)

    def _fail_timeout(self, what: str) -> None:
        error = UpstreamTimeout(self._conn.version, what)
        if not self.closed:
            self._conn.reset(self, ErrorCodes.CANCEL)
            self._fail(error)
        raise error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _ack(self) -> None:
        if self._unacked and not self.closed:
            self._conn.ack(self, self._unacked)
        self._unacked = 0

    # fed by the connection
    def _on_head(self, status: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if not self._head.done():
            self.headers_only = ended
            self._head.set_result((status, headers))

    def _on_data(self, data: bytes, flow: int) -> None:
        self._data.append((data, flow))
        self._readable.set()

    def _on_end(self) -> None:
        self.ended = True
        self._readable.set()

    def _fail(self, error: UpstreamError) -> None:
        """The stream is over with an error: every waiter wakes and raises it."""
        if self._error is None and not (self.ended and self._head.done()):
            self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: nobody may be waiting yet
        self._readable.set()
        self._window.set()
        self._conn.forget(self)


class _Chunks:
    """``H2Stream.chunks()``: an async iterator class (not a generator), so the window credit
    for a chunk goes back only when the caller comes for the next one."""

    __slots__ = ("_stream",)

    def __init__(self, stream: H2Stream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        stream = self._stream
        stream._ack()
        while True:
            if stream._data:
                data, flow = stream._data.popleft()
                stream._unacked += flow
                if data:
                    return data
                stream._ack()  # padding only
                continue
            if stream.ended:
                if not stream.sent_end and not stream.closed:
                    # the answer is whole before our request was: stop the rest of the request
                    stream._conn.reset(stream, ErrorCodes.CANCEL)
                stream._conn.forget(stream)
                raise StopAsyncIteration
            stream._check()
            stream._readable.clear()
            await stream._wait(stream._readable, "read timeout")


class _H2Conn(asyncio.Protocol):
    """One HTTP/2 connection to the backend: the ``h2`` state machine and our I/O around it."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.version = pool.version
        self.loop = pool.loop
        config = H2Configuration(client_side=True, header_encoding=None)
        self.h2 = H2Connection(config)
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.goaway_last: int | None = None  # the lowest last-stream-id of GOAWAYs received
        self.closed = False
        self._paused = False
        self._drain: asyncio.Event | None = None
        self._idle: asyncio.TimerHandle | None = None
        # the backend's first SETTINGS arrived: no stream is opened before (its stream limit and
        # windows are known, and a backend that does not speak HTTP/2 fails here, nothing sent)
        self.ready: asyncio.Future[None] = self.loop.create_future()

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        h2 = self.h2
        h2.initiate_connection()
        h2.update_settings(
            {
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.pool.limits.max_head_bytes,
            }
        )
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.flush()  # the GOAWAY h2 queued
            self._lost(UpstreamProtocolError(self.version, "HTTP/2 protocol error from the backend"))
            return
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data or b"", event.flow_controlled_length or 0)
                elif event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, ResponseReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._head(stream, cast(list[tuple[bytes, bytes]], event.headers), event.stream_ended)
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers = _plain(cast(list[tuple[bytes, bytes]], event.headers), HOP_BY_HOP)
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream._on_end()
            elif isinstance(event, StreamReset):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.closed = True  # reset by the peer: nothing to send back
                    if event.error_code == ErrorCodes.REFUSED_STREAM:
                        stream._fail(UpstreamRefusedStream(self.version, "stream refused by the backend"))
                    else:
                        stream._fail(UpstreamReset(self.version, "stream reset by the backend"))
            elif isinstance(event, WindowUpdated):
                if event.stream_id == 0:
                    for stream in self.streams.values():
                        stream._window.set()
                else:
                    stream = self.streams.get(event.stream_id)
                    if stream is not None:
                        stream._window.set()
            elif isinstance(event, RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                for stream in self.streams.values():
                    stream._window.set()
            elif isinstance(event, ConnectionTerminated):
                self._goaway(event.last_stream_id or 0, event.error_code)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(UpstreamReset(self.version, "connection lost"))

    def eof_received(self) -> bool | None:
        return None  # close our side too: connection_lost follows

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None:
            self._drain.set()
            self._drain = None

    # --- what streams ask of it ----------------------------------------------------------------------

    @property
    def has_room(self) -> bool:
        if self.closed or self.goaway_last is not None:
            return False
        return len(self.streams) < self.h2.remote_settings.max_concurrent_streams

    def start(self, headers: list[tuple[bytes, bytes]], end_stream: bool, read_timeout: float,
              deadline: float | None) -> H2Stream:  # fmt: skip
        """A new stream with its HEADERS written (raises ``UpstreamRefusedStream`` if this
        connection cannot take one after all: the caller tries another)."""
        if not self.has_room:
            raise UpstreamRefusedStream(self.version, "connection closing")
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id, read_timeout, deadline)
        stream.sent_end = end_stream
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except H2Error:
            raise UpstreamProtocolError(self.version, "request headers not valid in HTTP/2") from None
        self.streams[stream_id] = stream
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.flush()
        return stream

    def send(self, stream: H2Stream, data: bytes, end: bool) -> None:
        try:
            self.h2.send_data(stream.stream_id, data, end_stream=end)
            stream.sent_end = end
        except H2Error:
            stream._fail(UpstreamReset(self.version, "stream closed while sending"))
            raise stream._error or UpstreamReset(self.version, "stream closed") from None
        self.flush()

    def end(self, stream: H2Stream) -> None:
        try:
            self.h2.end_stream(stream.stream_id)
            stream.sent_end = True
        except H2Error:
            stream._fail(UpstreamReset(self.version, "stream closed while sending"))
            raise stream._error or UpstreamReset(self.version, "stream closed") from None
        self.flush()

    def ack(self, stream: H2Stream, size: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream.stream_id)
        except H2Error:
            return  # the stream closed meanwhile: the connection window was credited by h2
        self.flush()

    def reset(self, stream: H2Stream, code: ErrorCodes) -> None:
        stream.closed = True
        if not self.closed:
            try:
                self.h2.reset_stream(stream.stream_id, code)
            except H2Error:
                pass  # already closed on the h2 side
            self.flush()

    def forget(self, stream: H2Stream) -> None:
        """A stream over (ended both ways, reset or failed): its slot is free."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        stream.closed = True
        if not self.streams:
            if self.goaway_last is not None:
                self.close()
            elif not self.closed:
                self._idle = self.loop.call_later(IDLE_SECONDS, self.close)
        self.pool.room()

    async def drained(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        while self._paused and not self.closed:
            if self._drain is None:
                self._drain = asyncio.Event()
            await self._drain.wait()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """GOAWAY(NO_ERROR) and close; streams still open fail."""
        if self.closed:
            return
        try:
            self.h2.close_connection()
        except H2Error:
            pass
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._lost(UpstreamReset(self.version, "connection closed"))

    # --- internals -------------------------------------------------------------------------------------

    def _head(self, stream: H2Stream, raw: list[tuple[bytes, bytes]], ended: object) -> None:
        status = 0
        for name, value in raw:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
                break
        stream._on_head(status, _plain(raw, self.pool.strip), ended is not None)

    def _goaway(self, last_stream_id: int, code: object) -> None:
        """No new streams here; those above ``last_stream_id`` were not processed and fail
        retryable. h2 closed its state machine: reopened so the others can finish."""
        previous = self.goaway_last
        self.goaway_last = last_stream_id if previous is None else min(previous, last_stream_id)
        for stream in [s for s in self.streams.values() if s.stream_id > self.goaway_last]:
            stream.closed = True
            stream._fail(UpstreamRefusedStream(self.version, "stream not processed (GOAWAY)"))
        if self.streams and code == ErrorCodes.NO_ERROR:
            self.h2.state_machine.state = ConnectionState.CLIENT_OPEN
        elif self.streams:
            self._lost(UpstreamReset(self.version, "connection closed by the backend (GOAWAY)"))
        else:
            self.close()
        self.pool.room()

    def _lost(self, error: UpstreamError) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.transport is not None:
            self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()
        for stream in list(self.streams.values()):
            stream.closed = True
            stream._fail(error)
        self.streams.clear()
        self.resume_writing()  # wake senders waiting for the write buffer to drain
        self.pool.lost(self)


def _plain(raw: list[tuple[bytes, bytes]], strip: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """Headers without pseudo-headers and without those a proxy never relays."""
    return [(name, value) for name, value in raw if not name.startswith(b":") and name not in strip]


class H2Pool:
    """HTTP/2 connections to one origin, streams multiplexed on them (see the module docstring)."""

    def __init__(
        self,
        version: str,
        origin: Origin,
        limits: PoolLimits,
        ssl_context: ssl.SSLContext | None,
        strip: frozenset[bytes],
    ) -> None:
        self.version = version
        self.origin = origin
        self.limits = limits
        self.strip = strip | HOP_BY_HOP
        self._ssl = ssl_context if origin.scheme == "https" else None
        if origin.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        if self._ssl is not None:
            self._ssl.set_alpn_protocols(["h2"])
        self._scheme = origin.scheme.encode()
        self._conns: list[_H2Conn] = []
        self._connecting: asyncio.Future[_H2Conn] | None = None
        self._room: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def open(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        *,
        authority: bytes,
        end_stream: bool,
        read_timeout: float,
        deadline: float | None = None,
    ) -> H2Stream:
        """A new stream with the request's HEADERS sent. Raises ``UpstreamError``; its
        ``nothing_sent`` is True when no HEADERS of this request left us (connect failure, a
        connection closing under us, refused), and then it was tried once more first."""
        if not target.startswith(b"/") or _BAD_IN_TARGET.search(target):
            raise UpstreamProtocolError(self.version, "request target must be origin-form: /path[?query]")
        block = [
            (b":method", method),
            (b":scheme", self._scheme),
            (b":authority", authority),
            (b":path", self.origin.base_path + target),
            *headers,
        ]
        try:
            conn = await self._acquire()
            return conn.start(block, end_stream, read_timeout, deadline)
        except UpstreamRefusedStream:
            conn = await self._acquire()
            return conn.start(block, end_stream, read_timeout, deadline)

    async def close(self) -> None:
        self._closing = True
        for conn in list(self._conns):
            conn.close()

    # --- the pool ----------------------------------------------------------------------------------

    async def _acquire(self) -> _H2Conn:
        loop = self.loop
        deadline = loop.time() + self.limits.pool_timeout
        while True:
            for conn in self._conns:
                if conn.has_room:
                    return conn
            if self._closing:
                raise UpstreamConnectError(self.version, "proxy stopping")
            pending = self._connecting
            if pending is None and len(self._conns) < self.limits.size:
                pending = self._connecting = loop.create_future()
                try:
                    conn = await self._connect()
                except UpstreamError as exc:
                    pending.set_exception(exc)
                    pending.exception()
                    raise
                finally:
                    self._connecting = None
                pending.set_result(conn)
                return conn
            if pending is not None:
                conn = await asyncio.shield(pending)
                if conn.has_room:
                    return conn
                continue
            room = self._room
            if room is None:
                room = self._room = asyncio.Event()
            try:
                async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                    await room.wait()
            except TimeoutError:
                raise UpstreamPoolTimeout(self.version, "no upstream stream free in time") from None

    async def _connect(self) -> _H2Conn:
        origin = self.origin
        conn = _H2Conn(self)
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn, origin.host, origin.port, ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                )  # fmt: skip
                self._check_alpn(conn)
                await conn.ready
        except H2NotNegotiated:
            raise
        except UpstreamError:
            conn.close()
            raise H2NotNegotiated(self.version, "backend did not speak HTTP/2") from None
        except TimeoutError:
            conn.close()
            raise UpstreamConnectTimeout(self.version, "connect timeout") from None
        except (ssl.SSLError, ssl.CertificateError):
            raise UpstreamConnectError(self.version, "TLS handshake failed") from None
        except OSError as exc:
            raise UpstreamConnectError(self.version, f"cannot connect: {_reason(exc)}") from None
        self._conns.append(conn)
        return conn

    def _check_alpn(self, conn: _H2Conn) -> None:
        if self._ssl is not None:
            transport = conn.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                conn.close()
                raise H2NotNegotiated(self.version, "backend did not choose HTTP/2 (ALPN h2)")

    def room(self) -> None:
        """A stream slot freed up (or a connection went): wake the opens waiting for one."""
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    def lost(self, conn: _H2Conn) -> None:
        if conn in self._conns:
            self._conns.remove(conn)
        self.room()

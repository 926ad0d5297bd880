"""A pooled HTTP/1.1 client to one configured origin, on httptools (llhttp).

Why our own and not aiohttp's: a proxy must control exactly which host it connects to and which
bytes go on a shared connection. Here

- the request head is built from the configured origin plus the request path as one component; a
  target that does not start with ``/`` is refused before a byte is written, so no request target
  can name another host (the asterisk-form ``*@host:port/`` trick that string-built URLs fall for);
- an idle pooled connection that becomes readable (a backend writing after a complete answer) is
  closed and never reused, so one client's answer can never reach another (nginx's keepalive close
  handler does the same);
- the response head and body framing are llhttp's, strict: Content-Length, chunked or
  close-delimited; 1xx interim answers are skipped; an unsolicited ``101`` is a protocol error;
- waiting for a pool slot has its own bound (``pool_timeout``), separate from connecting;
- request bodies are framed by us (canonical ``content-length``, or chunked), with flow control.

Errors are ``proxy.edge.errors`` classes, never internal addresses: their ``detail`` is safe to show.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import httptools

from proxy.edge.bodyqueue import BodyQueue
from proxy.edge.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPoolTimeout,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.edge.headers import HOP_BY_HOP, PLAIN_CONNECTION, end_to_end
from proxy.edge.writebatch import WriteBatch

Headers = Sequence[tuple[bytes, bytes]]
READ_HIGH_WATER: Final = 256 * 1024  # response bytes buffered before we stop reading the backend
_BAD_IN_TARGET: Final = re.compile(rb"[ \r\n\t#\x00]")  # one C scan, not six


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a backend is: parsed once from settings, never from a request."""

    scheme: str
    host: str
    port: int
    base_path: bytes  # b"" or b"/base" (no trailing slash)
    host_header: bytes

    @classmethod
    def parse(cls, url: str) -> Origin:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://host[:port][/base], got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        default = (parts.scheme == "https" and port == 443) or (parts.scheme == "http" and port == 80)
        host_header = shown.encode("idna") + (b"" if default else b":%d" % port)
        return cls(parts.scheme, host, port, parts.path.rstrip("/").encode(), host_header)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    size: int = 256
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    pool_timeout: float = 2.0
    idle_timeout: float = 4.0  # below the usual 5 s server keep-alive: no reuse races


def request_head(
    method: bytes, origin: Origin, target: bytes, headers: Headers, add_host: bool, framing: bytes
) -> bytes:
    """The request head: the configured origin's path + the request target as a path component.

    ``target`` must be origin-form (``/path?query``); anything else raises ``ValueError``."""
    if not target.startswith(b"/") or _BAD_IN_TARGET.search(target):
        raise ValueError("request target must be origin-form: /path[?query]")
    parts = [method, b" ", origin.base_path, target, b" HTTP/1.1\r\n"]
    if add_host:
        parts += (b"host: ", origin.host_header, b"\r\n")
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (framing, b"\r\n")
    return b"".join(parts)


class ResponseSink(Protocol):
    """Callbacks for one exchange started with ``send_now`` (no task, no future per request).

    ``head`` runs inside the parser callback (it must not write to this connection); ``done`` runs
    after the packet that completed the answer has been parsed in full, so a backend that wrote a
    second, unrequested answer in the same packet is caught before the connection can be reused;
    ``failed`` runs when no answer head arrived. Exactly one of ``done``/``failed`` ends it, unless
    ``head`` returned False (the caller then reads the body itself through ``chunks()``)."""

    def head(self, response: UpstreamResponse) -> bool:
        """True to be told ``done`` with the whole body buffered; False to consume it yourself."""
        ...

    def done(self, response: UpstreamResponse) -> None: ...

    def failed(self, error: UpstreamError, retryable: bool) -> None: ...


class UpstreamResponse:
    """A response whose body is read from the connection as the caller consumes it."""

    __slots__ = ("status", "raw_headers", "headers", "content_length", "_body", "_parts", "_done", "_error",
                 "_conn")  # fmt: skip

    def __init__(
        self, conn: _Connection, status: int, raw_headers: list[tuple[bytes, bytes]],
        headers: list[tuple[bytes, bytes]] | None = None, content_length: int | None = None,
    ) -> None:  # fmt: skip
        self.status = status
        self.raw_headers = raw_headers  # as received, names lower-case
        self.headers = raw_headers if headers is None else headers  # end-to-end: what a proxy relays
        self.content_length = content_length
        self._body: BodyQueue | None = None  # made when a caller streams the body (chunks())
        self._parts: list[bytes] = []  # a small answer the fast path takes whole (buffered())
        self._done = False
        self._error: UpstreamError | None = None
        self._conn: _Connection | None = conn

    def header(self, name: bytes) -> bytes | None:
        """First value of a header (``name`` lower-case)."""
        for key, value in self.raw_headers:
            if key == name:
                return value
        return None

    @property
    def complete(self) -> bool:
        return self._done

    # --- fed by the connection -----------------------------------------------------------------

    def _feed(self, chunk: bytes) -> None:
        self._queue().feed(chunk)

    def _queue(self) -> BodyQueue:
        body = self._body
        if body is None:
            body = self._body = BodyQueue(READ_HIGH_WATER, self)
        return body

    def _finish(self, error: UpstreamError | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._conn = None
        if self._body is not None:
            self._body.wake()

    def pause_reading(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    # --- consumed by the caller ----------------------------------------------------------------

    def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; raises ``UpstreamReset``/``UpstreamTimeout`` if cut short."""
        return _Chunks(self, self._queue())

    async def read(self) -> bytes:
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    def buffered(self) -> bytes:
        """The whole body of a complete answer (``done`` of a sink); raises if it was cut short."""
        if self._error is not None:
            raise self._error
        parts = self._parts
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Stop reading: a connection with an unfinished answer is closed, never pooled."""
        conn = self._conn
        self._conn = None
        if not self._done:
            self._done = True
            self._parts.clear()
            if self._body is not None:
                self._body.clear()
                self._body.wake()  # a reader waiting in chunks() ends now, not at the next (never) byte
            if conn is not None:
                conn.abort()

    def release(self) -> None:
        """After a complete answer a no-op, like ``close``."""
        self.close()


class _Chunks:
    """``UpstreamResponse.chunks()``: an async iterator class, not an async generator, so the
    module compiles with mypyc (which has no async generators)."""

    __slots__ = ("_response", "_body")

    def __init__(self, response: UpstreamResponse, body: BodyQueue) -> None:
        self._response = response
        self._body = body

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        response = self._response
        while True:
            chunk = body.pop()
            if chunk is not None:
                return chunk
            if response._done:
                if response._error is not None:
                    raise response._error
                raise StopAsyncIteration
            await body.wait()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: idle in the pool or carrying exactly one exchange."""

    __slots__ = ("pool", "transport", "parser", "response", "reused", "busy", "closed", "idle_since",
                 "_head_future", "_status", "_headers", "_interim", "_head_only", "_keep", "_got_bytes",
                 "_write_paused", "_drain", "_read_paused", "_timer", "_last_read", "_read_timeout",
                 "counted_out", "_sink", "_sink_reads", "_finished", "_timer_due", "_strip_seen",
                 "_length", "_plain_at", "_queued_in")  # fmt: skip

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.reused = False
        self.busy = False
        self.closed = False
        self.idle_since = 0.0
        self._head_future: asyncio.Future[UpstreamResponse] | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._strip_seen = False  # the answer has a header the pool strips (hop-by-hop...)
        self._plain_at = -1  # where its one plain "Connection: keep-alive|close" is, if any
        self._length: int | None = None  # its Content-Length (llhttp checked repeats agree)
        self._interim = False
        self._head_only = False
        self._keep = True
        self._got_bytes = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._last_read = 0.0
        self._read_timeout = pool.limits.read_timeout
        self.counted_out = False  # its pool slot has been given back
        self._sink: ResponseSink | None = None  # the callbacks of a ``send_now`` exchange
        self._sink_reads = False  # the sink wants ``done`` with the body buffered
        self._finished: UpstreamResponse | None = None  # completed in this packet: ``done`` pending
        self._queued_in = -1  # the write batch's flush count when our request head was queued

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError())
        if self.busy:
            error = self._end_of_stream_error()
            if isinstance(error, _CloseDelimited) and self.response is not None:
                self.response._finish()  # the close is the end of a close-delimited body
                self.busy = False
            else:
                self._fail_exchange(error)
        self.pool._forget(self)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # an idle pooled connection must stay silent; bytes here would be read as the next
            # client's answer. Drop the connection (nginx: ngx_http_upstream_keepalive_close_handler)
            self.pool.dropped("idle_readable")
            self.abort()
            return
        if self._queued_in == self.pool.writes.flushes:
            # our request head is still queued (proxy.edge.writebatch): these bytes answer nothing
            # we sent. Dropped like an idle connection that speaks; the request, never sent, goes
            # out again on a fresh connection
            self.pool.dropped("idle_readable")
            self._fail_exchange(_NoAnswer(self.pool.version, "backend answered before the request was sent"))
            self.abort()
            return
        self._got_bytes = True
        self._last_read = self.pool.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail_exchange(self._unasked_upgrade())
            self.abort()
        except httptools.HttpParserError:
            self._fail_exchange(UpstreamProtocolError(self.pool.version, "invalid HTTP answer"))
            self.abort()
        finished = self._finished
        if finished is not None:
            # the whole packet is parsed: a second answer in it has already dropped the connection
            self._finished = None
            sink, self._sink = self._sink, None
            if sink is not None:
                sink.done(finished)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.busy or (self._head_future is None and self._sink is None) or self._finished:
            # a second answer with no request outstanding: the backend is out of step
            raise _Unrequested()
        self._headers = []
        self._strip_seen = False
        self._plain_at = -1
        self._length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        headers = self._headers
        if lower in self.pool.watched:  # a header to strip, or Content-Length
            if lower == b"content-length":
                self._length = int(value) if value.isdigit() else None
            elif lower == b"connection" and value.lower() in PLAIN_CONNECTION and self._plain_at < 0:
                self._plain_at = len(headers)  # "keep-alive"/"close" names nothing: cut by position
            else:
                self._strip_seen = True
        headers.append((lower, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            self._fail_exchange(self._unasked_upgrade())
            raise _Upgrade()
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: not the answer
            return
        self._keep = self.parser.should_keep_alive()
        raw = self._headers
        if self._strip_seen:
            relayed = end_to_end(raw, self.pool.strip)
        elif self._plain_at >= 0:  # only a plain Connection header to drop (nginx always sends one)
            at = self._plain_at
            relayed = raw[:at] + raw[at + 1 :]
        else:
            relayed = raw
        response = self.response = UpstreamResponse(self, status, raw, relayed, self._length)
        future = self._head_future
        if future is not None and not future.done():
            future.set_result(response)
        elif self._sink is not None:
            self._sink_reads = self._sink.head(response)
            if not self._sink_reads:
                self._sink = None  # the caller reads the body through chunks()
        if self._head_only:
            # a HEAD answer has no body whatever its Content-Length says; llhttp cannot be told, so
            # the answer ends here and the connection is not reused
            self._keep = False
            self._complete()

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response.complete:
            if self._sink_reads:
                response._parts.append(body)  # small (it chose to be told done): no flow control
            else:
                response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete()

    # --- exchange ------------------------------------------------------------------------------

    def _complete(self) -> None:
        response = self.response
        if response is None or (response.complete and not self.busy):
            return
        response._finish()
        if self._sink is not None:
            self._finished = response  # told once this packet is parsed (data_received)
        self._end_exchange(reusable=self._keep)

    def _end_exchange(self, reusable: bool) -> None:
        # the read timer stays: when it fires on an idle connection it stops (see _arm)
        self.busy = False
        self._head_future = None
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        if reusable and not self.closed:
            self.pool._release(self)
        else:
            self.abort()

    def _fail_exchange(self, error: UpstreamError) -> None:
        if self._finished is not None:
            # the requested answer was complete before the bytes that failed (a second answer in
            # the same packet): it is still delivered when the packet is done (data_received);
            # the connection itself is dropped by the caller
            return
        future, sink, response = self._head_future, self._sink, self.response
        self._sink = None
        if response is not None and not response.complete:
            reset = error if isinstance(error, UpstreamReset | UpstreamTimeout) else None
            response._finish(reset or UpstreamReset(self.pool.version, "connection lost mid-answer"))
        if self.busy:
            self.busy = False
            self._head_future = None
        if future is not None and not future.done():
            future.set_exception(error)
        elif sink is not None:
            if response is not None:
                sink.done(response)  # cut short: it reads the error from buffered()
            else:
                # nothing answered; on a reused connection that is the keep-alive race (the backend
                # closed it as we wrote), so the caller may send the request again on a fresh one
                sink.failed(error, isinstance(error, _NoAnswer) and self.reused)

    def _unasked_upgrade(self) -> UpstreamError:
        return UpstreamProtocolError(self.pool.version, "backend switched protocols unasked")

    def _end_of_stream_error(self) -> UpstreamError:
        response = self.response
        if response is not None and not response.complete:
            if response.content_length is None and response.header(b"transfer-encoding") is None:
                return _CloseDelimited(self.pool.version, "")  # close-delimited body: the close is its end
            return UpstreamReset(self.pool.version, "connection lost mid-answer")
        if self._got_bytes:
            return UpstreamProtocolError(self.pool.version, "backend closed the connection mid-answer")
        return _NoAnswer(self.pool.version, "backend closed the connection without an answer")

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        head_only: bool,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Write the request, return the response once its head has arrived."""
        loop = self.pool.loop
        future: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._begin(head_only, read_timeout, future, None)
        transport = self.transport
        assert transport is not None
        writer: asyncio.Task[None] | None = None
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)  # one write per request
        else:
            transport.write(head)
            writer = loop.create_task(self._write_body(body, chunked))
        try:
            if writer is not None:
                await asyncio.wait((writer, future), return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    writer.result()  # the upload ended first: raise its error, if any
                elif not writer.done():
                    # the backend answered before the upload was complete: stop sending; the
                    # connection is in an unknown state, so it is not reused
                    writer.cancel()
                    self._keep = False
            return await future
        except BaseException:
            if not future.done():
                future.cancel()
            self.busy = False
            self.abort()
            raise
        finally:
            if writer is not None:
                if not writer.done():
                    writer.cancel()
                elif not writer.cancelled():
                    writer.exception()  # retrieved: no "never retrieved" log line

    def _begin(
        self, head_only: bool, read_timeout: float, future: asyncio.Future[UpstreamResponse] | None,
        sink: ResponseSink | None,
    ) -> None:  # fmt: skip
        """A new exchange on this connection: who hears of the answer, and its read deadline."""
        self.busy = True
        self._queued_in = -1
        self._head_future = future
        self._sink = sink
        self._sink_reads = False
        self._finished = None
        self.response = None
        self._got_bytes = False
        self._interim = False
        self._head_only = head_only
        self._keep = True
        self._arm(self.pool.loop, read_timeout)

    def send_now(self, head: bytes, head_only: bool, read_timeout: float, sink: ResponseSink) -> None:
        """Write a request without a body; ``sink`` hears of the answer (see ``ResponseSink``).

        The fast path: no task, no future, no coroutine per request."""
        self._begin(head_only, read_timeout, None, sink)
        transport = self.transport
        assert transport is not None
        writes = self.pool.writes
        if writes.write(transport, head):  # with the other requests of this loop pass
            self._queued_in = writes.flushes

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.closed:
                raise ConnectionResetError()
            if not chunk:
                continue
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._write_paused:
                self._drain = self.pool.loop.create_future()
                try:
                    await self._drain
                finally:
                    self._drain = None
        if chunked and not self.closed:
            transport.write(b"0\r\n\r\n")

    # --- read timeout: one timer per connection, re-armed for the remainder --------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        """Start the read deadline of an exchange. A timer already due no later than this deadline
        is kept: when it fires it re-arms for what is left. So a busy connection creates a timer
        about once per read timeout, not once per request."""
        self._read_timeout = read_timeout
        now = loop.time()
        self._last_read = now
        due = now + read_timeout
        timer = self._timer
        if timer is not None:
            if self._timer_due <= due:
                return
            timer.cancel()
        self._timer = loop.call_later(read_timeout, self._check_timeout)
        self._timer_due = due

    def _check_timeout(self) -> None:
        self._timer = None
        if not self.busy or self.closed:
            return
        now = self.pool.loop.time()
        if self._read_paused:
            self._last_read = now  # we stopped reading (our client is slow): not the backend's silence
        idle = now - self._last_read
        if idle < self._read_timeout:
            self._timer = self.pool.loop.call_later(self._read_timeout - idle, self._check_timeout)
            self._timer_due = now + self._read_timeout - idle
            return
        if self.response is None:
            self._fail_exchange(UpstreamTimeout(self.pool.version, "read timeout"))
        else:
            self._fail_exchange(UpstreamTimeout(self.pool.version, "read timeout mid-answer"))
        self.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- flow control and closing ----------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool._forget(self)


class _Unrequested(Exception):
    """Raised in a parser callback: the backend began an answer nobody asked for."""


class _Upgrade(Exception):
    """Raised in a parser callback: a 101 to a request that asked for no upgrade."""


class _NoAnswer(UpstreamProtocolError):
    """The connection closed before any byte of the answer: safe to retry on a new connection."""


class _CloseDelimited(UpstreamError):
    """Not an error: a close-delimited body ended with the connection."""


class UpstreamPool:
    """Keep-alive connections to one origin, with a bounded size and a bounded wait for a slot."""

    def __init__(
        self,
        version: str,
        origin: Origin,
        limits: PoolLimits,
        ssl_context: ssl.SSLContext | None = None,
        on_drop: Callable[[str], None] | None = None,
        strip: frozenset[bytes] = HOP_BY_HOP,
    ) -> None:
        self.version = version
        # this origin's requests of one loop pass go out together (proxy.edge.writebatch); a batch
        # of its own, not shared with the other origin: interleaved, each backend was woken more
        self.writes = WriteBatch()
        # response headers never relayed (``UpstreamResponse.headers`` lacks them): hop-by-hop ones,
        # those named in Connection, and any the owner adds (a header it sets itself)
        self.strip = strip | HOP_BY_HOP
        self.watched = self.strip | {b"content-length"}
        self.origin = origin
        self.limits = limits
        self._ssl = ssl_context if origin.scheme == "https" else None
        if origin.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False
        self._on_drop = on_drop

    def dropped(self, reason: str) -> None:
        """A pooled connection was dropped for misbehaving (counted by the owner's metrics)."""
        if self._on_drop is not None:
            self._on_drop(reason)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for this origin (the WebSocket relay opens its own connections with it)."""
        return self._ssl

    @property
    def open_connections(self) -> int:
        return self._open

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
        add_host: bool = True,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; return the response once its head has arrived.

        ``body``: bytes (sent with a canonical Content-Length), an async iterator (streamed; with
        ``content_length`` as declared, else chunked), or None (no body; ``content_length=0`` still
        sends ``content-length: 0``)."""
        if isinstance(body, bytes):
            framing = b"content-length: %d\r\n" % len(body)
            chunked = False
        elif body is None:
            framing = b"content-length: 0\r\n" if content_length == 0 else b""
            chunked = False
        elif content_length is not None:
            framing = b"content-length: %d\r\n" % content_length
            chunked = False
        else:
            framing = b"transfer-encoding: chunked\r\n"
            chunked = True
        head = self.head_for(method, target, headers, add_host, framing)
        timeout = self.limits.read_timeout if read_timeout is None else read_timeout
        head_only = method == b"HEAD"
        replayable = body is None or isinstance(body, bytes)
        while True:
            conn = await self._acquire()
            try:
                return await conn.exchange(head, body, chunked, head_only, timeout)
            except _NoAnswer as exc:
                # a reused connection the backend closed as we wrote to it (keep-alive race):
                # nothing was answered, so one retry on a fresh connection is safe
                if conn.reused and replayable:
                    continue
                raise UpstreamProtocolError(self.version, exc.detail) from None
            except ConnectionError:
                raise UpstreamReset(self.version, "connection lost while sending the request") from None

    def head_for(
        self, method: bytes, target: bytes, headers: Headers, add_host: bool, framing: bytes
    ) -> bytes:
        try:
            return request_head(method, self.origin, target, headers, add_host, framing)
        except ValueError as exc:
            raise UpstreamProtocolError(self.version, str(exc)) from None

    # --- the pool --------------------------------------------------------------------------------

    def take_idle(self) -> _Connection | None:
        """A warm pooled connection, now, or None (then ``request`` waits or connects)."""
        now = self.loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, the cold ones age out
            if conn.closed:
                continue
            if now - conn.idle_since > self.limits.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    async def _acquire(self) -> _Connection:
        while True:
            conn = await self._acquire_once()
            if not conn.closed:
                return conn

    async def _acquire_once(self) -> _Connection:
        loop = self.loop
        conn = self.take_idle()
        if conn is not None:
            return conn
        if self._open < self.limits.size and not self._waiters:
            return await self._connect()
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.limits.pool_timeout):
                conn_or_slot = await waiter
        except TimeoutError:
            raise UpstreamPoolTimeout(self.version, "no upstream connection free in time") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if conn_or_slot is None:
            return await self._connect()
        conn_or_slot.reused = True
        return conn_or_slot

    async def _connect(self) -> _Connection:
        self._open += 1
        origin = self.origin
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                await self.loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                )
        except BaseException as exc:
            self._open -= 1
            self._hand_slot()
            if isinstance(exc, TimeoutError):
                raise UpstreamConnectTimeout(self.version, "connect timeout") from None
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise UpstreamConnectError(self.version, "TLS handshake failed") from None
            if isinstance(exc, OSError):
                raise UpstreamConnectError(self.version, f"cannot connect: {_reason(exc)}") from None
            raise
        return conn

    def _release(self, conn: _Connection) -> None:
        """A connection whose exchange ended cleanly: to a waiter, else idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self._closing:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.limits.idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        """A connection closed (by either side): free its slot."""
        if conn.counted_out:
            return
        conn.counted_out = True
        self._open -= 1
        if conn in self._idle:
            self._idle.remove(conn)
        self._hand_slot()

    def _hand_slot(self) -> None:
        while self._waiters and self._open < self.limits.size:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle past the keep-alive bound; re-armed while any are idle."""
        self._sweeper = None
        deadline = self.loop.time() - self.limits.idle_timeout
        for conn in [c for c in self._idle if c.idle_since <= deadline]:
            conn.abort()
        if self._idle:
            self._sweeper = self.loop.call_later(self.limits.idle_timeout / 2, self._sweep)

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._idle):
            conn.abort()
        self._idle.clear()


def _reason(exc: OSError) -> str:
    """The OS's words for a failure, without the address asyncio puts in its message."""
    if exc.errno in (errno.ECONNREFUSED,):
        return "connection refused"
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return "network error"

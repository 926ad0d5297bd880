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
- request bodies are framed by us (canonical ``content-length``, or chunked), with flow control;
- each connection is a state machine (``State``, after h11's ``_state.py``): our request and their
  answer each have a state, every change goes through ``_Connection._to``, and a connection goes
  back to the pool only when both are ``DONE`` (``reusable``): an answer that comes before the
  whole request was written never hands the connection to the next request;
- a request is sent again at most once, on a new connection, and only when that is safe
  (``retry_allowed``: an idempotent method, or nothing of it was written; RFC 9110 9.2.2).

Errors are ``proxy.edge.errors`` classes, never internal addresses: their ``detail`` is safe to show.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import httptools

from proxy.edge.asgi import ClientGone
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
from proxy.edge.flow import FlowControl
from proxy.edge.headers import HOP_BY_HOP, PLAIN_CONNECTION, end_to_end
from proxy.edge.states import (
    CLOSED,
    DONE,
    IDLE,
    MUST_CLOSE,
    NEXT,
    SEND_BODY,
    SEND_RESPONSE,
    ImpossibleTransition,
    State,
)
from proxy.edge.writebatch import WriteBatch

Headers = Sequence[tuple[bytes, bytes]]
READ_HIGH_WATER: Final = 256 * 1024  # response bytes buffered before we stop reading the backend
_BAD_IN_TARGET: Final = re.compile(rb"[ \r\n\t#\x00]")  # one C scan, not six
# methods a proxy may send again after a failure without changing what the request means
# (RFC 9110 9.2.2; aiohttp's IDEMPOTENT_METHODS)
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
log = logging.getLogger("strangler.edge")


def retry_allowed(method: bytes, unsent: bool) -> bool:
    """May a request that got no answer go once more, on a new connection? Only when nothing of
    it was written, or its method is idempotent (RFC 9110 9.2.2): a POST is never sent twice."""
    return unsent or method in IDEMPOTENT


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
    max_head_bytes: int = 65536  # an answer's head (status line and headers); over it: 502
    strict_states: bool = False  # an impossible state change raises (tests), else drops the connection


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
        self._error: Exception | None = None  # an UpstreamError, or the client's (ClientGone)
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

    def _finish(self, error: Exception | None = None) -> None:
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
    """One keep-alive connection: idle in the pool or carrying exactly one exchange.

    Its state is two ``State`` values, ``ours`` (the request) and ``theirs`` (the answer), changed
    only by ``_to``, which checks the change against ``NEXT`` and then does what the new pair
    means: both ``DONE`` (``reusable``) puts the connection back in the pool, any other end closes
    it. So an answer that is complete while the request body is still being written closes the
    connection (nginx does the same) instead of handing it to the next request."""

    __slots__ = ("pool", "loop", "transport", "parser", "response", "reused", "idle_since", "ours", "theirs",
                 "flow", "_watched", "_head_future", "_headers", "_head_only", "_head", "_head_bytes",
                 "_max_head", "_timer", "_last_read", "_read_timeout", "counted_out", "_sink", "_sink_reads",
                 "_finished", "_timer_due", "_strip_seen", "_length", "_plain_at", "_queued_in",
                 "_writer")  # fmt: skip

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop  # made in a running loop (``UpstreamPool._connect``)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.reused = False
        self.idle_since = 0.0
        self.ours = IDLE  # the request's side
        self.theirs = IDLE  # the answer's side
        self.flow = FlowControl()
        self._head_future: asyncio.Future[UpstreamResponse] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._strip_seen = False  # the answer has a header the pool strips (hop-by-hop...)
        self._plain_at = -1  # where its one plain "Connection: keep-alive|close" is, if any
        self._length: int | None = None  # its Content-Length (llhttp checked repeats agree)
        self._head_only = False
        self._head = b""  # the request head of a ``send_now`` exchange (its method decides a retry)
        self._head_bytes = 0  # bytes received before the answer's head was complete
        self._max_head = pool.limits.max_head_bytes
        self._watched = pool.watched  # the answer headers on_header looks at (strip, Content-Length)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._last_read = 0.0
        self._read_timeout = pool.limits.read_timeout
        self.counted_out = False  # its pool slot has been given back
        self._sink: ResponseSink | None = None  # the callbacks of a ``send_now`` exchange
        self._sink_reads = False  # the sink wants ``done`` with the body buffered
        self._finished: UpstreamResponse | None = None  # completed in this packet: ``done`` pending
        self._queued_in = -1  # the write batch's flush count when our request head was queued
        self._writer: asyncio.Task[None] | None = None  # writes a streamed request body

    @property
    def closed(self) -> bool:
        return self.theirs is CLOSED

    def reusable(self) -> bool:
        """The one test for reuse (``_to`` applies it, inlined, when the answer ends): the whole
        request written, the whole answer read, and the answer kept the connection alive (else
        theirs is ``MUST_CLOSE``); a closed connection is neither."""
        return self.ours is DONE and self.theirs is DONE

    # --- the state machine -------------------------------------------------------------------------

    def _to(self, ours: State, theirs: State) -> None:
        """The one way the state changes. An impossible change is a bug: it raises in tests
        (``strict_states``) and, in production, drops the connection with one log line."""
        if not (NEXT[self.ours * 6 + self.theirs] >> (ours * 6 + theirs)) & 1:  # 6: SIDES
            self._impossible(ours, theirs)
            return
        self.ours = ours
        self.theirs = theirs
        if theirs < DONE:
            return  # SEND_RESPONSE, SEND_BODY: an exchange under way
        if theirs is CLOSED:
            self._closed()
        elif theirs is DONE and ours is DONE:  # reusable(), inlined: the one test for reuse
            self.ours = self.theirs = IDLE
            if self.flow.read_paused:
                self.flow.resume_reading()
            self.pool._release(self)
        elif theirs is not IDLE:
            # the answer is over but the connection may not carry another request: it said close,
            # or it came before the whole request was written (the rest can never be told apart
            # from the next request, so the connection ends here)
            self._to(CLOSED, CLOSED)

    def _impossible(self, ours: State, theirs: State) -> None:
        now = f"({self.ours.name}, {self.theirs.name})"
        message = f"upstream connection {now} cannot become ({ours.name}, {theirs.name})"
        if self.pool.limits.strict_states:
            raise ImpossibleTransition(message)
        log.error("%s: connection dropped", message)
        self._fail(UpstreamProtocolError(self.pool.version, "connection state error"))

    def _closed(self) -> None:
        """Entered ``CLOSED``: the transport, the timer, a body writer and the pool slot go."""
        if self.transport is not None:
            self.transport.abort()
        self.flow.lost()
        self._cancel_timer()
        writer = self._writer
        self._writer = None
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            writer.cancel()
        self.pool._forget(self)

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio subclass
        self.flow.attach(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.lost()
        theirs = self.theirs
        if theirs is CLOSED:
            return  # we closed it
        response = self.response
        if theirs is SEND_BODY and response is not None and response.content_length is None:
            if response.header(b"transfer-encoding") is None:
                self._complete(False)  # a close-delimited body: the close is its end
                self._deliver()
                return
        if theirs is IDLE:
            self.abort()  # an idle pooled connection the backend closed
            return
        self._fail(self._end_of_stream_error())

    def data_received(self, data: bytes) -> None:
        theirs = self.theirs
        if theirs is SEND_RESPONSE:
            if self._queued_in == self.pool.writes.flushes:
                # our request head is still queued (proxy.edge.writebatch): these bytes answer
                # nothing we sent. Dropped like an idle connection that speaks; the request, never
                # sent, goes out once more on a new connection if this one was reused from the pool
                # (``request``, ``_retryable``); on a new or a ``fresh`` one it fails (502)
                self.pool.dropped("idle_readable")
                self._fail(_NoAnswer(self.pool.version, "backend answered before the request was sent", True))
                return
            self._head_bytes += len(data)
        elif theirs is not SEND_BODY:
            if theirs is not CLOSED:
                # an idle pooled connection must stay silent; bytes here would be read as the next
                # client's answer. Drop the connection (nginx: ngx_http_upstream_keepalive_close_handler)
                self.pool.dropped("idle_readable")
                self.abort()
            return
        self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self._unasked_upgrade())
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, ImpossibleTransition):
                raise exc.__context__ from None
            self._fail(UpstreamProtocolError(self.pool.version, "invalid HTTP answer"))
        if self.theirs is SEND_RESPONSE and self._head_bytes > self._max_head:
            self._fail(self._head_too_large())  # still no end of the head in sight
        finished = self._finished
        if finished is not None:
            # the whole packet is parsed: a second answer in it has already dropped the connection
            self._finished = None
            sink, self._sink = self._sink, None
            if sink is not None:
                sink.done(finished)

    def _deliver(self) -> None:
        """A close-delimited answer ended with the connection: its sink (if any) hears of it."""
        finished = self._finished
        self._finished = None
        sink, self._sink = self._sink, None
        if sink is not None and finished is not None:
            sink.done(finished)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.flow.writing_paused()

    def resume_writing(self) -> None:
        self.flow.writing_resumed()

    # --- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.theirs is not SEND_RESPONSE:
            # an answer with no request outstanding (or a second one): the backend is out of step
            raise _Unrequested()
        self._headers = []
        self._strip_seen = False
        self._plain_at = -1
        self._length = None

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower in self._watched:  # a header to strip, or Content-Length
            if lower == b"content-length":
                self._length = int(value) if value.isdigit() else None
            elif lower == b"connection" and value.lower() in PLAIN_CONNECTION and self._plain_at < 0:
                self._plain_at = len(self._headers)  # "keep-alive"/"close" names nothing: cut by position
            else:
                self._strip_seen = True
        self._headers.append((lower, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            self._fail(self._unasked_upgrade())
            raise _Stop()
        if status < 200:
            return  # 100 Continue, 103 Early Hints: not the answer, which is still owed
        raw = self._headers
        if self._head_bytes > self._max_head and _head_size(raw) > self._max_head:
            self._fail(self._head_too_large())
            raise _Stop()  # stops the parser; the exchange has failed already
        if self._strip_seen:
            relayed = end_to_end(raw, self.pool.strip)
        elif self._plain_at >= 0:  # only a plain Connection header to drop (nginx always sends one)
            at = self._plain_at
            relayed = raw[:at] + raw[at + 1 :]
        else:
            relayed = raw
        response = self.response = UpstreamResponse(self, status, raw, relayed, self._length)
        self._to(self.ours, SEND_BODY)
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
            self._complete(False)

    def on_body(self, body: bytes) -> None:
        response = self.response
        if response is not None and not response.complete:
            if self._sink_reads:
                response._parts.append(body)  # small (it chose to be told done): no flow control
            else:
                response._feed(body)

    def on_message_complete(self) -> None:
        if self.theirs is SEND_BODY:
            self._complete(self.parser.should_keep_alive())
        # SEND_RESPONSE: an interim answer ended, the final one follows; CLOSED: dropped mid-packet

    # --- exchange ------------------------------------------------------------------------------

    def _complete(self, keep: bool) -> None:
        """The answer is complete: its reader is told (a sink once the packet is parsed), then the
        connection goes back to the pool or closes (``_to``)."""
        response = self.response  # theirs is SEND_BODY: the head has made it
        if response is not None:
            response._finish()
            if self._sink is not None:
                self._finished = response  # told once this packet is parsed (data_received)
        self._head_future = None
        self._to(self.ours, DONE if keep else MUST_CLOSE)

    def _fail(self, error: Exception) -> None:
        """The exchange cannot go on: the connection is closed, and whoever waits for the answer
        hears of ``error`` (a client body's own failure, such as ``ClientGone``, is passed as is)."""
        self.abort()
        if self._finished is not None:
            # the requested answer was complete before the bytes that failed (a second answer in
            # the same packet): it is still delivered when the packet is done (data_received)
            return
        future, sink, response = self._head_future, self._sink, self.response
        self._head_future = None
        self._sink = None
        if response is not None and not response.complete:
            cut = error if isinstance(error, UpstreamReset | UpstreamTimeout | ClientGone) else None
            response._finish(cut or UpstreamReset(self.pool.version, "connection lost mid-answer"))
        if future is not None:
            if not future.done():
                future.set_exception(error)
        elif sink is not None:
            if response is not None:
                sink.done(response)  # cut short: it reads the error from buffered()
            elif isinstance(error, UpstreamError):
                sink.failed(error, self._retryable(error))

    def _retryable(self, error: UpstreamError) -> bool:
        """A ``send_now`` request with no answer may go once more, on a new connection, when the
        backend closed a reused connection as we wrote to it (the keep-alive race) and resending
        is safe (``retry_allowed``)."""
        if not isinstance(error, _NoAnswer) or not self.reused:
            return False
        head = self._head
        return retry_allowed(head[: head.find(b" ")], error.unsent)

    def _unasked_upgrade(self) -> UpstreamError:
        return UpstreamProtocolError(self.pool.version, "backend switched protocols unasked")

    def _head_too_large(self) -> UpstreamError:
        return UpstreamProtocolError(self.pool.version, "answer head larger than max_response_head_bytes")

    def _end_of_stream_error(self) -> UpstreamError:
        response = self.response
        if response is not None and not response.complete:
            return UpstreamReset(self.pool.version, "connection lost mid-answer")
        if self._head_bytes:
            return UpstreamProtocolError(self.pool.version, "backend closed the connection mid-answer")
        unsent = self._queued_in == self.pool.writes.flushes  # the head never left the write batch
        return _NoAnswer(self.pool.version, "backend closed the connection without an answer", unsent)

    def _begin(
        self, head_only: bool, read_timeout: float, future: asyncio.Future[UpstreamResponse] | None,
        sink: ResponseSink | None,
    ) -> None:  # fmt: skip
        """A new exchange on this connection: who hears of the answer, and its read deadline
        (``send_now`` has a copy inlined)."""
        self._queued_in = -1
        self._head_future = future
        self._sink = sink
        self._sink_reads = False
        self._finished = None
        self.response = None
        self._head_bytes = 0
        self._head_only = head_only
        self._arm(self.loop, read_timeout)

    def send_now(self, head: bytes, head_only: bool, read_timeout: float, sink: ResponseSink) -> None:
        """Write a request without a body; ``sink`` hears of the answer (see ``ResponseSink``).

        The fast path: no task, no future, no coroutine per request."""
        # _begin, inlined (once per request on the fast path)
        self._head_future = None
        self._sink = sink
        self._sink_reads = False
        self._finished = None
        self.response = None
        self._head_bytes = 0
        self._head_only = head_only
        self._arm(self.loop, read_timeout)
        self._head = head
        self._to(DONE, SEND_RESPONSE)
        transport = self.transport
        assert transport is not None
        writes = self.pool.writes
        if writes.write(transport, head):  # with the other requests of this loop pass
            self._queued_in = writes.flushes
        else:
            self._queued_in = -1  # written at once (a large head)

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        head_only: bool,
        read_timeout: float,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Write the request, return the response once its head has arrived.

        A streamed body goes on being written after that (full duplex: a backend may answer as it
        reads); the connection is reused only once both are complete."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.theirs is CLOSED:
            self.abort()
            raise _NoAnswer(self.pool.version, "connection closed before the request was sent", True)
        loop = self.loop
        future: asyncio.Future[UpstreamResponse] = loop.create_future()
        self._begin(head_only, read_timeout, future, None)
        writer: asyncio.Task[None] | None = None
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)  # one write per request
            self._to(DONE, SEND_RESPONSE)
        else:
            transport.write(head)
            self._to(SEND_BODY, SEND_RESPONSE)
            writer = self._writer = loop.create_task(self._write_body(body, chunked, length))
        try:
            if writer is not None:
                await asyncio.wait((writer, future), return_when=asyncio.FIRST_COMPLETED)
            return await future
        except BaseException:
            if not future.done():
                future.cancel()
            self.abort()
            raise

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool, length: int | None) -> None:
        """Write a streamed body; ours becomes ``DONE`` when its last byte is written (and the read
        deadline starts then: a slow uploader is not the backend's silence). A failure ends the
        exchange: a backend that stops reading is a send timeout, a client that left is passed on."""
        transport = self.transport
        assert transport is not None
        flow = self.flow
        left = -1 if chunked or length is None else length
        try:
            async for chunk in body:
                if self.ours is not SEND_BODY:
                    return  # the exchange ended (the connection closed): the rest is not ours to send
                if not chunk:
                    continue
                if chunked:
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    if left >= 0:
                        if len(chunk) > left:
                            raise UpstreamProtocolError(
                                self.pool.version, "request body longer than declared"
                            )
                        left -= len(chunk)
                    transport.write(chunk)
                if flow.write_paused:
                    await flow.drain(self._read_timeout)
                if left == 0:
                    break  # every declared byte is out: the request is complete
            if self.ours is not SEND_BODY:
                return
            if left > 0:
                raise ClientGone()  # the body ended before its declared length: the client left
            if chunked:
                transport.write(b"0\r\n\r\n")
            self._writer = None
            self._last_read = self.loop.time()
            self._to(DONE, self.theirs)
        except TimeoutError:
            self._fail(
                UpstreamTimeout(self.pool.version, "send timeout: the backend stopped reading the request")
            )
        except ConnectionError:
            self._fail(UpstreamReset(self.pool.version, "connection lost while sending the request"))
        except Exception as exc:  # noqa: BLE001 - the client's body failed (gone, too slow): passed on
            self._fail(exc)

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
        theirs = self.theirs
        if theirs is not SEND_RESPONSE and theirs is not SEND_BODY:
            return  # idle or closed
        now = self.loop.time()
        if self.flow.read_paused or self.ours is SEND_BODY:
            # we stopped reading (our client is slow), or we are still writing the request (a slow
            # uploader, or a backend reading slowly: the send timeout bounds that): not the
            # backend's silence
            self._last_read = now
        idle = now - self._last_read
        if idle < self._read_timeout:
            self._timer = self.loop.call_later(self._read_timeout - idle, self._check_timeout)
            self._timer_due = now + self._read_timeout - idle
            return
        if self.response is None:
            self._fail(UpstreamTimeout(self.pool.version, "read timeout"))
        else:
            self._fail(UpstreamTimeout(self.pool.version, "read timeout mid-answer"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- flow control and closing ----------------------------------------------------------------

    def pause_reading(self) -> None:
        self.flow.pause_reading()

    def resume_reading(self) -> None:
        self.flow.resume_reading()

    def abort(self) -> None:
        """Close now, whatever the state (a no-op once closed)."""
        if self.theirs is not CLOSED:
            self._to(CLOSED, CLOSED)


def _head_size(headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of a header block as sent (name, ": ", value, CRLF), about: only counted when
    the raw bytes received before the head's end passed the limit."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


class _Unrequested(Exception):
    """Raised in a parser callback: the backend began an answer nobody asked for."""


class _Stop(Exception):
    """Raised in a parser callback to stop parsing an answer that has already failed."""


class _NoAnswer(UpstreamProtocolError):
    """The connection closed before any byte of the answer. ``unsent``: nothing of the request
    was written either (it may go again whatever its method)."""

    def __init__(self, version: str, detail: str, unsent: bool = False) -> None:
        super().__init__(version, detail)
        self.unsent = unsent


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
        fresh: bool = False,
    ) -> UpstreamResponse:
        """Send one request; return the response once its head has arrived.

        ``body``: bytes (sent with a canonical Content-Length), an async iterator (streamed; with
        ``content_length`` as declared, else chunked), or None (no body; ``content_length=0`` still
        sends ``content-length: 0``). ``fresh``: on a new connection, never an idle pooled one
        (the retry of a ``send_now`` request after the keep-alive race); then never retried.

        Retry policy (RFC 9110 9.2.2): a request a reused connection closed on without answering
        goes once more, on a new connection, only when ``retry_allowed`` (idempotent method, or
        nothing of it written) and its body can be sent again (buffered, or never started)."""
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
        streamed = not (body is None or isinstance(body, bytes))
        conn = await self._acquire(fresh)
        try:
            return await conn.exchange(head, body, chunked, head_only, timeout, content_length)
        except _NoAnswer as exc:
            # a reused connection the backend closed as we wrote to it (the keep-alive race):
            # nothing was answered. Sent again once, on a new connection, when that is safe
            if (
                fresh
                or not conn.reused
                or not retry_allowed(method, exc.unsent)
                or (streamed and not exc.unsent)
            ):
                raise UpstreamProtocolError(self.version, exc.detail) from None
        except ConnectionError:
            raise UpstreamReset(self.version, "connection lost while sending the request") from None
        conn = await self._acquire(True)
        try:
            return await conn.exchange(head, body, chunked, head_only, timeout, content_length)
        except _NoAnswer as exc:
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
        idle = self._idle
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, the cold ones age out
            if conn.theirs is CLOSED:
                continue
            if conn.loop.time() - conn.idle_since > self.limits.idle_timeout:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    async def _acquire(self, fresh: bool = False) -> _Connection:
        while True:
            conn = await self._acquire_once(fresh)
            if not conn.closed:
                return conn

    async def _acquire_once(self, fresh: bool) -> _Connection:
        loop = self.loop
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn
        if self._open < self.limits.size and not self._waiters:
            return await self._connect()
        if fresh:
            conn = self.take_idle()
            if conn is not None:
                return await self._replace(conn)  # the pool is full: a new connection in its place
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
        if fresh:
            return await self._replace(conn_or_slot)
        conn_or_slot.reused = True
        return conn_or_slot

    async def _replace(self, old: _Connection) -> _Connection:
        """Close a pooled connection and open a new one in its slot (no waiter gets the slot)."""
        old.counted_out = True
        self._open -= 1
        old.abort()
        return await self._connect()

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
        conn.idle_since = conn.loop.time()
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

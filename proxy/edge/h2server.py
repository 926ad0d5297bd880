"""HTTP/2 on the listener: one client connection (``H2ServerProtocol``) and one exchange per stream
(``H2Exchange``, the ``ClientExchange`` the forwarding core is written against).

Why the ``h2`` library: correctness first (design28.md). Its sans-I/O state machine parses and
checks frames, HPACK and stream states; this module adds what a proxy needs around it: the
hand-over from the HTTP/1.1 listener (h2c prior knowledge, ALPN ``h2``), flow control both ways
tied to the core's reads and writes, the drain (GOAWAY), the refusals of ``h2guard`` and the
limits, each counted in ``strangler_rejected_requests_total{reason="h2_..."}``.

Streams are answered concurrently, each by ``ProxyApp.handle`` in a task of its own; one stream's
bytes only ever go to that stream's exchange (the dict of streams is keyed by the id h2 reports).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.edge.asgi import ASGIApp, ClientGone, Message
from proxy.edge.h2guard import HEADERS_TOO_LARGE, PREFACE, H2Guard
from proxy.edge.server import HOST_OK

if TYPE_CHECKING:
    from proxy.edge.server import ServerLimits, ServerProtocol

log = logging.getLogger("strangler")

H2Handler = Callable[[Any], Awaitable[None]]  # ProxyApp.handle (takes any ClientExchange)

# answer headers HTTP/2 forbids (RFC 9113 8.2.2): dropped, whatever the backend sent
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
CHUNKED: Final = (b"transfer-encoding", b"chunked")
NO_BODY_STATUS: Final = frozenset({204, 304})
FLUSH_BYTES: Final = 65536  # DATA queued in h2 before it is written at once (else: at the end of the pass)
LINGER_SECONDS: Final = 2.0  # after our GOAWAY, how long what the client still sends is discarded


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _json_head(status: int, body: bytes) -> list[tuple[bytes, bytes]]:
    length = b"%d" % len(body)
    return [(b":status", b"%d" % status), (b"content-type", b"application/json"), (b"content-length", length)]


def _json_error(error: bytes, detail: bytes) -> bytes:
    return b'{"error":"%s","detail":"%s"}' % (error, detail)


class H2State(enum.IntEnum):
    """The connection's states; every change goes through ``H2ServerProtocol._to``."""

    OPEN = 0  # streams are accepted
    DRAINING = 1  # GOAWAY sent: streams in flight finish, new ones are refused, then the close
    CLOSED = 2


OPEN: Final = H2State.OPEN
DRAINING: Final = H2State.DRAINING
CLOSED: Final = H2State.CLOSED
TRANSITIONS: Final[dict[H2State, frozenset[H2State]]] = {
    OPEN: frozenset({DRAINING, CLOSED}),
    DRAINING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class H2StateError(Exception):
    """A connection state change the table does not allow: a bug in this module."""


class H2Config:
    """``Http2Settings`` resolved once per server; makes the connections (a take-over from the
    HTTP/1.1 protocol, or a listener that speaks only h2)."""

    def __init__(
        self,
        *,
        max_concurrent_streams: int = 100,
        initial_window_size: int = 65535 * 16,
        max_frame_size: int = 16384,
        header_table_size: int = 4096,
        max_header_list_size: int = 16384,
        max_resets_per_second: int = 100,
        max_control_frames_per_second: int = 200,
        max_continuation_frames: int = 16,
        idle_timeout_seconds: float = 60.0,
        stall_timeout_seconds: float = 30.0,
    ) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.max_frame_size = max_frame_size
        self.header_table_size = header_table_size
        self.max_header_list_size = max_header_list_size
        self.max_resets_per_second = max_resets_per_second
        self.max_control_frames_per_second = max_control_frames_per_second
        self.max_continuation_frames = max_continuation_frames
        self.idle_timeout = idle_timeout_seconds
        self.stall_timeout = stall_timeout_seconds

    def guard(self, preface: bool) -> H2Guard:
        return H2Guard(self.max_resets_per_second, self.max_control_frames_per_second,
                       self.max_continuation_frames, self.max_header_list_size, preface)  # fmt: skip

    def protocol(self, handler: H2Handler, limits: ServerLimits, scheme: str) -> H2ServerProtocol:
        """For a listener (or an ALPN ``h2`` connection) that speaks HTTP/2 from its first byte."""
        return H2ServerProtocol(handler, limits, self, scheme)

    def take_over(self, conn: ServerProtocol, data: bytes) -> None:
        """The HTTP/1.1 protocol saw the h2c preface: this connection is HTTP/2 from now on. Its
        bookkeeping (the connection limit, the drain) moves to the new protocol."""
        transport = conn.transport
        if transport is None:
            return
        proto = H2ServerProtocol(conn._handler, conn._limits, self, conn.scheme)
        proto._check_preface = True  # ALPN h2: nothing read yet; h2c: checked again (24 bytes)
        conn.handed_over()
        proto.client_host, proto.client_port = conn.client_host, conn.client_port
        proto.server_address = conn.server_address
        transport.set_protocol(proto)
        proto.start(transport, data)


class H2ServerProtocol(asyncio.Protocol):
    """One HTTP/2 client connection: a state machine (``H2State``) around ``h2``'s."""

    def __init__(self, handler: H2Handler, limits: ServerLimits, config: H2Config, scheme: str) -> None:
        self._handler = handler
        self._limits = limits
        self._config = config
        self.scheme = scheme
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # our write buffer toward the client: many streams may wait on it at once (FlowControl
        # keeps one waiter, enough for HTTP/1.1's one answer at a time)
        self.write_paused = False
        self._drains: list[asyncio.Future[None]] = []
        self._lost = False
        self._flush_handle: asyncio.Handle | None = None
        self.client_host: str | None = None
        self.client_port = 0
        self.server_address: tuple[str, int] | None = None
        self.state = OPEN
        self._ws: None = None  # HttpServer.stop closes relayed WebSockets: none over HTTP/2
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False, header_encoding=None, validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )  # fmt: skip
        self.guard: H2Guard | None = None
        self._streams: dict[int, H2Exchange] = {}
        self._goaway_last = -1  # the last stream id our GOAWAY (drain) allows; -1: none sent
        self._check_preface = False  # began as HTTP/2 (not handed over): the preface is ours to check
        self._seen = b""  # the first bytes while fewer than the preface's 24
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._host_checked = b""  # the last Host / :authority found valid on this connection

    # --- the state machine -------------------------------------------------------------------------

    def _to(self, new: H2State) -> None:
        old = self.state
        if new is old:
            return
        if new not in TRANSITIONS[old]:
            if self._limits.strict_states:
                raise H2StateError(f"HTTP/2 connection: {old.name.lower()} -> {new.name.lower()}")
            log.error("HTTP/2 connection: impossible state change %s -> %s", old.name, new.name)
            new = CLOSED
        self.state = new

    @property
    def idle(self) -> bool:
        return not self._streams

    # --- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A connection that is HTTP/2 from its first byte (ALPN ``h2``, the h2c-only listener)."""
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client_host, self.client_port = str(peer[0]), int(peer[1])
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple) and len(sock) >= 2:
            self.server_address = (str(sock[0]), int(sock[1]))
        limits = self._limits
        if len(limits.connections) >= limits.max_connections:
            limits.count("connection_limit")
            self.state = CLOSED
            transport.close()
            return
        self._check_preface = True
        self.start(transport, b"")

    def start(self, transport: asyncio.BaseTransport, data: bytes) -> None:
        """Begin HTTP/2 on ``transport``: our SETTINGS, the connection window, then ``data``."""
        self.transport = transport  # type: ignore[assignment]
        limits = self._limits
        limits.connections[self] = None
        config = self._config
        self.guard = config.guard(preface=True)
        conn = self.h2
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: config.max_concurrent_streams,
                codes.INITIAL_WINDOW_SIZE: config.initial_window_size,
                codes.MAX_FRAME_SIZE: config.max_frame_size,
                codes.HEADER_TABLE_SIZE: config.header_table_size,
                codes.MAX_HEADER_LIST_SIZE: config.max_header_list_size,
                codes.ENABLE_PUSH: 0,
            },
        )
        # in force from the first frame (we accept no more than we advertise, before the ACK too)
        conn.max_inbound_frame_size = config.max_frame_size
        conn.decoder.max_header_list_size = config.max_header_list_size
        conn.decoder.max_allowed_table_size = config.header_table_size
        conn.initiate_connection()
        # the connection window: as large as one stream's (request bytes buffered per connection)
        if config.initial_window_size > 65535:
            conn.increment_flow_control_window(config.initial_window_size - 65535)
        self.flush_now()
        self._idle_since = self.loop.time()
        self._timer = self.loop.call_later(config.idle_timeout, self._check_idle)
        if limits.draining:
            self.begin_drain()
        if data and self.state is not CLOSED:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self._limits.connections.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._lost = True
        self._wake_drains(ConnectionResetError())
        self._reset_all()

    def _reset_all(self) -> None:
        for stream in list(self._streams.values()):
            stream._reset()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drains(None)

    def _wake_drains(self, error: Exception | None) -> None:
        waiters, self._drains = self._drains, []
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    async def drain(self) -> None:
        """Wait while the client leaves our writes unread: ``ClientGone`` once it is gone, or
        after ``send_timeout`` without progress (the HTTP/1.1 rule: the connection is aborted)."""
        if self._lost:
            raise ClientGone()
        if not self.write_paused:
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._drains.append(waiter)
        timer = self.loop.call_later(self._limits.send_timeout, _expire, waiter)
        try:
            await waiter
        except ConnectionResetError:
            raise ClientGone() from None
        except TimeoutError:
            self._limits.count("client_send_timeout")
            self._abort()
            raise ClientGone() from None
        finally:
            timer.cancel()

    def flush(self) -> None:
        """What h2 has to send goes out at the end of this loop pass, in one write with what other
        streams add meanwhile (a write per frame was the largest cost in the profile)."""
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_handle = None
        self.flush_now()

    def flush_now(self) -> None:
        data = self.h2.data_to_send()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _abort(self) -> None:
        self._to(CLOSED)
        if self.transport is not None:
            self.transport.abort()

    def _close(self, linger: bool = False) -> None:
        """Close now (an idle connection at the cap, the end of a drain): GOAWAY first."""
        if self.state is not CLOSED:
            if self._goaway_last < 0:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.close_connection(ErrorCodes.NO_ERROR)
            self.flush_now()
            self._to(CLOSED)
        self._shut()

    def _shut(self) -> None:
        """Close after our GOAWAY. The client may still be sending: a close with unread input
        makes the kernel answer with a reset, which can destroy the GOAWAY on its way (found by
        the empty-DATA flood test). So, as the HTTP/1.1 server's lingering close: half-close,
        discard what still comes (state CLOSED), close at the client's EOF or after
        ``LINGER_SECONDS``."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(LINGER_SECONDS, transport.close)
            return
        transport.close()

    def eof_received(self) -> bool | None:
        return None  # the client is done sending: the transport closes (ends a lingering close)

    def _refuse(self, reason: str, code: ErrorCodes) -> None:
        """Connection-level abuse or protocol error: counted, GOAWAY with ``code``, closed."""
        self._limits.count(reason)
        if self.state is not CLOSED:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(code)
        self.flush_now()
        self._to(CLOSED)
        self._reset_all()
        self._shut()

    # --- a graceful stop -------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """GOAWAY (NO_ERROR, the last stream received) at once; streams in flight finish; an idle
        connection closes now, a busy one when its last stream ends."""
        if self.state is not OPEN:
            return
        self._to(DRAINING)
        self.flush_now()
        last = self.h2.highest_inbound_stream_id
        self._goaway_last = last
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = ErrorCodes.NO_ERROR
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame.serialize())
        if not self._streams:
            self._close()

    def _check_idle(self) -> None:
        self._timer = None
        if self.state is CLOSED:
            return
        wait = self._config.idle_timeout
        if not self._streams:
            waited = self.loop.time() - self._idle_since
            if waited >= wait:
                self._close()
                return
            wait -= waited
        self._timer = self.loop.call_later(wait, self._check_idle)

    # --- reading ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state is CLOSED:
            return
        if self._check_preface:  # a connection that began as HTTP/2: is it the preface?
            seen = self._seen + data
            if not PREFACE.startswith(seen[:24]):
                self._limits.count("h2_bad_preface")
                frame = GoAwayFrame(0)
                frame.error_code = ErrorCodes.PROTOCOL_ERROR
                self.flush_now()
                if self.transport is not None:
                    self.transport.write(frame.serialize())
                self._to(CLOSED)
                self._close()
                return
            self._check_preface = len(seen) < 24
            self._seen = seen if self._check_preface else b""
        guard = self.guard
        assert guard is not None
        now = self.loop.time()
        reason = guard.feed(data, now)
        if reason is not None:
            self._refuse(reason, ErrorCodes.ENHANCE_YOUR_CALM)
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        streams = self._streams
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event, now)
            elif isinstance(event, h2.events.StreamEnded):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._end_body()
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._reset()
            elif isinstance(event, h2.events.TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._window_opened(0)
            elif isinstance(event, h2.events.ConnectionTerminated):  # the client's GOAWAY
                self._to(CLOSED)
                self._reset_all()
                self.flush_now()
                self._shut()
                return
            if self.state is CLOSED:
                return
        self.flush()

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """``h2`` refused what the client sent and queued its GOAWAY (with the code it chose):
        counted by kind, sent, closed. An undecodable header block is a COMPRESSION_ERROR (RFC
        9113 4.3), which h2 reports as a PROTOCOL_ERROR: that GOAWAY is replaced."""
        if isinstance(exc, h2.exceptions.DenialOfServiceError):
            reason = HEADERS_TOO_LARGE  # an HPACK bomb: the decoded list went over the limit
        elif isinstance(exc, h2.exceptions.FrameTooLargeError):
            reason = "h2_frame_too_large"
        else:
            reason = "h2_protocol_error"
        self._limits.count(reason)
        if reason == "h2_protocol_error" and isinstance(exc.__cause__, hpack.HPACKError):
            self.h2.clear_outbound_data_buffer()
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.h2.highest_inbound_stream_id
            frame.error_code = ErrorCodes.COMPRESSION_ERROR
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(frame.serialize())
        self.flush_now()
        self._to(CLOSED)
        self._reset_all()
        self._shut()

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        size = event.flow_controlled_length or 0
        data = event.data or b""
        ex = self._streams.get(sid)
        if ex is None or ex.gone or ex._complete:
            if size:  # nobody will read it: the window is opened again at once
                self.h2.acknowledge_received_data(size, sid)
            return
        padding = size - len(data)
        if padding > 0:
            self.h2.acknowledge_received_data(padding, sid)
        max_body = self._limits.max_body
        if max_body:
            ex._body_bytes += len(data)
            if ex._body_bytes > max_body:
                self.h2.acknowledge_received_data(len(data), sid)
                self.refuse_stream(ex, 413, "h2_body_too_large", "request body over the limit")
                return
        if data:
            ex._feed(data)

    def _on_request(self, event: h2.events.RequestReceived, now: float) -> None:
        sid = event.stream_id
        conn = self.h2
        if self.state is not OPEN or (0 <= self._goaway_last < sid):
            conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: never processed
            return
        config = self._config
        if len(self._streams) >= config.max_concurrent_streams:
            # h2 counts streams the client closed; we count handlers still running (the rapid
            # reset attack opens and resets streams so the backends keep working for it)
            conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self._limits.count("h2_refused_stream")
            guard = self.guard
            if guard is not None:
                reason = guard.reset(now)
                if reason is not None:
                    self._refuse(reason, ErrorCodes.ENHANCE_YOUR_CALM)
            return
        method = b""
        target = b""
        authority: bytes | None = None
        headers: list[tuple[bytes, bytes]] = []
        hosts: list[bytes] = []
        cookies: list[bytes] = []
        cookie_at = -1
        for name, value in event.headers:
            name, value = bytes(name), bytes(value)
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    target = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"cookie":  # RFC 9113 8.2.3: one cookie field for HTTP/1.1 backends
                if cookie_at < 0:
                    cookie_at = len(headers)
                    headers.append((name, value))
                cookies.append(value)
                continue
            if name == b"host":
                hosts.append(value)
            headers.append((name, value))
        if len(cookies) > 1:
            headers[cookie_at] = (b"cookie", b"; ".join(cookies))
        if authority is not None and not hosts:
            headers.insert(0, (b"host", authority))
            hosts.append(authority)
        has_body = event.stream_ended is None
        ex = H2Exchange(self, sid, headers, has_body)
        self._streams[sid] = ex
        problem = self._problem(ex, method, target, headers)
        if problem is None and hosts and not self._host_ok(hosts):
            problem = 400, "h2_bad_host", "invalid Host (or :authority)"
        if problem is not None:
            status, reason, detail = problem
            self._limits.count(reason)
            ex.method = method.decode("latin-1")
            ex.task = self.loop.create_task(self._answer_now(ex, status, reason, detail))
            return
        if has_body:
            length = ex.content_length()
            if length is None:
                headers.append(CHUNKED)  # the core's scan: a body, framing left to the edge client
            elif self._limits.max_body and length > self._limits.max_body:
                self._limits.count("h2_body_too_large")
                ex.task = self.loop.create_task(
                    self._answer_now(ex, 413, "h2_body_too_large", "request body over the limit")
                )
                return
        ex.task = self.loop.create_task(self._run(ex))

    def _host_ok(self, hosts: list[bytes]) -> bool:
        """One Host, ``uri-host[:port]`` (the HTTP/1.1 server's rule; h2 checks it agrees with
        :authority). A client repeats its authority: checked once per connection."""
        if len(hosts) > 1:
            return False
        host = hosts[0]
        if host != self._host_checked:
            if not HOST_OK.match(host):
                return False
            self._host_checked = host
        return True

    def _problem(
        self, ex: H2Exchange, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, str, str] | None:
        """What makes this request one we answer here (400/405/431), or None."""
        if len(headers) > self._limits.max_headers:
            return 431, "h2_too_many_headers", "too many request headers"
        if method == b"CONNECT":
            return 405, "h2_connect_refused", "CONNECT is not served: this is not a forward proxy"
        raw_path, _, query = target.partition(b"?")
        try:
            ex.method = method.decode("ascii")
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return 400, "h2_malformed", "invalid request target"
        if "%" in path:
            path = unquote(path)
        ex.raw_path = raw_path
        ex.path = path
        ex.query = query
        return None

    def refuse_stream(self, ex: H2Exchange, status: int, reason: str, detail: str) -> None:
        """A stream refused mid-request (its body over a limit, or stalled): counted; the status
        with a JSON body if nothing was answered yet (and the window allows it), then RST_STREAM
        so the client stops sending; its handler sees the client gone."""
        self._limits.count(reason)
        sid = ex.stream_id
        conn = self.h2
        if self.state is not CLOSED and not ex.gone:
            with contextlib.suppress(h2.exceptions.H2Error):
                body = _json_error(reason.replace("_", " ").encode(), detail.encode())
                if not ex._responded and conn.local_flow_control_window(sid) >= len(body):
                    ex._responded = True
                    conn.send_headers(sid, _json_head(status, body))
                    conn.send_data(sid, body, end_stream=True)
                    conn.reset_stream(sid, ErrorCodes.NO_ERROR)
                else:
                    conn.reset_stream(sid, ErrorCodes.CANCEL)
            self.flush()
        ex._complete = True
        ex._reset()

    def _window_opened(self, sid: int) -> None:
        if sid == 0:
            for each in self._streams.values():
                each._wake_window()
        else:
            stream = self._streams.get(sid)
            if stream is not None:
                stream._wake_window()

    # --- answering -------------------------------------------------------------------------------

    async def _answer_now(self, ex: H2Exchange, status: int, reason: str, detail: str) -> None:
        """A request refused here (never forwarded): a small JSON answer on its stream."""
        try:
            body = _json_error(reason.replace("_", " ").encode(), detail.encode())
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await ex.respond(status, headers, body, False)
        except ClientGone:
            pass
        finally:
            self._ended(ex)

    async def _run(self, ex: H2Exchange) -> None:
        try:
            if not ex.gone:  # reset before its turn came (rapid reset): never routed
                await self._handler(ex)
        except ClientGone:
            pass
        except Exception:  # noqa: BLE001 - a bug costs one stream, never the connection's others
            log.exception("request handler failed")
            if not ex._responded and not ex.gone:
                body = _json_error(b"internal error", b"the proxy failed to handle this request")
                with contextlib.suppress(ClientGone, OSError):
                    await ex.respond(500, [(b"content-type", b"application/json")], body, False)
        finally:
            self._ended(ex)

    def _ended(self, ex: H2Exchange) -> None:
        """The stream's handler returned: the stream never stays open (a 502 when nothing was
        answered, RST_STREAM when an answer was started and not ended)."""
        sid = ex.stream_id
        conn = self.h2
        if not ex._complete and not ex.gone and self.state is not CLOSED:
            try:
                if not ex._responded and conn.local_flow_control_window(sid) >= 128:
                    body = _json_error(b"upstream unavailable", b"no answer was produced")
                    conn.send_headers(sid, _json_head(502, body))
                    conn.send_data(sid, body, end_stream=True)
                else:
                    conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.H2Error:
                pass
        elif (
            ex._complete
            and not ex._body_done
            and not ex.gone
            and self.state is not CLOSED
            and ex.content_length() != 0
        ):
            # answered before the whole request body came: the client may stop sending it (not
            # for a declared empty body: its END_STREAM is on its way, and clients such as httpx
            # fail a request whose stream was reset before they could end it)
            with contextlib.suppress(h2.exceptions.H2Error):
                conn.reset_stream(sid, ErrorCodes.NO_ERROR)
        unread = ex._unread()
        if unread and self.state is not CLOSED:
            with contextlib.suppress(h2.exceptions.H2Error):
                conn.acknowledge_received_data(unread, sid)
        self._streams.pop(sid, None)
        if self.state is CLOSED:
            return
        self.flush()
        if not self._streams:
            self._idle_since = self.loop.time()
            if self.state is DRAINING:
                self._close()


class H2Exchange:
    """One stream: the request as the core reads it and its answer (``ClientExchange``)."""

    http2 = True

    __slots__ = ("method", "path", "raw_path", "query", "headers", "client_host", "scheme", "stream_id",
                 "trailers", "gone", "task", "_conn", "_chunks", "_body_done", "_body_bytes", "_waiter",
                 "_window", "_gone_waiters", "_responded", "_complete", "_no_body")  # fmt: skip

    def __init__(
        self, conn: H2ServerProtocol, stream_id: int, headers: list[tuple[bytes, bytes]], has_body: bool
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.method = ""
        self.path = ""
        self.raw_path = b""
        self.query = b""
        self.headers = headers
        self.client_host = conn.client_host
        self.scheme = conn.scheme
        # request trailers: kept apart, never merged into ``headers``, never routed on
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.gone = False
        self.task: asyncio.Task[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._body_done = not has_body
        self._body_bytes = 0
        self._waiter: asyncio.Future[None] | None = None  # read() waiting for DATA
        self._window: asyncio.Future[None] | None = None  # a write waiting for flow-control window
        self._gone_waiters: list[asyncio.Future[None]] = []
        self._responded = False
        self._complete = False
        self._no_body = False

    def content_length(self) -> int | None:
        for name, value in self.headers:
            if name == b"content-length":
                return int(value) if value.isdigit() else None
        return None

    # --- fed by the connection ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def _end_body(self) -> None:
        self._body_done = True
        self._wake()

    def _reset(self) -> None:
        """The client reset the stream, or the connection is gone."""
        if self.gone:
            return
        self.gone = True
        self._wake()
        self._wake_window()
        waiters, self._gone_waiters = self._gone_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_window(self) -> None:
        waiter = self._window
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unread(self) -> int:
        size = sum(len(chunk) for chunk in self._chunks)
        self._chunks.clear()
        return size

    # --- ClientExchange ----------------------------------------------------------------------------

    async def read(self) -> tuple[bytes, bool]:
        chunks = self._chunks
        while True:
            if chunks:
                chunk = chunks.popleft()
                conn = self._conn
                if chunk and conn.state is not CLOSED:
                    # the window opens as the core consumes: a slow upstream back-pressures
                    with contextlib.suppress(h2.exceptions.H2Error):
                        conn.h2.acknowledge_received_data(len(chunk), self.stream_id)
                    conn.flush()
                return chunk, bool(chunks) or not self._body_done
            if self.gone:
                raise ClientGone()
            if self._body_done:
                return b"", False
            conn = self._conn
            waiter = self._waiter = conn.loop.create_future()
            # the HTTP/1.1 rule (limits.body_timeout_seconds): a body that stalls is refused (408)
            timer = conn.loop.call_later(conn._limits.body_timeout, _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                conn.refuse_stream(self, 408, "h2_body_timeout", "request body stalled")
                raise ClientGone() from None
            finally:
                timer.cancel()
                self._waiter = None

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
        if self.gone:
            raise ClientGone()
        self._responded = True
        out = [(b":status", b"%d" % status)]
        for name, value in headers:
            name = name.lower()
            if name in CONNECTION_SPECIFIC or name[:1] == b":":
                continue
            if name == b"te" and value.strip().lower() != b"trailers":
                continue
            out.append((name, value))
        no_body = self.method == "HEAD" or status in NO_BODY_STATUS or status < 200
        self._no_body = no_body
        end = not more and (not body or no_body)
        conn = self._conn
        try:
            conn.h2.send_headers(self.stream_id, out, end_stream=end)
        except h2.exceptions.H2Error:
            raise ClientGone() from None
        conn.flush()
        if end:
            self._complete = True
            return
        if body and not no_body:
            await self._send(body, not more)
        elif not more:
            await self._send(b"", True)

    async def write(self, body: bytes, more: bool) -> None:
        if self._complete:
            return
        if self.gone:
            raise ClientGone()
        if self._no_body:
            body = b""
        if body or not more:
            await self._send(body, not more)

    async def end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """End an answer begun with ``respond(..., more=True)``: trailers in a HEADERS frame with
        END_STREAM, or an empty DATA frame with END_STREAM when there are none."""
        if self._complete:
            return
        if self.gone:
            raise ClientGone()
        fields = [
            (n.lower(), v) for n, v in trailers if n[:1] != b":" and n.lower() not in CONNECTION_SPECIFIC
        ]
        if not fields:
            await self._send(b"", True)
            return
        conn = self._conn
        try:
            conn.h2.send_headers(self.stream_id, fields, end_stream=True)
        except h2.exceptions.H2Error:
            raise ClientGone() from None
        self._complete = True
        conn.flush()

    async def _send(self, data: bytes, end: bool) -> None:
        """DATA frames within the client's flow-control windows (stream and connection), and the
        transport's write buffer: a client that keeps its window shut for ``stall_timeout`` gets
        RST_STREAM and the handler ``ClientGone`` (the upstream connection is freed)."""
        conn = self._conn
        h2c = conn.h2
        sid = self.stream_id
        view = memoryview(data)
        at = 0
        size = len(data)
        frames = 0
        queued = 0
        try:
            while True:
                if self.gone:
                    raise ClientGone()
                if at >= size:
                    if end:
                        if size == 0:
                            h2c.end_stream(sid)
                        self._complete = True
                    break
                window = h2c.local_flow_control_window(sid)
                if window <= 0:
                    conn.flush_now()
                    await self._wait_window()
                    continue
                frame = h2c.max_outbound_frame_size
                step = min(window, frame, size - at)
                last = at + step >= size
                h2c.send_data(sid, view[at : at + step], end_stream=end and last)
                frames += 1
                at += step
                if last and end:
                    self._complete = True
                    break
                queued += step
                if queued >= FLUSH_BYTES:  # large answers: written as they go, so the transport
                    queued = 0  # says when the client stops reading
                    conn.flush_now()
                    if conn.write_paused:
                        await conn.drain()
        except h2.exceptions.H2Error:
            raise ClientGone() from None
        finally:
            guard = conn.guard
            if frames and guard is not None:
                guard.data_sent(frames)
        conn.flush()
        if conn.write_paused and not self._complete:
            await conn.drain()

    async def _wait_window(self) -> None:
        conn = self._conn
        waiter = self._window = conn.loop.create_future()
        try:
            await asyncio.wait_for(waiter, conn._config.stall_timeout)
        except TimeoutError:
            conn._limits.count("h2_stall")
            if not self.gone and conn.state is not CLOSED:
                with contextlib.suppress(h2.exceptions.H2Error):
                    conn.h2.reset_stream(self.stream_id, ErrorCodes.CANCEL)
                conn.flush()
            self._reset()
            raise ClientGone() from None
        finally:
            self._window = None

    async def wait_gone(self) -> None:
        if self.gone:
            return
        waiter: asyncio.Future[None] = self._conn.loop.create_future()
        self._gone_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._gone_waiters:
                self._gone_waiters.remove(waiter)

    def websocket(self) -> None:
        return None  # RFC 8441 (WebSockets over HTTP/2) is not served

    async def asgi(self, app: ASGIApp) -> None:
        """The admin API over HTTP/2 (scope ``http_version`` "2")."""
        conn = self._conn
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "2", "method": self.method, "scheme": self.scheme,
            "path": self.path, "raw_path": self.raw_path, "query_string": self.query, "root_path": "",
            "headers": [h for h in self.headers if h != CHUNKED],
            "client": (self.client_host, conn.client_port) if self.client_host else None,
            "server": conn.server_address,
        }  # fmt: skip
        start: dict[str, Any] = {}
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
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
            if not self._responded:
                headers = [(bytes(k).lower(), bytes(v)) for k, v in start.get("headers", [])]
                await self.respond(start["status"], headers, body, more)
            else:
                await self.write(body, more)

        await app(scope, receive, send)

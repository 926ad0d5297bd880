"""Request limits and framing checks at the HTTP parser, before a request becomes an ASGI call.

uvicorn's httptools protocol (llhttp underneath) already rejects most malformed framing, but it
has no limit on the request line, header size or header count, no header timeout (a slowloris
client holds a connection forever), accepts two Host headers, HTTP/0.9 and "HTTP/2.0" requests,
and logs a warning per bad request (a log flood an attacker controls). This subclass adds those
checks inside the parser callbacks: O(1) per chunk and per header, no allocation beyond counters.

Refusals are answered here with a small JSON body and ``Connection: close``, counted in
``strangler_rejected_requests_total{reason}``; nothing refused here ever reaches a backend.
Use it with ``uvicorn.Config(http=GuardedHttpToolsProtocol)`` (or the import string
``proxy.traffic.guard:GuardedHttpToolsProtocol`` with several workers).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from proxy.settings import LimitSettings

# RFC 3986 reg-name / IP-literal / port characters; anything else in Host is refused
_HOST_OK = re.compile(rb"^[A-Za-z0-9.\-_~!$&'()*+,;=:\[\]%]*$")
_OWS = b" \t"
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 74\r\n"
    b'connection: close\r\n\r\n{"error":"over capacity","detail":"too many connections, try again later"}'
)


class Refused(Exception):
    """Raised inside a parser callback to stop parsing; the protocol answers ``status``."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class Policy:
    """Limits resolved once per server (not per connection) plus the metrics recorder."""

    __slots__ = ("max_line", "max_header_bytes", "max_headers", "max_head", "max_body", "header_timeout",
                 "body_timeout", "metrics", "max_connections", "connections")  # fmt: skip

    def __init__(self, limits: LimitSettings, metrics: Any | None) -> None:
        self.max_line = limits.max_request_line_bytes
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        # bytes of an unfinished head we are willing to buffer (request line + headers + CRLFs)
        self.max_head = limits.max_request_line_bytes + limits.max_header_bytes + 4 * (limits.max_headers + 2)
        self.max_body = limits.max_body_bytes
        self.header_timeout = limits.header_timeout_seconds
        self.body_timeout = limits.body_timeout_seconds
        self.metrics = metrics
        self.max_connections = connection_cap(limits.max_connections)
        # every open client connection, oldest first: idle ones are closed first at the cap
        self.connections: dict[GuardedHttpToolsProtocol, None] = {}

    def count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected_request(reason)


def connection_cap(configured: int) -> int:
    """The configured cap, kept below the open-file limit: each client connection may need an
    upstream one too, and Redis, the mirror and the listener need a few. Past the limit accept()
    fails with EMFILE and nobody is served; below it we choose whom to close."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return configured
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(8, min(configured, (soft - 64) // 2))


def raise_open_file_limit() -> None:
    """Soft open-file limit up to the hard one: the default 1024 is a few hundred clients."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else 1 << 20
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass


def policy_for(config: Config) -> Policy:
    """Find the Strangler app behind uvicorn's wrappers for its settings and metrics; cache it."""
    cached = getattr(config, "_strangler_policy", None)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    app: Any = config.loaded_app
    for _ in range(8):
        settings = getattr(app, "settings", None)
        if settings is not None and isinstance(getattr(settings, "limits", None), LimitSettings):
            policy = Policy(settings.limits, getattr(app, "metrics", None))
            break
        app = getattr(app, "app", None)
        if app is None:
            policy = Policy(LimitSettings(), None)
            break
    else:
        policy = Policy(LimitSettings(), None)
    config._strangler_policy = policy  # type: ignore[attr-defined]
    return policy


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits, a header timeout and strict framing checks."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._policy = policy_for(config)
        self._refusal: Refused | None = None
        self._refused = False  # once refused, nothing more on this connection is read
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self._hosts = 0
        self._codings = 0
        self._content_length = -1
        self._body_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        # loop time since when we wait for the current request head; None while not waiting
        self._head_since: float | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_body = 0.0
        self._active: Any = None  # the request being answered now (uvicorn keeps no reference)
        self.url = b""  # uvicorn sets it per message; the limits read it before the first one

    # --- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        policy = self._policy
        if len(policy.connections) >= policy.max_connections and not self._make_room():
            # at the cap and every connection is busy: refuse at once, before reading a byte
            policy.count("connection_limit")
            self._refused = True
            transport.write(OVER_CAPACITY)
            transport.close()
            return
        policy.connections[self] = None
        self._head_since = self.loop.time()
        self._header_timer = self.loop.call_later(policy.header_timeout, self._header_check)

    def _make_room(self) -> bool:
        """Close the oldest idle connection (no request in progress), as nginx reuses idle
        keep-alive connections when worker_connections run out. False if none is idle."""
        for conn in self._policy.connections:
            if conn._idle():
                self._policy.count("idle_closed")
                conn._refused = True
                conn.transport.close()
                self._policy.connections.pop(conn, None)
                return True
        return False

    def _idle(self) -> bool:
        active = self._active
        return self._head_bytes == 0 and (active is None or active.response_complete)

    def connection_lost(self, exc: Exception | None) -> None:
        self._policy.connections.pop(self, None)
        self._cancel_header_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, minus its per-request warning log, plus the unfinished-head bound."""
        if self._refused:
            return
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                return
            # h2c and other upgrades are served as plain requests (the Upgrade header is stripped
            # as hop-by-hop); the parser stops at an upgrade, so nothing after this request on the
            # connection may be read as HTTP: close once answered.
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return
        except httptools.HttpParserError:
            refusal = self._refusal or Refused(400, "malformed", "invalid HTTP request")
            self._refuse(refusal)
            return
        if self._in_head and self._head_bytes > self._policy.max_head:
            if self._header_count == 0 and len(self.url) >= self._policy.max_line:
                self._refuse(Refused(414, "request_line_too_long", "request line over the limit"))
            else:
                self._refuse(Refused(431, "headers_too_large", "request headers over the limit"))

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._active = cycle
        super()._start_asgi_task(cycle, app)

    # --- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._header_count = 0
        self._header_bytes = 0
        self._hosts = 0
        self._codings = 0
        self._content_length = -1
        self._body_bytes = 0
        if self._head_since is None:
            self._head_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self._policy.max_line:
            raise self._stop(414, "request_line_too_long", "request line over the limit")

    def on_header(self, name: bytes, value: bytes) -> None:
        value = value.strip(_OWS)  # OWS is not part of a field value (RFC 9110 5.5)
        policy = self._policy
        count = self._header_count = self._header_count + 1
        size = self._header_bytes = self._header_bytes + len(name) + len(value) + 4
        if count > policy.max_headers or size > policy.max_header_bytes:
            if count > policy.max_headers:
                raise self._stop(431, "too_many_headers", "too many request headers")
            raise self._stop(431, "headers_too_large", "request headers over the limit")
        # uvicorn's on_header, inlined (this runs for every header of every request)
        lower = name.lower()
        if lower == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((lower, value))
        if lower == b"host":
            self._hosts += 1
            if self._hosts > 1:
                raise self._stop(400, "bad_host", "more than one Host header")
            if not _HOST_OK.match(value):
                raise self._stop(400, "bad_host", "invalid Host header")
        elif lower == b"transfer-encoding":
            self._codings += 1
            if self._codings > 1 or value.lower() != b"chunked":
                raise self._stop(400, "bad_framing", "Transfer-Encoding must be one 'chunked'")
        elif lower == b"content-length":
            # llhttp has checked it is one plain decimal number
            self._content_length = int(value) if value.isdigit() else -1

    def on_headers_complete(self) -> None:
        self._head_since = None
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise self._stop(400, "bad_version", "only HTTP/1.0 and HTTP/1.1 are served")
        if self._hosts == 0 and version == "1.1":
            raise self._stop(400, "bad_host", "HTTP/1.1 requires a Host header")
        if self._codings and version == "1.0":
            raise self._stop(400, "bad_framing", "Transfer-Encoding is not allowed in HTTP/1.0")
        if self.parser.get_method() == b"CONNECT":
            raise self._stop(400, "connect_refused", "CONNECT is not served: this is not a forward proxy")
        if (self._codings or self._content_length > 0) and self.parser.should_upgrade():
            # llhttp stops at an upgrade without reading the body: it would never reach the app and
            # whatever follows could be a request hidden from us (h2c smuggling)
            raise self._stop(400, "bad_upgrade", "an upgrade request must not carry a body")
        max_body = self._policy.max_body
        if max_body and self._content_length > max_body:
            raise self._stop(413, "body_too_large", "request body over the limit")
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()
        if self._codings or self._content_length > 0:
            self._last_body = self.loop.time()
            self._body_timer = self.loop.call_later(self._policy.body_timeout, self._body_check)

    def on_body(self, body: bytes) -> None:
        self._last_body = self.loop.time()
        max_body = self._policy.max_body
        if max_body:
            self._body_bytes += len(body)
            if self._body_bytes > max_body:
                raise self._stop(413, "body_too_large", "request body over the limit")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._head_since = None
        self._cancel_body_timer()
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    # --- refusing ------------------------------------------------------------------------------

    def _stop(self, status: int, reason: str, detail: str) -> Refused:
        """Remember why; httptools turns the raised exception into an HttpParserError."""
        self._refusal = Refused(status, reason, detail)
        return self._refusal

    def _refuse(self, refusal: Refused) -> None:
        """Answer (if no answer has started) and close; the running request, if any, sees a disconnect.

        If the refused request is pipelined behind requests still being answered, writing our
        answer now would make it read as the answer to an earlier request (a response desync):
        the earlier answers finish instead, then the connection closes without a word about this
        one (as after any unanswered pipelined request, the client may retry it).
        """
        self._refusal = None
        self._refused = True
        self._cancel_header_timer()
        self._cancel_body_timer()
        self._policy.count(refusal.reason)
        transport = self.transport
        if transport.is_closing():
            return
        # the refused request has a cycle only once its headers were accepted (refused mid-body)
        refused = None if self._in_head else self.cycle
        active = self._active
        if active is not None and active is not refused and not active.response_complete:
            if refused is not None and self.pipeline and self.pipeline[0][0] is refused:
                self.pipeline.popleft()  # queued behind the active one: it never runs
            last = self.pipeline[0][0] if self.pipeline else active
            last.keep_alive = False  # the last accepted request is answered, then the connection closes
            return
        cycle = refused if refused is not None else self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            body = b'{"error":"' + refusal.reason.replace("_", " ").encode() + b'","detail":"' + \
                refusal.detail.encode() + b'"}'  # fmt: skip
            transport.write(
                b"".join(
                    (
                        STATUS_LINE[refusal.status],
                        b"content-type: application/json\r\ncontent-length: ",
                        str(len(body)).encode(),
                        b"\r\nconnection: close\r\n\r\n",
                        body,
                    )
                )
            )
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's further sends are dropped, its receive sees a disconnect
            cycle.message_event.set()
        transport.close()

    # --- header timeout (slowloris) --------------------------------------------------------------
    # One timer per connection, re-armed from its own callback: a request costs a clock read at its
    # first byte, not a timer of its own.

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_check(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        timeout = self._policy.header_timeout
        since = self._head_since
        waited = 0.0 if since is None else self.loop.time() - since
        if waited < timeout:
            self._header_timer = self.loop.call_later(timeout - waited, self._header_check)
            return
        if self.url or self._head_bytes:
            self._refuse(Refused(408, "header_timeout", "request headers not received in time"))
        else:  # an idle connection that never sent a byte: just close it
            self._policy.count("header_timeout")
            self.transport.close()

    # --- body timeout (stalled uploads) ----------------------------------------------------------

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        """One timer per body, re-armed for the remainder: O(1) per chunk (a clock read)."""
        self._body_timer = None
        if self.transport.is_closing() or self._in_head:
            return
        now = self.loop.time()
        if self.flow.read_paused:
            self._last_body = now  # we stopped reading (the upstream is slow): not the client's silence
        idle = now - self._last_body
        timeout = self._policy.body_timeout
        if idle >= timeout:
            self._refuse(Refused(408, "body_timeout", "request body stalled"))
        else:
            self._body_timer = self.loop.call_later(timeout - idle, self._body_check)

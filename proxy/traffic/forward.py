"""The forwarding core: one request from client to backend and back. Per-request state lives in
a ``Routed`` (one per request), never on ``self``. It talks to the client through
``ClientExchange`` (our native server or the ASGI adapter), and to the backends through the edge
client.

One lifecycle, whichever path carries the request (docs/architecture.md, "One request's
lifecycle"):

    route -> forward -> fallback -> relay -> finish

- ``_route``: everything decided before a byte goes upstream, the same for HTTP and WebSocket
  upgrades (deprecation, group, the one header scan, the version, the forwarding headers);
- ``_forward`` / ``_websocket``: send (open) upstream; on failure the one fallback rule
  (``_fall_back``: v2 unreachable with nothing sent -> v1, counted and recorded for v2);
- ``_relay`` (task path) or ``_answer_now`` (fast path): the answer back to the client;
- ``finish``: metrics, canary recorders and the mirror, exactly once per request, whatever the
  path and the outcome (answered, 502/504 generated, client gone, cut mid-answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson

from proxy.control.store import ControlStore
from proxy.edge.client import UpstreamResponse
from proxy.edge.errors import UpstreamError
from proxy.edge.headers import HOP_BY_HOP, PROTECTED, end_to_end
from proxy.edge.websocket import FrameSocket, WsHandshakeRefused, open_upstream
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.traffic.decision import BadForce, Decider, query_value
from proxy.traffic.duplex import Duplex
from proxy.traffic.exchange import (
    ASGIApp,
    AsgiExchange,
    AsgiWebSocket,
    ClientExchange,
    ClientGone,
    ClientWebSocket,
    Receive,
    Scope,
    Send,
)
from proxy.traffic.hooks import (
    DeprecationAction,
    Deprecations,
    Mirror,
    MirrorRequest,
    NoDeprecations,
    NoMirror,
    PrimaryResult,
    Recorder,
)
from proxy.traffic.outcomes import (
    ANSWERED,
    CLIENT_FAULT,
    CLIENT_GONE_REQUEST,
    CLIENT_GONE_RESPONSE,
    CUT,
    FAILED,
    PROXY_LIMIT,
)
from proxy.traffic.paths import is_canonical, normalise, strip_params
from proxy.traffic.routing import RouteTable
from proxy.traffic.upstream import RESPONSE_STRIP, VERSION_HEADER, Upstream, translate
from proxy.traffic.websocket import Registry, Session, WsPolicy, relay

if TYPE_CHECKING:
    from proxy.edge.server import NativeExchange

# headers the proxy sets itself: the client's copies are replaced (X-Forwarded-For is appended to)
PROXY_SET: Final = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for", b"x-request-id"})
SMALL_BODY: Final = 64 * 1024
# a client cannot forge the proxy's own markers (shadow, calibration, ...) towards the backends
MARKER_PREFIX: Final = b"x-strangler-"
# a request that says it is another method counts as that method for mirroring and calibration
METHOD_OVERRIDES: Final = frozenset({b"x-http-method-override", b"x-method-override"})
# names whose underscore look-alike is never forwarded, even with allow_underscore_headers: WSGI and
# CGI backends read ``X_Forwarded_Proto`` and ``X-Forwarded-Proto`` as one key (HTTP_X_FORWARDED_PROTO)
NEVER_UNDERSCORED: Final = HOP_BY_HOP | PROXY_SET | {b"content-length", b"host", b"cookie"} | METHOD_OVERRIDES
ALLOW_ALL: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
JSON_HEADERS: Final = [(b"content-type", b"application/json")]
VERSION_VALUE: Final = {"v1": b"v1", "v2": b"v2"}


class BodyTooSlow(Exception):
    """A streamed request body arrived below the minimum rate: the client, not the backend, is at fault."""


class LifecycleError(Exception):
    """A request finished twice: a bug. Raised with ``limits.strict_states`` (the tests' proxies)."""


METHOD_BYTES: Final = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
FAILURE_LABELS: Final = {502: "upstream unavailable", 503: "upstream busy", 504: "upstream timeout"}


class ProxyApp:
    """Forwards every non-admin request to v1 or v2 according to the in-memory snapshot."""

    def __init__(
        self,
        settings: Settings,
        store: ControlStore,
        upstreams: dict[str, Upstream],
        metrics: Metrics,
        admin: ASGIApp,
        routes: RouteTable | None = None,
        recorders: Sequence[Recorder] = (),
        mirror: Mirror | None = None,
        deprecations: Deprecations | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._upstreams = upstreams
        self._metrics = metrics
        self._admin = admin
        self._routes = routes or RouteTable(settings.routes)
        self._recorders = tuple(recorders)
        self._mirror: Mirror = mirror or NoMirror()
        self._deprecations: Deprecations = deprecations or NoDeprecations()
        self._prefix = settings.admin_prefix
        self._decider = Decider(settings)
        self._user_header = self._decider.user_header
        self._force = self._decider.force
        self._wanted = self._decider.wanted
        self._allow_underscores = settings.allow_underscore_headers
        self._never_underscored = (
            NEVER_UNDERSCORED | {self._user_header} | ({self._force} if self._force else set())
        )
        self._fallback_to_v1 = settings.fallback_to_v1
        self._preserve_host = settings.preserve_host
        self._strict = settings.limits.strict_states
        ws = settings.websocket
        self._ws = ws
        self._ws_policy = WsPolicy(
            ws.idle_timeout_seconds, ws.close_timeout_seconds, ws.drain_grace_seconds,
            ws.rollback_grace_seconds,
        )  # fmt: skip
        self.ws_registry = Registry(
            lambda: self._store.current, self._decider.percentage, self._ws_policy, metrics
        )
        self._request_ids = _request_ids()
        limits = settings.limits
        self._body_policy = BodyPolicy(
            limits.body_buffer_bytes, limits.min_body_rate_bytes_per_second, limits.body_rate_grace_seconds
        )
        self._duplex = Duplex(self, upstreams, settings, metrics)  # backends spoken to over HTTP/2

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI adapter: ``proxy.app:app`` under any ASGI server runs the same core."""
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self.handle(AsgiWebSocket(scope, receive, send))
            return
        await self.handle(AsgiExchange(scope, receive, send))

    # --- entries: the task path (handle) and the fast path (start) ---------------------------------

    async def handle(self, ex: ClientExchange) -> None:
        norm = self._classify(ex)
        if not isinstance(norm, str):
            await norm
            return
        ws = ex.websocket()
        if ws is not None:
            if not self._ws.enabled:
                await self._reject(ex, 400, "websocket_disabled", "WebSockets are not relayed here")
                return
            problem = ws.problem()
            if problem is not None:
                await self._reject(ex, 400, "bad_websocket_handshake", problem)
                return
        routed = self._route(ex, norm, ws is not None)
        if not isinstance(routed, Routed):
            await routed
        elif ws is not None:
            await self._websocket(ex, ws, routed)
        else:
            await self._forward(ex, routed)

    def start(self, ex: NativeExchange) -> Coroutine[Any, Any, None] | None:
        """Our server's entry for a request without a body: taken now, with no task, when a warm
        upstream connection is free (the common case under load); the answer is relayed from the
        upstream connection's callbacks (``_FastRelay``). Anything else returns the coroutine that
        handles it, which the server runs as a task. The same lifecycle either way: routed by
        ``_route``, ended by ``finish``."""
        norm = self._classify(ex)
        if not isinstance(norm, str):
            return norm
        routed = self._route(ex, norm, False)
        if not isinstance(routed, Routed):
            return routed
        if routed.has_body:
            # a pipelined request whose body arrived whole while it waited its turn (the server
            # saw it "done"): a body is never the fast path's, it goes with the task
            return self._forward(ex, routed)
        pool = self._upstreams[routed.version].pool
        method = routed.method
        try:
            head = pool.head_for(
                METHOD_BYTES.get(method) or method.encode("latin-1"), routed.raw_target, routed.headers,
                routed.add_host, b"content-length: 0\r\n" if routed.content_length == 0 else b"",
            )  # fmt: skip
        except UpstreamError:
            return self._forward(ex, routed)  # refused again there, and answered
        conn = pool.take_idle()
        if conn is None:
            return self._forward(ex, routed)  # a new connection (or a wait for one) needs a task
        conn.send_now(head, method == "HEAD", pool.limits.read_timeout, _FastRelay(self, ex, routed))
        return None

    def _classify(self, ex: ClientExchange) -> str | Coroutine[Any, Any, None]:
        """The normalised path of a request to forward, or the coroutine that answers it here
        (the admin API, an odd target, a misspelt admin path)."""
        path = ex.path
        raw_path = ex.raw_path
        if not raw_path.startswith(b"/"):
            return self._odd_target(ex, raw_path)
        prefix = self._prefix
        if path.startswith(prefix) and (path == prefix or path[len(prefix)] == "/"):
            # one spelling reaches the admin API: no escapes (%5F), no dot or empty segments, no
            # trailing slash (Starlette would answer it with a redirect built from the client's Host)
            if is_canonical(path, raw_path) and not path.endswith("/"):
                return ex.asgi(self._admin)
            return self._reject(ex, 400, "non_canonical_admin_path", "admin paths must be spelled plainly")
        norm = normalise(path)
        if norm != path and (norm == prefix or norm.startswith(prefix + "/")):
            return self._reject(ex, 400, "non_canonical_admin_path", "admin paths must be spelled plainly")
        return norm

    async def _odd_target(self, ex: ClientExchange, raw_path: bytes) -> None:
        """Only origin-form targets are forwarded. ``OPTIONS *`` asks about the server itself, so
        the proxy answers it; anything else (``*@host:port/x``, authority-form) is the client's
        mistake or an attack: 400, counted as a refusal, never a version's error."""
        if raw_path == b"*" and ex.method == "OPTIONS" and not ex.query:
            await ex.respond(200, [(b"allow", ALLOW_ALL), (b"content-length", b"0")], b"", False)
            return
        await self._reject(ex, 400, "bad_target", "the request target must be a path like /items?id=1")

    # --- route: one step for HTTP and WebSocket upgrades -------------------------------------------

    def _route(self, ex: ClientExchange, norm: str, websocket: bool) -> Routed | Coroutine[Any, Any, None]:
        """Everything decided before a byte goes upstream, without waiting on anything: the
        deprecation, the group, the version, the headers to send. The same step for HTTP requests
        and WebSocket upgrades. A refusal comes back as the coroutine that answers it."""
        started = time.perf_counter()
        snapshot = self._store.current
        method: str = ex.method

        # rules also match the path as servlet backends route it (``/old;v=1/x`` is ``/old/x``)
        matched = strip_params(norm) if ";" in norm else norm
        deprecation = self._deprecations.check(method, norm, snapshot)
        if deprecation is None and matched is not norm:
            deprecation = self._deprecations.check(method, matched, snapshot)
        if deprecation is not None and deprecation.gone_body is not None:
            return self._gone(ex, deprecation, method, started)

        xc = Routed(self._routes.group_for(matched), method, started, websocket)
        xc.norm = norm
        self._scan(xc, ex.headers)
        if xc.refused is not None:
            if xc.refused == "bad_force_header":
                return self._reject(
                    ex, 400, xc.refused, "X-Strangler-Version was sent twice, with different values"
                )
            return self._reject(
                ex, 400, xc.refused, "the user key header was sent twice, with different values"
            )
        query = ex.query
        if not websocket:
            if xc.content_length == 0:
                xc.has_body = False
            if xc.override is None and b"_method=" in query:
                xc.override = query_value(query, b"_method")

        # split decision (shared with WebSocket upgrades)
        try:
            version, bucket, set_cookies = self._decider.choose(
                snapshot, xc.group, xc.forced, xc.user_key, xc.cookie, query, ex.client_host, xc.picked,
                websocket, tls=ex.scheme == "https",
            )  # fmt: skip
        except BadForce:
            return self._reject(ex, 400, "bad_force_header", "X-Strangler-Version must be v1 or v2")
        xc.version = version
        xc.bucket = bucket
        if version == "v1" and not websocket:
            override = xc.override
            effective = method if override is None else override.decode("latin-1").strip().upper()
            xc.plan = self._mirror.plan(xc.group, effective, xc.content_length, snapshot)

        xc.request_id = self._add_forwarded(xc.headers, ex, xc.xff, xc.host, xc.request_id or None)
        xc.raw_target = ex.raw_path + b"?" + query if query else ex.raw_path
        if not (xc.has_body or xc.content_length == 0):
            xc.content_length = None
        xc.add_host = xc.host is None or not self._preserve_host
        if deprecation is not None:
            xc.extra_headers.extend(deprecation.headers)
        if set_cookies is not None:
            xc.extra_headers.extend((b"set-cookie", value) for value in set_cookies)
        return xc

    def _scan(self, xc: Routed, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """One pass over the client's headers: what the decision needs (named fields of ``xc``),
        and what goes upstream (``xc.headers``: hop-by-hop, Connection-named, the proxy's own,
        underscore names and, for an upgrade, the per-hop Sec-WebSocket-* headers dropped)."""
        websocket = xc.websocket
        picked: dict[bytes, bytes] | None = {} if self._wanted else None
        connection_named: set[bytes] | None = None
        out = xc.headers
        for name, value in headers:
            if b"_" in name and not self._underscore_allowed(name):
                continue  # WSGI/CGI read X_Foo as X-Foo: nginx drops these too
            if name == self._user_header:
                if xc.user_key is not None and value != xc.user_key:
                    xc.refused = "bad_user_key_header"
                xc.user_key = value
            elif name == b"cookie":
                cookie = xc.cookie
                xc.cookie = value if cookie is None else cookie + b"; " + value
            elif name == b"host":
                xc.host = value
                if not self._preserve_host:
                    continue
            elif name == self._force:
                if xc.forced is not None and value != xc.forced:
                    xc.refused = "bad_force_header"
                xc.forced = value
                continue
            elif name == b"content-length":
                xc.has_body = True
                xc.content_length = int(value) if value.isdigit() else None
                continue  # sent upstream as the canonical number by the edge client
            elif name == b"transfer-encoding":
                xc.has_body = True
                continue
            elif name.startswith(MARKER_PREFIX):
                continue
            elif websocket and name.startswith(b"sec-websocket-"):
                # key/version/accept are per hop; extensions are never negotiated
                if name == b"sec-websocket-protocol":
                    offered = xc.offered
                    if offered is None:
                        offered = xc.offered = []
                    offered.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
                continue
            elif name in METHOD_OVERRIDES:
                xc.override = value
            elif name == b"connection":
                if connection_named is None:
                    connection_named = set()
                connection_named.update(part.strip().lower() for part in value.split(b","))
                continue
            elif picked is not None and name in self._wanted:
                picked[name] = value  # read by the decision (match rules, JWT), still forwarded
            if name in PROXY_SET:
                if name == b"x-forwarded-for":
                    xff = xc.xff
                    xc.xff = value if xff is None else xff + b", " + value
                elif name == b"x-request-id" and 0 < len(value) <= 200:
                    xc.request_id = value
                continue
            if name in HOP_BY_HOP:
                continue
            out.append((name, value))
        if connection_named:
            drop = connection_named - PROTECTED
            xc.headers = [(name, value) for name, value in out if name not in drop]
        xc.picked = picked

    def _underscore_allowed(self, name: bytes) -> bool:
        """With ``allow_underscore_headers`` an underscore name is forwarded, unless it is the
        look-alike of a framing, hop-by-hop, proxy-set or decision header."""
        if not self._allow_underscores:
            return False
        dashed = name.replace(b"_", b"-")
        return dashed not in self._never_underscored and not dashed.startswith(MARKER_PREFIX)

    def _add_forwarded(
        self,
        out: list[tuple[bytes, bytes]],
        ex: ClientExchange,
        xff: bytes | None,
        host: bytes | None,
        request_id: bytes | None,
    ) -> bytes:
        """The headers the proxy sets itself (the client's X-Forwarded-For is appended to, never
        trusted); returns the request id used (the client's, when sane, else a new one)."""
        client_ip = ex.client_host.encode() if ex.client_host else b"unknown"
        out.append((b"x-forwarded-for", client_ip if xff is None else xff + b", " + client_ip))
        out.append((b"x-forwarded-proto", b"https" if ex.scheme == "https" else b"http"))
        if host is not None:
            out.append((b"x-forwarded-host", host))
        if request_id is None:
            request_id = next(self._request_ids)
        out.append((b"x-request-id", request_id))
        return request_id

    async def _gone(
        self, ex: ClientExchange, deprecation: DeprecationAction, method: str, started: float
    ) -> None:
        await self._answer(ex, 410, deprecation.gone_body or b"", deprecation.headers)
        self._metrics.request_done("deprecated", "proxy", method, 410, time.perf_counter() - started)

    # --- forward and the one fallback rule -----------------------------------------------------------

    async def _forward(self, ex: ClientExchange, xc: Routed, error: UpstreamError | None = None) -> None:
        """The routed request, with a task: its body, a new upstream connection, the fallback.
        ``error``: how the fast path's attempt failed (nothing was answered)."""
        if xc.has_body and xc.body is None:
            plan = xc.plan
            xc.body = _Body(ex.read, plan.max_body if plan is not None else 0, self._body_policy)
        while True:
            if error is not None:
                if not self._fall_back(xc, error):
                    await self._failed(ex, xc, error)
                    return
                error = None
            if self._upstreams[xc.version].protocol == "h2":
                await self._duplex.forward(ex, xc)  # streamed both ways; it finishes the request
                return
            try:
                response = await self._send_upstream(xc)
                break
            except UpstreamError as exc:
                error = exc
            except ClientGone:
                self.finish(xc, CLIENT_GONE_REQUEST)
                return
            except BodyTooSlow:
                self.finish(xc, CLIENT_FAULT)
                await self._reject(ex, 408, "body_too_slow", "request body arrived below the minimum rate")
                return
        await self._relay(ex, response, xc)

    def _fall_back(self, xc: Routed, exc: UpstreamError) -> bool:
        """The one fallback rule, for HTTP and WebSocket alike: v2 unreachable with nothing of the
        request sent upstream -> v1 serves it (when allowed). v2's failed attempt is counted and
        recorded with its real status (the canary judges v2 by it); the v1 answer is recorded by
        ``finish`` as any other."""
        if exc.version != "v2" or not exc.nothing_sent or not self._fallback_to_v1:
            return False
        body = xc.body
        if body is not None and body.started:
            return False
        self._metrics.fallback(xc.group)
        self._count_failure(xc, exc)
        if exc.blames_version:
            self._record(xc.group, "v2", xc.method, _failure_status(exc), time.perf_counter() - xc.started)
        xc.version = "v1"
        xc.plan = None  # a request v2 was meant to serve is never mirrored to v2
        return True

    def _count_failure(self, xc: Routed, exc: UpstreamError) -> None:
        self._metrics.upstream_error(exc.version, exc.kind)
        if xc.websocket:
            self._metrics.ws_handshake_failed(exc.version, exc.kind)

    async def _failed(self, ex: ClientExchange, xc: Routed, exc: UpstreamError) -> None:
        """Nothing relayed yet and no fallback: the client gets a clean 502/503/504 with a generic
        reason (the edge client's details name no address anyway). A full pool is the proxy's own
        limit, not the version's error."""
        self._count_failure(xc, exc)
        self.finish(xc, FAILED if exc.blames_version else PROXY_LIMIT, exc.status)
        label = FAILURE_LABELS.get(exc.status, "upstream unavailable")
        body = orjson.dumps({"error": label, "version": exc.version, "detail": exc.detail})
        with contextlib.suppress(ClientGone, OSError):  # recorded already: the version failed it either way
            await self._answer(ex, exc.status, body, [(VERSION_HEADER, VERSION_VALUE[exc.version])])

    async def _send_upstream(self, xc: Routed) -> UpstreamResponse:
        """Bodies up to ``body_buffer_bytes`` are read whole before a pool slot is taken, so a slow
        uploader never holds a backend connection; only larger bodies are streamed."""
        version, method, body = xc.version, xc.method, xc.body
        upstream = self._upstreams[version]
        data: AsyncIterator[bytes] | bytes | None = None
        if body is not None:
            data = await body.prepare()
        try:
            return await upstream.send(
                METHOD_BYTES.get(method) or method.encode("latin-1"), xc.raw_target, xc.headers, data,
                content_length=xc.content_length if not isinstance(data, bytes) else None,
                add_host=xc.add_host, fresh=xc.fresh,
            )  # fmt: skip
        except (ClientGone, BodyTooSlow):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else from the client is an upstream fault
            if body is not None and body.gone:
                # the client left mid-upload and the aborted upload surfaced as an upstream error:
                # count it as the client's doing, not the backend's (canary error rates read this)
                raise ClientGone() from exc
            raise translate(version, exc) from exc

    # --- relay: the answer back (task path; the fast path's is _answer_now) ---------------------------

    async def _relay(self, ex: ClientExchange, response: UpstreamResponse, xc: Routed) -> None:
        """Stream the answer back, then ``finish``."""
        plan = xc.plan
        status: int = response.status
        headers = self._answer_headers(response, xc)
        captured: bytearray | None = bytearray() if plan is not None else None
        max_capture = plan.max_compare if plan is not None else 0
        try:
            if _buffered(xc, response):
                try:
                    payload = await response.read()
                except UpstreamError as exc:  # nothing relayed yet: a clean 502/504
                    await self._failed(ex, xc, exc)
                    return
                await ex.respond(status, headers, payload, False)
                if captured is not None:
                    captured += payload
            else:
                await self._stream(ex, response, status, headers, xc.body, captured, max_capture)
        except UpstreamError as exc:
            # the answer had started: the client connection is closed, never a truncated body
            # passed off as complete
            self._metrics.upstream_error(xc.version, "reset" if exc.kind == "protocol" else exc.kind)
            self.finish(xc, CUT, 502)
            return
        except (ClientGone, OSError):
            self.finish(xc, CLIENT_GONE_RESPONSE)
            return
        finally:
            response.close()  # a no-op after a complete answer; else the connection is dropped
        primary = None
        if captured is not None:
            kept = bytes(captured) if len(captured) <= max_capture else None
            primary = PrimaryResult(status, headers, kept, time.perf_counter() - xc.started)
        self.finish(xc, ANSWERED, status, primary)

    async def _stream(
        self,
        ex: ClientExchange,
        response: UpstreamResponse,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: _Body | None,
        captured: bytearray | None,
        max_capture: int,
    ) -> None:
        """Large or unsized answers: chunk by chunk, with a watcher that stops on client disconnect."""
        await ex.respond(status, headers, b"", True)
        watcher: asyncio.Task[None] | None = None
        gone = asyncio.Event()
        if body is None or body.done:
            watcher = asyncio.create_task(_watch_disconnect(ex, response, gone))
        try:
            async for chunk in response.chunks():
                if gone.is_set():
                    raise ClientGone()
                if captured is not None and len(captured) <= max_capture:
                    captured += chunk
                await ex.write(chunk, True)
            if gone.is_set():
                raise ClientGone()
            await ex.write(b"", False)
        except UpstreamError:
            if gone.is_set():
                raise ClientGone() from None
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def _answer_now(self, ex: NativeExchange, response: UpstreamResponse, xc: Routed) -> None:
        """The fast path's relay: a small answer, buffered whole by the upstream connection, is
        written to the client in one write (no task, no coroutine), then ``finish``."""
        try:
            payload = response.buffered()
        except UpstreamError as exc:  # nothing relayed yet: a clean 502/504
            ex.spawn(self._failed(ex, xc, exc))
            return
        if ex.gone:
            self.finish(xc, CLIENT_GONE_RESPONSE)
            return
        status = response.status
        headers = self._answer_headers(response, xc)
        ex.respond_now(status, headers, payload)
        primary = None
        plan = xc.plan
        if plan is not None:
            kept = payload if len(payload) <= plan.max_compare else None
            primary = PrimaryResult(status, headers, kept, time.perf_counter() - xc.started)
        self.finish(xc, ANSWERED, status, primary)

    @staticmethod
    def _answer_headers(response: UpstreamResponse, xc: Routed) -> list[tuple[bytes, bytes]]:
        # the edge client dropped hop-by-hop headers and the backend's X-Api-Version (RESPONSE_STRIP)
        return [*response.headers, (VERSION_HEADER, VERSION_VALUE[xc.version]), *xc.extra_headers]

    # --- finish: recorded once, whatever the path and the outcome ------------------------------------

    def finish(self, xc: Routed, outcome: int, status: int = 0, primary: PrimaryResult | None = None) -> None:
        """The end of every routed request, fast or task path: metrics, the canary's recorders and
        the mirror, exactly once. A second call is a bug: it raises under tests (strict states)
        and is a no-op in production."""
        if xc.finished:
            if self._strict:
                raise LifecycleError(f"request finished twice ({xc.method} {xc.norm}, outcome {outcome})")
            return
        xc.finished = True
        if outcome <= CUT:  # ANSWERED, FAILED, CUT: an answer the version is responsible for
            self._record(xc.group, xc.version, xc.method, status, time.perf_counter() - xc.started)
        elif outcome == PROXY_LIMIT:
            self._metrics.request_done(xc.group, "proxy", xc.method, status, time.perf_counter() - xc.started)
        elif outcome == CLIENT_GONE_REQUEST:
            self._metrics.client_disconnected(xc.version, "request")
        elif outcome == CLIENT_GONE_RESPONSE:
            self._metrics.client_disconnected(xc.version, "response")
        # CLIENT_FAULT: the refusal is counted by its reason, never against the version
        plan = xc.plan
        if plan is None:
            return
        body = xc.body
        if outcome != ANSWERED or primary is None:
            self._mirror.abandon(plan, "primary_failed")
        elif body is not None and body.too_large:
            self._mirror.abandon(plan, "size")
        else:
            mirrored = MirrorRequest(
                group=xc.group,
                method=xc.method,
                path=xc.norm,
                raw_target=xc.raw_target,
                headers=xc.headers,
                body=body.captured if body is not None else b"",
                request_id=xc.request_id.decode("latin-1"),
            )
            self._mirror.submit(plan, mirrored, primary)

    def _record(self, group: str, version: str, method: str, status: int, seconds: float) -> None:
        """An answer a version is responsible for, relayed or proxy-generated (502/504): metrics
        and the recorders (canary windows judge v2 by these)."""
        self._metrics.request_done(group, version, method, status, seconds)
        for recorder in self._recorders:
            recorder.record(group, version, status, seconds)

    # --- WebSocket upgrades: the same route, fallback and finish ---------------------------------------

    async def _websocket(self, ex: ClientExchange, ws: ClientWebSocket, xc: Routed) -> None:
        """An upgrade: routed as HTTP, the upstream WebSocket opened first (so a refusal is a real
        HTTP status, and v2 unreachable falls back to v1 by the same rule), then the client accepted
        and frames relayed until one side closes. Never mirrored; the 101 (or the refusal) is the
        answer ``finish`` records."""
        upstream: FrameSocket | None = None
        chosen: str | None = None
        error: UpstreamError | None = None
        while upstream is None:
            if error is not None:
                if not self._fall_back(xc, error):
                    await self._ws_refused(ws, xc, error)
                    return
                error = None
            try:
                upstream, chosen = await self._open_ws(xc)
            except UpstreamError as exc:
                error = exc
        version = xc.version
        try:
            await ws.accept(chosen, [(VERSION_HEADER, VERSION_VALUE[version]), *xc.extra_headers],
                            self._ws.max_message_bytes)  # fmt: skip
        except ClientGone:
            upstream.abort()
            self.finish(xc, CLIENT_GONE_REQUEST)
            return
        self.finish(xc, ANSWERED, 101)
        self._metrics.ws_opened(version)
        session = Session(xc.group, version, xc.bucket)
        key = self.ws_registry.add(session)
        try:
            await relay(ws, upstream, session, self._ws_policy, self._metrics)
        finally:
            self.ws_registry.remove(key)

    async def _open_ws(self, xc: Routed) -> tuple[FrameSocket, str | None]:
        version = xc.version
        pool = self._upstreams[version].pool
        try:
            return await open_upstream(
                version, pool.origin, pool.ssl_context, xc.raw_target, xc.headers, xc.offered or [],
                max_size=self._ws.max_message_bytes, connect_timeout=self._settings.connect_timeout_seconds,
                handshake_timeout=self._ws.handshake_timeout_seconds, add_host=xc.add_host,
            )  # fmt: skip
        except UpstreamError:
            raise
        except ValueError:  # not origin-form: request_head refused to build it
            raise WsHandshakeRefused(version, "request target must be origin-form", None) from None
        except Exception as exc:  # noqa: BLE001 - anything else is an upstream fault
            raise translate(version, exc) from exc

    async def _ws_refused(self, ws: ClientWebSocket, xc: Routed, exc: UpstreamError) -> None:
        """The client gets a real HTTP status: the upstream's own refusal, or 502/504."""
        self._count_failure(xc, exc)
        self.finish(xc, FAILED if exc.blames_version else PROXY_LIMIT, _failure_status(exc))
        version_header = (VERSION_HEADER, VERSION_VALUE[exc.version])
        if isinstance(exc, WsHandshakeRefused) and exc.answer is not None and exc.answer.status >= 300:
            answer = exc.answer
            headers = [(n, v) for n, v in _response_headers(answer.headers) if n != b"content-length"]
            headers.append((b"content-length", b"%d" % len(answer.body)))
            headers.append(version_header)
            await ws.reject(answer.status, headers, answer.body)
            return
        label = FAILURE_LABELS.get(exc.status, "upstream unavailable")
        body = orjson.dumps({"error": label, "version": exc.version, "detail": exc.detail})
        await ws.reject(
            exc.status, [*JSON_HEADERS, (b"content-length", b"%d" % len(body)), version_header], body
        )

    # --- answers the proxy gives itself -------------------------------------------------------------

    async def _reject(self, ex: ClientExchange, status: int, reason: str, detail: str) -> None:
        """The proxy refuses the request itself; counted by reason."""
        self._metrics.rejected_request(reason)
        body = orjson.dumps({"error": reason.replace("_", " "), "detail": detail})
        # close: the request body (if any) is unread, and a refused client gets no second try
        await self._answer(ex, status, body, [(b"connection", b"close")])

    @staticmethod
    async def _answer(ex: ClientExchange, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
        await ex.respond(status, [*JSON_HEADERS, (b"content-length", b"%d" % len(body)), *extra], body, False)


class Routed:
    """One request from ``_route`` to ``finish``: what the header scan found (named fields), what
    was decided, what goes upstream, and whether it has been finished (once)."""

    __slots__ = ("group", "method", "version", "started", "websocket", "body", "plan", "extra_headers",
                 "content_length", "add_host", "has_body", "norm", "raw_target", "headers", "request_id",
                 "forced", "user_key", "cookie", "host", "xff", "override", "picked", "offered", "refused",
                 "bucket", "finished", "fresh")  # fmt: skip

    # what the header scan (``ProxyApp._scan``) finds
    forced: bytes | None  # the force header's value
    user_key: bytes | None  # the user-key header's value
    cookie: bytes | None  # all Cookie headers, joined
    host: bytes | None
    xff: bytes | None  # the client's X-Forwarded-For (appended to)
    override: bytes | None  # X-HTTP-Method-Override (or ?_method=)
    picked: dict[bytes, bytes] | None  # other headers the decision reads (match rules, JWT)
    offered: list[str] | None  # Sec-WebSocket-Protocol values offered
    refused: str | None  # why the request is refused (ambiguous decision headers), or None

    def __init__(self, group: str, method: str, started: float, websocket: bool) -> None:
        self.group = group
        self.method = method
        self.version = "v1"  # decided by the split; becomes "v1" when v2 could not be reached
        self.started = started
        self.websocket = websocket  # an upgrade (relayed by _websocket)
        self.body: _Body | None = None
        self.plan: Any = None  # the mirror's plan (v1 only)
        self.extra_headers: list[tuple[bytes, bytes]] = []  # deprecation headers, affinity cookie
        self.content_length: int | None = None  # as the client declared it (sent canonical)
        self.add_host = True  # False when the client's Host is passed on (preserve_host)
        self.has_body = False
        self.norm = ""  # the normalised path (routing, the mirror's report)
        self.raw_target = b""  # what goes upstream after the configured base path
        self.headers: list[tuple[bytes, bytes]] = []  # what goes upstream
        self.request_id = b""  # the client's (when sane), then the one sent
        # what the header scan found (declared above; one chained store, once per request)
        self.forced = self.user_key = self.cookie = self.host = self.xff = self.override = None
        self.picked = self.offered = self.refused = None
        self.bucket = 0  # the split bucket (WebSocket sessions are re-judged by it)
        self.finished = False
        self.fresh = False  # the one retry after the keep-alive race: on a new upstream connection


def _failure_status(exc: UpstreamError) -> int:
    """The status a failed attempt is recorded with: the backend's refusal of an upgrade, else 502/504."""
    if isinstance(exc, WsHandshakeRefused) and exc.answer is not None:
        return exc.answer.status
    return exc.status


class BodyPolicy:
    """The body limits, resolved once: buffer size and the minimum upload rate."""

    __slots__ = ("buffer", "min_rate", "grace")

    def __init__(self, buffer: int, min_rate: int, grace: float) -> None:
        self.buffer = buffer
        self.min_rate = min_rate
        self.grace = grace


class _Body:
    """The client's request body, read through the exchange's ``read`` (``ClientExchange.read``:
    our HTTP server's connection, or ASGI ``receive`` under ``proxy.app:app``): buffered whole
    when small, else streamed up at no less than the minimum rate; optionally captured for the
    mirror."""

    __slots__ = ("_read", "_capture_limit", "_policy", "captured", "too_large", "started", "done", "gone",
                 "_first")  # fmt: skip

    def __init__(self, read: Callable[[], Awaitable[tuple[bytes, bool]]], capture_limit: int,
                 policy: BodyPolicy) -> None:  # fmt: skip
        self._read = read
        self._capture_limit = capture_limit
        self._policy = policy
        self.captured = b""
        self.too_large = False
        self.started = False
        self.done = False
        self.gone = False  # the client disconnected before the body was complete
        self._first: bytes | None = None

    async def prepare(self) -> AsyncIterator[bytes] | bytes:
        """Read up to the buffer size; a body that fits is sent as bytes (before a pool slot is
        taken, so a slow client holds no backend connection), a larger one is streamed."""
        if self._first is None and not self.done:
            parts: list[bytes] = []
            size = 0
            while True:
                chunk, more = await self._next()
                if chunk:
                    self._keep(chunk)
                    parts.append(chunk)
                    size += len(chunk)
                if not more:
                    self.done = True
                    break
                if size > self._policy.buffer:
                    break
            self._first = b"".join(parts)
        if self.done:
            return self._first or b""
        return self._rest()

    async def take(self) -> tuple[bytes, bool]:
        """The next chunk as it arrives, kept for the mirror: the HTTP/2 upstream path streams
        the body up at once (a gRPC stream waits for answers between its messages), with no
        buffering and no minimum rate (a multiplexed stream holds no backend connection)."""
        self.started = True
        first = self._first
        if first is not None:  # read (and kept) by ``prepare`` for an HTTP/1.1 attempt that fell back
            self._first = None
            return first, not self.done
        if self.done:
            return b"", False
        chunk, more = await self._next()
        if chunk:
            self._keep(chunk)
        if not more:
            self.done = True
        return chunk, more

    def _rest(self) -> AsyncIterator[bytes]:
        return _BodyRest(self)

    async def _next(self) -> tuple[bytes, bool]:
        try:
            return await self._read()
        except ClientGone:
            self.gone = True
            raise

    def _keep(self, chunk: bytes) -> None:
        if self._capture_limit and not self.too_large:
            if len(self.captured) + len(chunk) > self._capture_limit:
                self.too_large = True
                self.captured = b""
            else:
                self.captured += chunk


class _BodyRest:
    """The rest of a large request body, streamed up at no less than the minimum rate (an async
    iterator class, not an async generator, so the module compiles with mypyc).

    The body is ``started`` only once a byte of it is taken to go upstream (the edge client pulls
    the first chunk after its connection is up and the head written): before that, a v2 that
    cannot be reached still falls back to v1 with the whole body (``prepare`` again). The rate is
    the client's own: bytes read after the buffer over the time spent waiting for them (not the
    buffered first part, not the time our writes to the backend waited), judged after the grace."""

    __slots__ = ("_body", "_loop", "_waited", "_sent", "_first")

    def __init__(self, body: _Body) -> None:
        self._body = body
        self._loop = asyncio.get_running_loop()
        self._waited = 0.0
        self._first = body._first
        self._sent = 0

    def __aiter__(self) -> _BodyRest:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        body.started = True
        first = self._first
        if first:
            self._first = None
            return first
        loop = self._loop
        policy = body._policy
        while not body.done:
            began = loop.time()
            chunk, more = await body._next()
            self._waited += loop.time() - began
            if not more:
                body.done = True
            if chunk:
                body._keep(chunk)
                self._sent += len(chunk)
            if more and policy.min_rate:
                waited = self._waited
                if waited > policy.grace and self._sent < policy.min_rate * waited:
                    raise BodyTooSlow()
            if chunk:
                return chunk
        raise StopAsyncIteration


class _FastRelay:
    """The ``ResponseSink`` of a request taken by ``ProxyApp.start``: small answers are written
    from the upstream connection's callbacks; a large or unsized one, or a failure, continues in
    a task through the same steps as the task path (``_relay``, ``_forward``: the fallback rule)."""

    __slots__ = ("_app", "_ex", "_xc")

    def __init__(self, app: ProxyApp, ex: NativeExchange, xc: Routed) -> None:
        self._app = app
        self._ex = ex
        self._xc = xc

    def head(self, response: UpstreamResponse) -> bool:
        if _buffered(self._xc, response):
            return True
        self._ex.spawn(self._app._relay(self._ex, response, self._xc))
        return False

    def done(self, response: UpstreamResponse) -> None:
        try:
            self._app._answer_now(self._ex, response, self._xc)
        except Exception as exc:  # noqa: BLE001 - a bug costs this request, never the upstream connection
            self._ex.spawn(_raise(exc))

    def failed(self, error: UpstreamError, retryable: bool) -> None:
        if retryable:  # the keep-alive race, safe to resend (client.retry_allowed): once, on a new connection
            self._xc.fresh = True
            self._ex.spawn(self._app._forward(self._ex, self._xc))
        else:
            self._ex.spawn(self._app._forward(self._ex, self._xc, error))


async def _raise(exc: Exception) -> None:
    """Hand an error to the server's task wrapper, which logs it and answers 500."""
    raise exc


def _buffered(xc: Routed, response: UpstreamResponse) -> bool:
    """Answers read whole before relaying (one write to the client): no body, or a small one."""
    length = response.content_length
    if xc.method == "HEAD" or response.status in (204, 304):
        return True
    return length is not None and length <= SMALL_BODY


def _request_ids() -> Iterator[bytes]:
    """Unique 32-hex-digit ids without a syscall per request: a random process prefix + a counter
    (a C-level iterator: no Python frame per id)."""
    return map((os.urandom(8).hex() + "%016x").encode().__mod__, itertools.count())


async def _watch_disconnect(ex: ClientExchange, response: UpstreamResponse, gone: asyncio.Event) -> None:
    """Only used once the request body is fully read, so it is the sole reader of the client."""
    with contextlib.suppress(asyncio.CancelledError):
        await ex.wait_gone()
        gone.set()
        response.close()


def _response_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and any the backend named in Connection); keep repeats in order."""
    return end_to_end([(name.lower(), value) for name, value in raw], RESPONSE_STRIP)

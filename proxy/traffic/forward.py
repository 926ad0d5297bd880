"""The forwarding core: one request from client to backend and back. Per-request state lives in
locals, never on ``self``. It talks to the client through ``ClientExchange`` (our native server or
the ASGI adapter), and to the backends through the edge client.

request -> admin prefix? -> deprecation -> route group -> split -> forward -> (mirror) -> record
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
    Deprecations,
    Mirror,
    MirrorRequest,
    NoDeprecations,
    NoMirror,
    PrimaryResult,
    Recorder,
)
from proxy.traffic.paths import is_canonical, normalise
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
ALLOW_ALL: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
JSON_HEADERS: Final = [(b"content-type", b"application/json")]
VERSION_VALUE: Final = {"v1": b"v1", "v2": b"v2"}


class BodyTooSlow(Exception):
    """A streamed request body arrived below the minimum rate: the client, not the backend, is at fault."""


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
        self._strip = HOP_BY_HOP | ({self._force} if self._force else set())
        self._fallback_to_v1 = settings.fallback_to_v1
        self._preserve_host = settings.preserve_host
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI adapter: ``proxy.app:app`` under any ASGI server runs the same core."""
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self.handle(AsgiWebSocket(scope, receive, send))
            return
        await self.handle(AsgiExchange(scope, receive, send))

    async def handle(self, ex: ClientExchange) -> None:
        norm = self._classify(ex)
        if not isinstance(norm, str):
            await norm
            return
        ws = ex.websocket()
        if ws is not None:
            await self._websocket(ex, ws, norm, ex.raw_path)
            return
        routed = self._route(ex, norm, ex.raw_path)
        if isinstance(routed, _Exchange):
            await self._forward(ex, routed)
        else:
            await routed

    def start(self, ex: NativeExchange) -> Coroutine[Any, Any, None] | None:
        """Our server's entry for a request without a body: taken now, with no task, when a warm
        upstream connection is free (the common case under load); the answer is relayed from the
        upstream connection's callbacks (``_FastRelay``). Anything else returns the coroutine that
        handles it, which the server runs as a task."""
        norm = self._classify(ex)
        if not isinstance(norm, str):
            return norm
        routed = self._route(ex, norm, ex.raw_path)
        if not isinstance(routed, _Exchange):
            return routed
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

    async def _odd_target(self, ex: ClientExchange, raw_path: bytes) -> None:
        """Only origin-form targets are forwarded. ``OPTIONS *`` asks about the server itself, so
        the proxy answers it; anything else (``*@host:port/x``, authority-form) is the client's
        mistake or an attack: 400, counted as a refusal, never a version's error."""
        if raw_path == b"*" and ex.method == "OPTIONS" and not ex.query:
            await ex.respond(200, [(b"allow", ALLOW_ALL), (b"content-length", b"0")], b"", False)
            return
        await self._reject(ex, 400, "bad_target", "the request target must be a path like /items?id=1")

    def _route(self, ex: ClientExchange, norm: str, raw_path: bytes) -> _Exchange | Coroutine[Any, Any, None]:
        """Everything decided before a byte goes upstream, without waiting on anything: the
        deprecation, the group, the version, the headers to send. A refusal comes back as the
        coroutine that answers it."""
        started = time.perf_counter()
        snapshot = self._store.current
        method: str = ex.method

        deprecation = self._deprecations.check(method, norm, snapshot)
        if deprecation is not None and deprecation.gone_body is not None:
            return self._gone(ex, deprecation, method, started)
        group = self._routes.group_for(norm)

        (out, forced, user_key, cookie, host, xff, request_id, content_length, override, has_body, picked,
         _) = self._scan_headers(ex.headers, websocket=False)  # fmt: skip
        if content_length == 0:
            has_body = False
        query = ex.query
        if override is None and b"_method=" in query:
            override = query_value(query, b"_method")

        # split decision (shared with WebSocket upgrades)
        try:
            version, _, set_cookies = self._decider.choose(
                snapshot, group, forced, user_key, cookie, query, ex.client_host, picked
            )
        except BadForce:
            return self._reject(ex, 400, "bad_force_header", "X-Strangler-Version must be v1 or v2")

        plan = None
        if version == "v1":
            effective = method if override is None else override.decode("latin-1").strip().upper()
            plan = self._mirror.plan(group, effective, content_length, snapshot)

        xc = _Exchange(group, method, version, started, None, plan)
        xc.norm = norm
        xc.request_id = self._add_forwarded(out, ex, xff, host, request_id)
        xc.headers = out
        xc.raw_target = raw_path + b"?" + query if query else raw_path
        xc.has_body = has_body
        xc.content_length = content_length if has_body or content_length == 0 else None
        xc.add_host = host is None or not self._preserve_host
        if deprecation is not None:
            xc.extra_headers.extend(deprecation.headers)
        if set_cookies is not None:
            xc.extra_headers.extend((b"set-cookie", value) for value in set_cookies)
        return xc

    def _scan_headers(self, headers: Sequence[tuple[bytes, bytes]], websocket: bool) -> tuple[Any, ...]:
        """One pass over the client's headers: what the decision needs, and what goes upstream
        (hop-by-hop, Connection-named, the proxy's own and, for an upgrade, the per-hop
        Sec-WebSocket-* headers dropped). Shared by HTTP and WebSocket upgrades."""
        forced: bytes | None = None
        user_key: bytes | None = None
        cookie: bytes | None = None
        host: bytes | None = None
        xff: bytes | None = None
        request_id: bytes | None = None
        content_length: int | None = None
        override: bytes | None = None
        has_body = False
        offered: list[str] = []
        connection_named: set[bytes] = set()
        picked: dict[bytes, bytes] | None = {} if self._wanted else None
        out: list[tuple[bytes, bytes]] = []
        for name, value in headers:
            if name == self._user_header:
                user_key = value
            elif name == b"cookie":
                cookie = value if cookie is None else cookie + b"; " + value
            elif name == b"host":
                host = value
                if not self._preserve_host:
                    continue
            elif name == self._force:
                forced = value
                continue
            elif name == b"content-length":
                has_body = True
                content_length = int(value) if value.isdigit() else None
                continue  # sent upstream as the canonical number by the edge client
            elif name == b"transfer-encoding":
                has_body = True
                continue
            elif name.startswith(MARKER_PREFIX):
                continue
            elif websocket and name.startswith(b"sec-websocket-"):
                # key/version/accept are per hop; extensions are never negotiated
                if name == b"sec-websocket-protocol":
                    offered.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
                continue
            elif name in METHOD_OVERRIDES:
                override = value
            elif name == b"connection":
                connection_named.update(part.strip().lower() for part in value.split(b","))
                continue
            elif picked is not None and name in self._wanted:
                picked[name] = value  # read by the decision (match rules, JWT), still forwarded
            if name in PROXY_SET:
                if name == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif name == b"x-request-id" and 0 < len(value) <= 200:
                    request_id = value
                continue
            if name in HOP_BY_HOP:
                continue
            out.append((name, value))
        if connection_named:
            drop = connection_named - PROTECTED
            out = [(name, value) for name, value in out if name not in drop]
        return (out, forced, user_key, cookie, host, xff, request_id, content_length, override, has_body,
                picked, offered)  # fmt: skip

    async def _gone(self, ex: ClientExchange, deprecation: Any, method: str, started: float) -> None:
        await self._answer(ex, 410, deprecation.gone_body, deprecation.headers)
        self._metrics.request_done("deprecated", "proxy", method, 410, time.perf_counter() - started)

    async def _forward(self, ex: ClientExchange, xc: _Exchange) -> None:
        """The routed request, with a task: its body, a new upstream connection, v1 fallback."""
        plan = xc.plan
        capture = plan.max_body if plan is not None else 0
        body = xc.body = _Body(ex.read, capture, self._body_policy) if xc.has_body else None
        try:
            response = await self._send_upstream(xc.version, xc.method, xc.raw_target, xc.headers, body, xc)
        except UpstreamError as exc:
            recovered = await self._recover(ex, exc, xc)
            if recovered is None:
                return
            response = recovered
        except ClientGone:
            self._metrics.client_disconnected(xc.version, "request")
            return
        except BodyTooSlow:
            await self._reject(ex, 408, "body_too_slow", "request body arrived below the minimum rate")
            return
        await self._relay_and_finish(ex, response, xc)

    async def _recover(
        self, ex: ClientExchange, exc: UpstreamError, xc: _Exchange
    ) -> UpstreamResponse | None:
        """v2 unreachable before anything was sent: v1 serves it (when allowed). Otherwise the
        client gets the error. None when the answer has been given here."""
        body = xc.body
        if exc.version == "v2" and exc.nothing_sent and self._fallback_to_v1 and not _started(body):
            self._metrics.fallback(xc.group)
            self._metrics.upstream_error("v2", exc.kind)
            if exc.blames_version:  # v2 failed this request: the canary must see it
                for recorder in self._recorders:
                    recorder.record(xc.group, "v2", 502, time.perf_counter() - xc.started)
            xc.version = "v1"
            xc.plan = None  # a request v2 was meant to serve is never mirrored to v2
            try:
                return await self._send_upstream("v1", xc.method, xc.raw_target, xc.headers, body, xc)
            except UpstreamError as exc2:
                await self._upstream_failed(ex, exc2, xc)
                return None
        if xc.plan is not None:
            self._mirror.abandon(xc.plan, "primary_failed")
        await self._upstream_failed(ex, exc, xc)
        return None

    async def _relay_and_finish(self, ex: ClientExchange, response: UpstreamResponse, xc: _Exchange) -> None:
        result = await self._relay(ex, response, xc)
        if result is not None:
            self._finished(xc, *result)

    def _finished(self, xc: _Exchange, status: int, primary: PrimaryResult | None) -> None:
        """An answer relayed in full: recorded, and handed to the mirror when planned."""
        self._done(xc.group, xc.version, xc.method, status, time.perf_counter() - xc.started)
        plan = xc.plan
        if plan is None or primary is None:
            return
        body = xc.body
        if body is not None and body.too_large:
            self._mirror.abandon(plan, "size")
            return
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

    def _answer_now(self, ex: NativeExchange, response: UpstreamResponse, xc: _Exchange) -> None:
        """The fast path's end: a small answer, buffered whole by the upstream connection, is
        written to the client in one write (no task, no coroutine)."""
        try:
            payload = response.buffered()
        except UpstreamError as exc:  # nothing relayed yet: a clean 502/504
            ex.spawn(self._upstream_failed(ex, exc, xc))
            return
        if ex.gone:
            self._metrics.client_disconnected(xc.version, "response")
            return
        status = response.status
        headers = self._answer_headers(response, xc)
        ex.respond_now(status, headers, payload)
        primary = None
        plan = xc.plan
        if plan is not None:
            kept = payload if len(payload) <= plan.max_compare else None
            primary = PrimaryResult(status, headers, kept, time.perf_counter() - xc.started)
        self._finished(xc, status, primary)

    async def _after_failure(self, ex: ClientExchange, exc: UpstreamError, xc: _Exchange) -> None:
        response = await self._recover(ex, exc, xc)
        if response is not None:
            await self._relay_and_finish(ex, response, xc)

    async def _websocket(self, ex: ClientExchange, ws: ClientWebSocket, norm: str, raw_path: bytes) -> None:
        """An upgrade: choose the version as for HTTP, open the upstream WebSocket first (so a
        refusal is a real HTTP status), then accept the client and relay frames until one side
        closes. Never mirrored; never in the canary's latency (a failed handshake is an answer)."""
        started = time.perf_counter()
        if not self._ws.enabled:
            await self._reject(ex, 400, "websocket_disabled", "WebSockets are not relayed here")
            return
        problem = ws.problem()
        if problem is not None:
            await self._reject(ex, 400, "bad_websocket_handshake", problem)
            return
        snapshot = self._store.current
        deprecation = self._deprecations.check("GET", norm, snapshot)
        if deprecation is not None and deprecation.gone_body is not None:
            await self._gone(ex, deprecation, "GET", started)
            return
        group = self._routes.group_for(norm)
        out, forced, user_key, cookie, host, xff, request_id, *_, picked, offered = self._scan_headers(
            ex.headers, websocket=True
        )
        try:
            version, bucket, set_cookies = self._decider.choose(
                snapshot, group, forced, user_key, cookie, ex.query, ex.client_host, picked, websocket=True
            )
        except BadForce:
            await self._reject(ex, 400, "bad_force_header", "X-Strangler-Version must be v1 or v2")
            return
        self._add_forwarded(out, ex, xff, host, request_id)
        target = raw_path + b"?" + ex.query if ex.query else raw_path
        add_host = host is None or not self._preserve_host

        try:
            upstream, chosen = await self._open_ws(version, target, out, offered, add_host)
        except UpstreamError as exc:
            if exc.version == "v2" and exc.nothing_sent and self._fallback_to_v1:
                self._metrics.fallback(group)
                self._ws_failed_count(group, exc, started)
                version = "v1"
                try:
                    upstream, chosen = await self._open_ws("v1", target, out, offered, add_host)
                except UpstreamError as exc2:
                    await self._ws_refused(ex, ws, group, exc2, started)
                    return
            else:
                await self._ws_refused(ex, ws, group, exc, started)
                return
        extra = [(VERSION_HEADER, VERSION_VALUE[version])]
        if deprecation is not None:
            extra.extend(deprecation.headers)
        if set_cookies is not None:
            extra.extend((b"set-cookie", value) for value in set_cookies)
        try:
            await ws.accept(chosen, extra, self._ws.max_message_bytes)
        except ClientGone:
            upstream.abort()
            self._metrics.client_disconnected(version, "request")
            return
        self._metrics.ws_opened(version)
        session = Session(group, version, bucket)
        key = self.ws_registry.add(session)
        try:
            await relay(ws, upstream, session, self._ws_policy, self._metrics)
        finally:
            self.ws_registry.remove(key)

    async def _open_ws(
        self, version: str, target: bytes, headers: list[tuple[bytes, bytes]], offered: list[str],
        add_host: bool,
    ) -> tuple[FrameSocket, str | None]:  # fmt: skip
        pool = self._upstreams[version].pool
        try:
            return await open_upstream(
                version, pool.origin, pool.ssl_context, target, headers, offered,
                max_size=self._ws.max_message_bytes, connect_timeout=self._settings.connect_timeout_seconds,
                handshake_timeout=self._ws.handshake_timeout_seconds, add_host=add_host,
            )  # fmt: skip
        except UpstreamError:
            raise
        except ValueError:  # not origin-form: request_head refused to build it
            raise WsHandshakeRefused(version, "request target must be origin-form", None) from None
        except Exception as exc:  # noqa: BLE001 - anything else is an upstream fault
            raise translate(version, exc) from exc

    def _ws_failed_count(self, group: str, exc: UpstreamError, started: float) -> None:
        """A failed upgrade counts as an error for its version (metrics and the canary's windows)."""
        self._metrics.upstream_error(exc.version, exc.kind)
        self._metrics.ws_handshake_failed(exc.version, exc.kind)
        status = exc.status
        if isinstance(exc, WsHandshakeRefused) and exc.answer is not None:
            status = exc.answer.status
        if exc.blames_version:
            self._done(group, exc.version, "GET", status, time.perf_counter() - started)

    async def _ws_refused(
        self, ex: ClientExchange, ws: ClientWebSocket, group: str, exc: UpstreamError, started: float
    ) -> None:
        """The client gets a real HTTP status: the upstream's own refusal, or 502/504."""
        self._ws_failed_count(group, exc, started)
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

    async def _send_upstream(
        self,
        version: str,
        method: str,
        raw_target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: _Body | None,
        xc: _Exchange,
    ) -> UpstreamResponse:
        """Bodies up to ``body_buffer_bytes`` are read whole before a pool slot is taken, so a slow
        uploader never holds a backend connection; only larger bodies are streamed."""
        upstream = self._upstreams[version]
        data: AsyncIterator[bytes] | bytes | None = None
        if body is not None:
            data = await body.prepare()
        try:
            return await upstream.send(
                METHOD_BYTES.get(method) or method.encode("latin-1"), raw_target, headers, data,
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

    async def _relay(
        self, ex: ClientExchange, response: UpstreamResponse, xc: _Exchange
    ) -> tuple[int, PrimaryResult | None] | None:
        """Stream the answer back: (status, primary for the mirror), or None if cut short."""
        version, plan, started = xc.version, xc.plan, xc.started
        status: int = response.status
        headers = self._answer_headers(response, xc)
        captured: bytearray | None = bytearray() if plan is not None else None
        max_capture = plan.max_compare if plan is not None else 0
        try:
            if _buffered(xc, response):
                try:
                    payload = await response.read()
                except UpstreamError as exc:  # nothing relayed yet: a clean 502/504
                    await self._upstream_failed(ex, exc, xc)
                    return None
                await ex.respond(status, headers, payload, False)
                if captured is not None:
                    captured += payload
            else:
                await self._stream(ex, response, status, headers, xc.body, captured, max_capture)
        except UpstreamError as exc:
            # the answer had started: the client connection is closed, never a truncated body
            # passed off as complete
            self._metrics.upstream_error(version, "reset" if exc.kind == "protocol" else exc.kind)
            self._done(xc.group, version, xc.method, 502, time.perf_counter() - started)
            return None
        except (ClientGone, OSError):
            self._metrics.client_disconnected(version, "response")
            return None
        finally:
            response.close()  # a no-op after a complete answer; else the connection is dropped
        if captured is None:
            return status, None
        primary_body = bytes(captured) if len(captured) <= max_capture else None
        return status, PrimaryResult(status, headers, primary_body, time.perf_counter() - started)

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

    @staticmethod
    def _answer_headers(response: UpstreamResponse, xc: _Exchange) -> list[tuple[bytes, bytes]]:
        # the edge client dropped hop-by-hop headers and the backend's X-Api-Version (RESPONSE_STRIP)
        return [*response.headers, (VERSION_HEADER, VERSION_VALUE[xc.version]), *xc.extra_headers]

    def _done(self, group: str, version: str, method: str, status: int, seconds: float) -> None:
        """Every answer a version is responsible for, relayed or proxy-generated (502/504), is
        recorded once: metrics and the recorders (canary windows judge v2 by these)."""
        self._metrics.request_done(group, version, method, status, seconds)
        for recorder in self._recorders:
            recorder.record(group, version, status, seconds)

    async def _upstream_failed(self, ex: ClientExchange, exc: UpstreamError, xc: _Exchange) -> None:
        """The client gets a generic reason (the edge client's details name no address anyway);
        the kind is counted. A full pool is the proxy's own limit, not the version's error."""
        self._metrics.upstream_error(exc.version, exc.kind)
        label = FAILURE_LABELS.get(exc.status, "upstream unavailable")
        body = orjson.dumps({"error": label, "version": exc.version, "detail": exc.detail})
        await self._answer(ex, exc.status, body, [(VERSION_HEADER, VERSION_VALUE[exc.version])])
        seconds = time.perf_counter() - xc.started
        if exc.blames_version:
            self._done(xc.group, exc.version, xc.method, exc.status, seconds)
        else:
            self._metrics.request_done(xc.group, "proxy", xc.method, exc.status, seconds)

    async def _reject(self, ex: ClientExchange, status: int, reason: str, detail: str) -> None:
        """The proxy refuses the request itself; counted by reason."""
        self._metrics.rejected_request(reason)
        body = orjson.dumps({"error": reason.replace("_", " "), "detail": detail})
        # close: the request body (if any) is unread, and a refused client gets no second try
        await self._answer(ex, status, body, [(b"connection", b"close")])

    @staticmethod
    async def _answer(ex: ClientExchange, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
        await ex.respond(status, [*JSON_HEADERS, (b"content-length", b"%d" % len(body)), *extra], body, False)


class _Exchange:
    """What the relay and the recording steps share about one request (instead of six arguments)."""

    __slots__ = ("group", "method", "version", "started", "body", "plan", "extra_headers", "content_length",
                 "add_host", "has_body", "norm", "raw_target", "headers", "request_id", "fresh")  # fmt: skip

    def __init__(self, group: str, method: str, version: str, started: float, body: _Body | None, plan: Any):
        self.group = group
        self.method = method
        self.version = version  # becomes "v1" when v2 could not be reached and v1 serves instead
        self.started = started
        self.body = body
        self.plan = plan
        self.extra_headers: list[tuple[bytes, bytes]] = []  # deprecation headers, affinity cookie
        self.content_length: int | None = None  # as the client declared it (sent canonical)
        self.add_host = True  # False when the client's Host is passed on (preserve_host)
        self.has_body = False
        self.norm = ""  # the normalised path (routing, the mirror's report)
        self.raw_target = b""  # what goes upstream after the configured base path
        self.headers: list[tuple[bytes, bytes]] = []  # what goes upstream
        self.request_id = b""
        self.fresh = False  # the one retry after the keep-alive race: on a new upstream connection


class BodyPolicy:
    """The body limits, resolved once: buffer size and the minimum upload rate."""

    __slots__ = ("buffer", "min_rate", "grace")

    def __init__(self, buffer: int, min_rate: int, grace: float) -> None:
        self.buffer = buffer
        self.min_rate = min_rate
        self.grace = grace


class _Body:
    """The client's request body, read from ASGI ``receive``: buffered whole when small, else
    streamed up at no less than the minimum rate; optionally captured for the mirror."""

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

    def _rest(self) -> AsyncIterator[bytes]:
        self.started = True
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
    iterator class, not an async generator, so the module compiles with mypyc)."""

    __slots__ = ("_body", "_loop", "_began", "_sent", "_first")

    def __init__(self, body: _Body) -> None:
        self._body = body
        self._loop = asyncio.get_running_loop()
        self._began = self._loop.time()
        self._first = body._first
        self._sent = 0

    def __aiter__(self) -> _BodyRest:
        return self

    async def __anext__(self) -> bytes:
        body = self._body
        first = self._first
        if first:
            self._first = None
            self._sent = len(first)
            return first
        while not body.done:
            chunk, more = await body._next()
            if not more:
                body.done = True
            if chunk:
                body._keep(chunk)
                self._sent += len(chunk)
            if more:
                policy = body._policy
                if policy.min_rate:
                    elapsed = self._loop.time() - self._began
                    if elapsed > policy.grace and self._sent < policy.min_rate * elapsed:
                        raise BodyTooSlow()
            if chunk:
                return chunk
        raise StopAsyncIteration


class _FastRelay:
    """The ``ResponseSink`` of a request taken by ``ProxyApp.start``: small answers are written
    from the upstream connection's callbacks; a large or unsized one, or a failure, continues in
    a task with the same code as the slow path."""

    __slots__ = ("_app", "_ex", "_xc")

    def __init__(self, app: ProxyApp, ex: NativeExchange, xc: _Exchange) -> None:
        self._app = app
        self._ex = ex
        self._xc = xc

    def head(self, response: UpstreamResponse) -> bool:
        if _buffered(self._xc, response):
            return True
        self._ex.spawn(self._app._relay_and_finish(self._ex, response, self._xc))
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
            self._ex.spawn(self._app._after_failure(self._ex, error, self._xc))


async def _raise(exc: Exception) -> None:
    """Hand an error to the server's task wrapper, which logs it and answers 500."""
    raise exc


def _buffered(xc: _Exchange, response: UpstreamResponse) -> bool:
    """Answers read whole before relaying (one write to the client): no body, or a small one."""
    length = response.content_length
    if xc.method == "HEAD" or response.status in (204, 304):
        return True
    return length is not None and length <= SMALL_BODY


def _request_ids() -> Iterator[bytes]:
    """Unique 32-hex-digit ids without a syscall per request: a random process prefix + a counter
    (a C-level iterator: no Python frame per id)."""
    return map((os.urandom(8).hex() + "%016x").encode().__mod__, itertools.count())


def _started(body: _Body | None) -> bool:
    return body is not None and body.started


async def _watch_disconnect(ex: ClientExchange, response: UpstreamResponse, gone: asyncio.Event) -> None:
    """Only used once the request body is fully read, so it is the sole reader of the client."""
    with contextlib.suppress(asyncio.CancelledError):
        await ex.wait_gone()
        gone.set()
        response.close()


def _response_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers (and any the backend named in Connection); keep repeats in order."""
    return end_to_end([(name.lower(), value) for name, value in raw], RESPONSE_STRIP)


def path_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")

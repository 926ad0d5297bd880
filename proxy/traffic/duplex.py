"""Forwarding to an HTTP/2 backend: the request body streams up while the answer streams back.

The HTTP/1.1 path (``ProxyApp._forward``/``_relay``) reads a small body whole before it sends, and
sends the whole request before it reads the answer. A gRPC call cannot work that way: a
bidirectional stream (``ping_pong``) waits for an answer before its next message. So here the
stream is opened (HEADERS only) first, the client's body is pumped up by a task as it arrives,
and the answer is relayed as it comes, its trailers last (``ClientExchange.end``).

The same lifecycle as the HTTP/1.1 path: routed by ``_route``, one fallback rule (v2 unreachable
with nothing of the request sent -> v1: the body is never read before the stream is open, so this
holds for every call kind), one ``finish``. What is gRPC's own (``proxy/traffic/grpc.py``):
- the call's status comes from the trailers (or a trailers-only answer's headers); a code in
  ``grpc.error_codes`` is recorded for the canary as a 5xx (UNAVAILABLE 503, DEADLINE_EXCEEDED
  504, others 500), and every call is counted in ``strangler_grpc_requests_total``;
- ``grpc-timeout`` bounds every wait on the backend (with ``read_timeout_seconds``) and is passed
  on as the time left; a malformed one is refused (INTERNAL, counted ``bad_grpc_timeout``);
- failures the proxy answers itself are gRPC answers (trailers-only, UNAVAILABLE or
  DEADLINE_EXCEEDED), which gRPC clients report as such, instead of a JSON 502/504;
- the client leaving (RST_STREAM, a closed connection) cancels the backend stream.

No minimum upload rate here: a slow stream holds no backend connection (streams are multiplexed),
and a gRPC stream is slow by design.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Final

from proxy.edge.errors import UpstreamError
from proxy.edge.h2client import H2Pool, H2Stream
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.traffic import grpc
from proxy.traffic.exchange import ClientExchange, ClientGone
from proxy.traffic.hooks import PrimaryResult
from proxy.traffic.outcomes import (
    ANSWERED,
    CLIENT_FAULT,
    CLIENT_GONE_REQUEST,
    CLIENT_GONE_RESPONSE,
    CUT,
    FAILED,
    PROXY_LIMIT,
)
from proxy.traffic.upstream import VERSION_HEADER, Upstream

if TYPE_CHECKING:
    from proxy.traffic.forward import ProxyApp, Routed, _Body

VERSION_VALUE: Final = {"v1": b"v1", "v2": b"v2"}
METHOD_BYTES: Final = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}
# what a proxy-made failure is to a gRPC client: 502/503 unavailable, 504 the deadline
FAILURE_CODE: Final = {502: grpc.UNAVAILABLE, 503: grpc.UNAVAILABLE, 504: grpc.DEADLINE_EXCEEDED}


class _Call:
    """One call's shared state between the relay and the upload task."""

    __slots__ = ("gone", "sent", "kept", "limit")

    def __init__(self, limit: int) -> None:
        self.gone = False  # the client left (reset its stream or closed the connection)
        # the body sent so far, while it is small: a stream the backend did not process (refused,
        # above a GOAWAY's last id) is sent again on a new stream with it; None once past the limit
        self.sent: list[bytes] | None = []
        self.kept = 0
        self.limit = limit

    def keep(self, chunk: bytes) -> None:
        sent = self.sent
        if sent is not None and chunk:
            self.kept += len(chunk)
            if self.kept > self.limit:
                self.sent = None
            else:
                sent.append(chunk)


class Duplex:
    """The h2-upstream forwarder of one ``ProxyApp`` (see the module docstring)."""

    def __init__(
        self, app: ProxyApp, upstreams: dict[str, Upstream], settings: Settings, metrics: Metrics
    ) -> None:
        self._app = app
        self._upstreams = upstreams
        self._metrics = metrics
        self._read_timeout = settings.read_timeout_seconds
        self._replay_limit = settings.limits.body_buffer_bytes
        self._errors = frozenset(settings.grpc.error_codes)
        self._methods = grpc.MethodLabels(settings.grpc.max_method_labels)

    async def forward(self, ex: ClientExchange, xc: Routed) -> None:
        """Open the stream (falling back or failing cleanly), relay both ways, ``finish`` once."""
        app = self._app
        is_grpc = False
        timeout: bytes | None = None
        for name, value in xc.headers:
            if name == b"content-type":
                is_grpc = grpc.is_grpc(((name, value),))
            elif name == b"grpc-timeout":
                timeout = value
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        if is_grpc and timeout is not None:
            seconds = grpc.parse_timeout(timeout)
            if seconds is None:
                self._metrics.rejected_request("bad_grpc_timeout")
                app.finish(xc, CLIENT_FAULT)
                with contextlib.suppress(ClientGone, OSError):
                    await self._grpc_answer(ex, xc, grpc.INTERNAL, "malformed grpc-timeout")
                return
            deadline = loop.time() + seconds
        headers = self._headers(ex, xc, deadline, loop)
        authority = xc.host if (not xc.add_host and xc.host) else b""
        body = xc.body
        call = _Call(self._replay_limit)
        stream: H2Stream | None = None
        upload: asyncio.Task[None] | None = None
        retried = False
        while stream is None:
            upstream = self._upstreams[xc.version]
            pool = upstream.h2
            if pool is None:  # v2 fell back to an HTTP/1.1 v1: its path, nothing of the body read
                await app._forward(ex, xc)
                return
            try:
                stream = await self._open(pool, xc, headers, authority or pool.origin.host_header, deadline)
                upload = asyncio.create_task(self._upload(ex, body, stream, call))
                status, answer = await stream.response()
            except UpstreamError as exc:
                if upload is not None:
                    upload.cancel()
                    upload = None
                if stream is not None:
                    stream.cancel()
                    stream = None
                if call.gone:
                    app.finish(xc, CLIENT_GONE_REQUEST)
                    return
                unsent = exc.nothing_sent and (body is None or not body.started)
                if unsent and app._fall_back(xc, exc):
                    continue
                if exc.kind == "refused_stream" and not retried and (body is None or call.sent is not None):
                    retried = True  # not processed (RFC 9113 8.7): once more, on a new stream, body replayed
                    continue
                await self._failed(ex, xc, exc, is_grpc)
                return
        try:
            await self._relay(ex, xc, stream, status, answer, is_grpc, call)
        finally:
            if upload is not None:
                upload.cancel()

    def _headers(
        self, ex: ClientExchange, xc: Routed, deadline: float | None, loop: asyncio.AbstractEventLoop
    ) -> list[tuple[bytes, bytes]]:
        """What goes upstream: the routed headers without Host (it is ``:authority``), with the
        grpc-timeout left, the canonical content-length, and ``te: trailers`` if the client sent it."""
        out = [(name, value) for name, value in xc.headers if name != b"host" and name != b"grpc-timeout"]
        if deadline is not None:
            out.append((b"grpc-timeout", grpc.format_timeout(deadline - loop.time())))
        if xc.has_body and xc.content_length is not None:
            out.append((b"content-length", b"%d" % xc.content_length))
        for name, value in ex.headers:
            if name == b"te" and b"trailers" in value.lower():
                out.append((b"te", b"trailers"))
                break
        return out

    async def _open(
        self,
        pool: H2Pool,
        xc: Routed,
        headers: list[tuple[bytes, bytes]],
        authority: bytes,
        deadline: float | None,
    ) -> H2Stream:
        method = xc.method
        return await pool.open(
            METHOD_BYTES.get(method) or method.encode("latin-1"), xc.raw_target, headers, authority=authority,
            end_stream=not xc.has_body, read_timeout=self._read_timeout, deadline=deadline,
        )  # fmt: skip

    async def _upload(self, ex: ClientExchange, body: _Body | None, stream: H2Stream, call: _Call) -> None:
        """The client's body up as it arrives, then watch for the client leaving: either way the
        backend stream is cancelled when it does. An upstream failure is the relay's to report."""
        try:
            if body is not None:
                more = True
                if call.sent:  # a retry: what the refused stream had, then the rest
                    for chunk in call.sent:
                        await stream.send(chunk, False)
                    if body.done:
                        await stream.send(b"", True)
                        more = False
                while more:
                    chunk, more = await body.take()
                    call.keep(chunk)
                    if chunk or not more:
                        await stream.send(chunk, not more)
            await ex.wait_gone()
        except ClientGone:
            pass
        except UpstreamError:
            return
        call.gone = True
        stream.cancel()

    async def _relay(
        self,
        ex: ClientExchange,
        xc: Routed,
        stream: H2Stream,
        status: int,
        answer: list[tuple[bytes, bytes]],
        is_grpc: bool,
        call: _Call,
    ) -> None:
        app = self._app
        headers = [*answer, (VERSION_HEADER, VERSION_VALUE[xc.version]), *xc.extra_headers]
        plan = xc.plan
        captured: bytearray | None = bytearray() if plan is not None else None
        max_capture = plan.max_compare if plan is not None else 0
        responded = False
        try:
            if stream.headers_only:
                await ex.respond(status, headers, b"", False)
            else:
                await ex.respond(status, headers, b"", True)
                responded = True
                async for chunk in stream.chunks():
                    if captured is not None and len(captured) <= max_capture:
                        captured += chunk
                    await ex.write(chunk, True)
                await ex.end(stream.trailers)  # HTTP/1.1 clients: the end of the body, no trailers
        except UpstreamError as exc:
            if call.gone:
                self._done_grpc(xc, is_grpc, "CANCELLED")
                app.finish(xc, CLIENT_GONE_RESPONSE)
                return
            # the answer had started: the stream (or connection) is cut, never passed off as whole
            self._metrics.upstream_error(xc.version, "reset" if exc.kind == "protocol" else exc.kind)
            self._done_grpc(xc, is_grpc, "INTERNAL")
            app.finish(xc, CUT, 502)
            return
        except (ClientGone, OSError):
            stream.cancel()
            self._done_grpc(xc, is_grpc, "CANCELLED")
            app.finish(xc, CLIENT_GONE_RESPONSE if responded else CLIENT_GONE_REQUEST)
            return
        recorded = status
        if is_grpc:
            name = grpc.code_name(grpc.call_status(status, answer, stream.trailers))
            self._done_grpc(xc, True, name)
            recorded = grpc.recorded_status(status, name, self._errors)
        primary = None
        if captured is not None:
            kept = bytes(captured) if len(captured) <= max_capture else None
            primary = PrimaryResult(status, headers, kept, time.perf_counter() - xc.started, stream.trailers)
        app.finish(xc, ANSWERED, recorded, primary)

    async def _failed(self, ex: ClientExchange, xc: Routed, exc: UpstreamError, is_grpc: bool) -> None:
        """Nothing relayed and no fallback: a gRPC client gets a gRPC status, others the JSON
        502/503/504 of the HTTP/1.1 path."""
        if not is_grpc:
            await self._app._failed(ex, xc, exc)
            return
        self._app._count_failure(xc, exc)
        code = FAILURE_CODE.get(exc.status, grpc.UNAVAILABLE)
        self._done_grpc(xc, True, grpc.code_name(code))
        self._app.finish(xc, FAILED if exc.blames_version else PROXY_LIMIT, exc.status)
        with contextlib.suppress(ClientGone, OSError):
            await self._grpc_answer(ex, xc, code, f"upstream {xc.version}: {exc.detail}")

    async def _grpc_answer(self, ex: ClientExchange, xc: Routed, code: int, message: str) -> None:
        headers = [*grpc.trailers_only(code, message), (VERSION_HEADER, VERSION_VALUE[xc.version])]
        await ex.respond(200, headers, b"", False)

    def _done_grpc(self, xc: Routed, is_grpc: bool, code: str) -> None:
        if is_grpc:
            seconds = time.perf_counter() - xc.started
            self._metrics.grpc_call(xc.group, xc.version, self._methods.label(xc.norm), code, seconds)

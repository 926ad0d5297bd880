"""The Mirror: a per-request decision on the hot path, and workers that do everything else.

Hot path (``plan``, ``submit``, ``abandon``): a dict lookup in the snapshot, a random number, a
method check, a size check, a byte-budget check, an append to a bounded queue (and, when the
dispatcher is idle, one ``call_soon`` to wake it). No Redis, no awaits, no logging. A request
planned while the queue is full is shed in ``plan`` already, so the primary captures and builds
nothing for it (at saturation most requests are shed: that must be cheap).

Memory is bounded in bytes, not only in requests: bodies held by queued jobs and answers being read
by workers count against ``max_buffered_bytes``. A job is admitted while held bytes stay under half
the budget (the other half is for answers being read); an answer that cannot be read within the
budget is not compared (``skipped``).

A dispatcher (``_pump``) starts queued requests while fewer than ``settings.shadow.concurrency``
are in flight: a request without a body goes out on a warm v2 connection with the client's
no-task API (``send_now`` and a ``ResponseSink``, as the primary's fast path does); its answer,
when small, is buffered whole by the connection and compared in the connection's callback
(``quick_compare``: no task, no future, no thread hand-off, no GIL convoy with the loop). Anything
else continues in a task: no warm connection, a body, a calibration sample (v1 asked a second
time), a large answer read chunk by chunk, a comparison only deepdiff can make (in a small thread
pool whose CPU share is capped). Results go to an in-memory batch that a flusher writes to Redis
with one pipeline per interval. Nothing here can fail or delay the primary answer: the client
already has it when ``submit`` is called.

Each mirrored request's own event-loop time is measured, and requests start no closer than that
average over ``compare_cpu_share``: under load the mirror keeps to about that share of the loop
and the queue sheds the rest, so the primary keeps its throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.background import cancel_and_wait
from proxy.control.snapshot import Snapshot
from proxy.control.store import ControlStore
from proxy.edge.client import UpstreamResponse
from proxy.edge.errors import UpstreamError, UpstreamProtocolError
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.shadow.compare import Answer, Options, Outcome, compare, learn, quick_compare
from proxy.shadow.endpoints import EndpointNamer
from proxy.shadow.policy import (
    RULES_SECTION,
    SECTION,
    EndpointRules,
    GroupPolicy,
    RuleSet,
    is_safe,
    override_method,
)
from proxy.shadow.protobuf import (
    Decoding,
    GrpcAnswer,
    MessageDecoder,
    WireOnly,
    compare_grpc,
    learn_grpc,
    quick_compare_grpc,
    sample_text,
)
from proxy.shadow.report import ReportBatch, ReportStore
from proxy.traffic.grpc import is_grpc
from proxy.traffic.hooks import MirrorRequest, PrimaryResult
from proxy.traffic.routing import RouteTable
from proxy.traffic.upstream import Upstream, translate

log = logging.getLogger("strangler.shadow")
_FIRST_COST = 50e-6  # seconds; a guess until the first mirrored requests are measured

SHADOW_HEADER = (b"x-strangler-shadow", b"1")
CALIBRATION_HEADER = (b"x-strangler-calibration", b"1")
OUTCOMES = ("sent", "dropped", "skipped_method", "skipped_size", "error")
RESULTS = ("match", "mismatch", "noise", "skipped")
_random = random.random
_MARKER_PREFIX = b"x-strangler-"


@dataclass(frozen=True, slots=True)
class Fetched:
    """A shadow-side answer; ``body`` is None when it was over the compare limit."""

    status: int
    content_type: str
    body: bytes | None
    seconds: float
    headers: tuple[tuple[str, str], ...] = ()  # compared headers only
    encoding: str = ""
    reserved: int = 0  # bytes of the byte budget this body holds until the comparison is done
    over_budget: bool = False  # reading stopped because the byte budget was spent
    # a gRPC answer (fetched over h2): ``headers`` then holds every answer header, and these
    grpc: bool = False
    trailers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class _Held:
    """A comparison waiting for its endpoint's calibration (both answers kept)."""

    group: str
    v1: Answer | GrpcAnswer
    v2: Answer | GrpcAnswer
    rules: EndpointRules
    options: Options
    request: MirrorRequest
    primary: PrimaryResult
    shadow: Fetched
    # a gRPC call: its method path and the decoder that reads its messages (None: HTTP)
    method: str = ""
    decoder: MessageDecoder | None = None

    @property
    def size(self) -> int:
        return len(self.v1.body or b"") + len(self.v2.body or b"")


@dataclass(slots=True)
class _Job:
    plan: GroupPolicy
    request: MirrorRequest
    primary: PrimaryResult
    size: int  # bytes held against the budget while queued and handled


# an answer up to this size (and within the byte budget) is buffered whole by the connection and
# handed over in one piece; a larger or unsized one is read chunk by chunk by a task
BUFFERED_ANSWER = 64 * 1024
# pacing starts requests in small batches at most this far apart, catching up the slots due: loop
# timers have a millisecond grain, and a backend woken once for a few requests costs a co-located
# proxy less CPU than one woken per request
_PACE_SLACK = 0.005


class _JobSink:
    """The ``ResponseSink`` of a mirrored request sent on a warm pooled connection: no task, no
    future, no coroutine per request (the primary's fast path does the same). A small answer is
    buffered whole by the connection, its bytes reserved in the budget when its head arrives, and
    settled in ``done``; a large or unsized one, a keep-alive race or a comparison that needs the
    thread continue in a task."""

    __slots__ = ("mirror", "job", "endpoint", "limit", "started", "meter", "reserved")

    def __init__(self, mirror: ShadowMirror, job: _Job, endpoint: str, limit: int, meter: _Meter) -> None:
        self.mirror = mirror
        self.job = job
        self.endpoint = endpoint
        self.limit = limit
        self.started = time.perf_counter()
        self.meter = meter
        self.reserved = 0

    def head(self, response: UpstreamResponse) -> bool:
        mirror = self.mirror
        length = response.content_length
        if length is not None and length <= self.limit and mirror._buffered + length <= mirror._budget:
            mirror._buffered += length
            self.reserved = length
            return True
        mirror._spawn(mirror._read_on(self, response))
        return False

    def done(self, response: UpstreamResponse) -> None:
        if self.mirror._jobs is not None:  # (stopped: the pools closed under it; nothing to report)
            self.mirror._answered(self, response)

    def failed(self, error: UpstreamError, retryable: bool) -> None:
        mirror = self.mirror
        if mirror._jobs is None:
            return
        if retryable:  # the keep-alive race: nothing was answered; send again on a new connection
            mirror._spawn(mirror._exchange(self.job, self.endpoint, False, self.meter, fresh=True))
        else:
            mirror._answered(self, error)


class _Meter:
    """The event-loop time one mirrored request takes in its own code (stopped around awaits and
    between callbacks); it runs from the moment it is made."""

    __slots__ = ("spent", "_mark")

    def __init__(self) -> None:
        self.spent = 0.0
        self._mark = time.perf_counter()

    def stop(self) -> None:
        if self._mark:
            self.spent += time.perf_counter() - self._mark
            self._mark = 0.0

    def start(self) -> None:
        self._mark = time.perf_counter()


def _answer_headers(
    headers: list[tuple[bytes, bytes]], wanted: frozenset[str]
) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    """(content type, content encoding, the compared headers) of the primary's answer headers."""
    content_type = encoding = ""
    picked: list[tuple[str, str]] = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "content-type":
            content_type = value
        elif name == "content-encoding":
            encoding = value
        if name in wanted:
            picked.append((name, value))
    return content_type, encoding, tuple(picked)


def mirror_headers(
    headers: list[tuple[bytes, bytes]], *markers: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """The primary's upstream headers without any ``X-Strangler-*`` a client sent, plus ours: a
    client must not be able to make real traffic look like shadow or calibration traffic."""
    kept = [(k, v) for k, v in headers if not k.lower().startswith(_MARKER_PREFIX)]
    kept.extend(markers)
    return kept


def grpc_method(request: MirrorRequest) -> str:
    """The call's method path ``/pkg.Service/Method`` (what descriptors are looked up by)."""
    return request.raw_target.partition(b"?")[0].decode("latin-1")


# what an h2 request may not carry (RFC 9113 8.2.2), the authority (sent as :authority), and a
# deadline the client set for its own call (the mirror's timeout bounds ours)
_NOT_H2 = frozenset({b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                     b"upgrade", b"te", b"grpc-timeout"})  # fmt: skip


def grpc_headers(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
    """(the headers of a mirrored gRPC call over h2, the Host it had): names lower-case,
    connection-specific ones dropped, ``te: trailers`` (gRPC servers require it)."""
    out: list[tuple[bytes, bytes]] = []
    host = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"host":
            host = value
        if lower not in _NOT_H2:
            out.append((lower, value))
    out.append((b"te", b"trailers"))
    return out, host


def _text_pairs(pairs: list[tuple[bytes, bytes]] | None) -> tuple[tuple[str, str], ...]:
    return tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in pairs or ())


def _truncate(body: bytes | None, limit: int) -> str | None:
    if body is None:
        return None
    text = body[:limit].decode("utf-8", "replace")
    return text + "..." if len(body) > limit else text


class ShadowMirror:
    """Implements ``proxy.traffic.hooks.Mirror`` and is a lifespan Component (start/stop)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        store: ControlStore,
        routes: RouteTable,
        report: ReportStore,
        grpc: Decoding | None = None,
    ) -> None:
        self._settings = settings
        self._grpc: Decoding = grpc or WireOnly()
        self._store = store
        self._config = settings.shadow
        self._metrics = metrics
        self._report = report
        self._namer = EndpointNamer(routes, self._config.max_endpoints, self._config.endpoint_patterns)
        self._jobs: deque[_Job] | None = None  # the bounded queue (None: not running)
        self._queue_size = self._config.queue_size
        self._concurrency = self._config.concurrency
        self._inflight = 0  # requests started and not settled (at most ``concurrency``)
        self._pump_handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task[None]] = set()  # requests that continue in a task
        self._batch = ReportBatch()
        # endpoint -> field -> calibrations in which it varied (Redis, all replicas, + ours unflushed)
        self._noise: dict[str, dict[str, int]] = {}
        self._epoch: int | None = None
        self._budget = self._config.max_buffered_bytes
        self._admit_limit = self._budget // 2
        self._buffered = 0
        self._wanted_headers = frozenset(self._config.compare_headers)
        self._options: dict[int, Options] = {}
        self._calibrated: dict[str, int] = {}
        # calibrations an endpoint needs before its comparisons are judged: the warm-up, and at
        # least enough for a field to reach the noise threshold (noise cannot be known sooner);
        # until then every safe request to it calibrates and its comparisons are pending
        self._ready_after = max(self._config.calibration_warmup, self._config.noise_threshold)
        # comparisons of endpoints still calibrating, judged once the calibration has run
        self._pending: dict[str, list[_Held]] = {}
        self._pending_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._v1: Upstream | None = None
        self._v2: Upstream | None = None
        self._reported_errors: set[str] = set()
        self._timeout = self._config.timeout_seconds  # per mirrored request, whole
        # pacing: mirrored requests start no closer than (their average own loop time / share)
        self._share = self._config.compare_cpu_share
        self._next_start = 0.0  # perf_counter() time before which no mirrored request starts
        self._cost = _FIRST_COST  # moving average of a mirrored request's own event-loop time
        # metric children resolved once for the closed label sets
        groups = settings.group_names
        self._outcome_children = {
            (g, o): (self._metrics.shadow_requests.labels(g, o), f"{g}:{o}") for g in groups for o in OUTCOMES
        }
        self._result_children = {
            (g, r): self._metrics.shadow_comparisons.labels(g, r) for g in groups for r in RESULTS
        }
        self._delta_children = {g: self._metrics.shadow_latency_delta.labels(g) for g in groups}

    # --- hot path ---------------------------------------------------------------------------------

    def plan(self, group: str, method: str, content_length: int | None, snapshot: Snapshot) -> Any | None:
        policy = snapshot.sections.get(SECTION)
        if policy is None:
            return None
        plan: GroupPolicy = policy.groups.get(group, policy.default)
        if not plan.enabled:
            return None
        if plan.sample_percentage < 100.0 and _random() * 100.0 >= plan.sample_percentage:
            return None
        if method not in plan.methods:
            self._count(group, "skipped_method")
            return None
        if content_length is not None and content_length > plan.body_limit:
            self._count(group, "skipped_size")
            return None
        jobs = self._jobs
        if jobs is not None and (len(jobs) >= self._queue_size or self._buffered > self._admit_limit):
            # shed now: the primary then captures nothing and builds nothing for the mirror
            self._count(group, "dropped")
            return None
        return plan

    def submit(self, plan: Any, request: MirrorRequest, primary: PrimaryResult) -> None:
        jobs = self._jobs
        size = len(request.body) + (len(primary.body) if primary.body is not None else 0)
        if jobs is None or self._buffered + size > self._admit_limit or len(jobs) >= self._queue_size:
            self._count(plan.group, "dropped")
            return
        jobs.append(_Job(plan, request, primary, size))
        self._buffered += size
        if self._pump_handle is None and self._inflight < self._concurrency:
            assert self._loop is not None
            self._pump_handle = self._loop.call_soon(self._pump)  # after this callback, not in it

    def abandon(self, plan: Any, reason: str) -> None:
        if reason == "size":
            self._count(plan.group, "skipped_size")
        # "primary_failed": nothing to compare against; the primary's own metrics count the failure

    def _count(self, group: str, outcome: str) -> None:
        """A metric increment and a counter for the shared report (flushed by the worker side)."""
        entry = self._outcome_children.get((group, outcome))
        if entry is None:
            entry = (self._metrics.shadow_requests.labels(group, outcome), f"{group}:{outcome}")
            self._outcome_children[(group, outcome)] = entry
        entry[0].inc()
        self._batch.groups[entry[1]] += 1

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self._settings
        size, timeout = self._config.concurrency, self._config.timeout_seconds
        self._v2 = Upstream("v2", settings.v2_url, settings, pool_size=size, read_timeout=timeout)
        self._v1 = Upstream("v1", settings.v1_url, settings, pool_size=size, read_timeout=timeout)
        await self._v2.start()
        await self._v1.start()
        self._executor = ThreadPoolExecutor(
            max_workers=self._config.compare_workers, thread_name_prefix="strangler-compare"
        )
        self._loop = asyncio.get_running_loop()
        self._jobs = deque()
        # endpoints and noise other replicas (or earlier runs) found; bounded like any control read
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.refresh_shared(), timeout=settings.redis_timeout_seconds * 2)
        self._tasks = [asyncio.create_task(self._flusher(), name="strangler-shadow-flush")]

    async def stop(self) -> None:
        self._jobs = None  # new submissions are dropped (counted) while we stop
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        await cancel_and_wait([*self._tasks, *self._running])
        self._tasks = []
        self._running.clear()
        self._drop_pending(self._batch)  # never judged: no longer counted as pending
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=2)
        for upstream in (self._v2, self._v1):
            if upstream is not None:
                await upstream.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # --- workers ----------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._jobs) if self._jobs is not None else 0

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held by queued and in-flight mirrored requests (against max_buffered_bytes)."""
        return self._buffered

    def _pump(self) -> None:
        """Start queued requests while fewer than ``concurrency`` are in flight and the pace
        allows; come back on a timer when the pace says wait, or when a request ends."""
        self._pump_handle = None
        jobs = self._jobs
        loop = self._loop
        if jobs is None or loop is None:
            return
        while jobs and self._inflight < self._concurrency:
            wait = self._slot(time.perf_counter())
            if wait > 0:
                self._pump_handle = loop.call_later(max(wait, _PACE_SLACK), self._pump)
                return
            job = jobs.popleft()
            self._inflight += 1
            self._begin(job)

    def _slot(self, now: float) -> float:
        """0 when a request may start now (the slot is taken), else the seconds to wait. Starts are
        spaced by the average event-loop time of a mirrored request over ``compare_cpu_share``, so
        under load the mirror's own work on the loop stays near that share and the queue sheds
        the rest; a quiet spell earns no credit (at most ``_PACE_SLACK`` of lag is caught up)."""
        if self._share >= 1.0:
            return 0.0
        if self._next_start > now:
            return self._next_start - now
        self._next_start = max(self._next_start, now - _PACE_SLACK) + self._cost / self._share
        return 0.0

    def _end(self, job: _Job, meter: _Meter) -> None:
        """A request is settled: its bytes and its slot are given back, its cost measured."""
        self._buffered -= job.size
        self._inflight -= 1
        self._cost += (meter.spent - self._cost) * 0.05
        if self._pump_handle is None and self._jobs and self._loop is not None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """The rest of a request in a task (kept, so stop() can cancel it)."""
        if self._jobs is None or self._loop is None:  # stopping: a late callback starts nothing
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _begin(self, job: _Job) -> None:
        """Send one queued request: on a warm v2 connection now, else (no warm connection, a body,
        a calibration sample) in a task."""
        meter = _Meter()
        try:
            plan, request = job.plan, job.request
            if is_grpc(request.headers):  # over h2, its messages decoded: always in a task
                self._count(plan.group, "sent")
                endpoint = self._namer.name(request.method, request.path)
                self._spawn(self._grpc_exchange(job, endpoint, meter))
                meter.stop()
                return
            endpoint, calibrate = self._endpoint(plan, request)
            self._count(plan.group, "sent")
            sink = None
            if not calibrate and not request.body:
                sink = _JobSink(self, job, endpoint, min(plan.max_compare, BUFFERED_ANSWER), meter)
                if not self._send_now(self._v2, request, sink):
                    sink = None
            if sink is None:
                self._spawn(self._exchange(job, endpoint, calibrate, meter))
        except Exception as exc:  # noqa: BLE001 - a shadow bug costs this mirror, never the loop
            self._once(f"begin:{type(exc).__name__}", "shadow worker failed: %r", exc)
            meter.stop()
            self._end(job, meter)
            return
        meter.stop()

    def _endpoint(self, plan: GroupPolicy, request: MirrorRequest) -> tuple[str, bool]:
        """The report's endpoint name, and whether v1 is asked a second time (calibration)."""
        claimed = override_method(request.headers, request.raw_target)
        endpoint = self._namer.name(claimed or request.method, request.path)
        safe = is_safe(request.method, request.headers, request.raw_target)
        return endpoint, self._calibrates(plan, endpoint, safe)

    def _calibrates(self, plan: GroupPolicy, endpoint: str, safe: bool) -> bool:
        """A safe request is calibrated while its endpoint warms up, then at the percentage."""
        return (
            plan.calibration_percentage > 0
            and safe
            and (
                self._calibrated.get(endpoint, 0) < self._ready_after
                or _random() * 100.0 < plan.calibration_percentage
            )
        )

    def _send_now(self, upstream: Upstream | None, request: MirrorRequest, sink: _JobSink) -> bool:
        """Write a request without a body on a warm pooled connection (the client's no-task path);
        False when none is free: the caller uses the pool's coroutine path. A head the client
        refuses is refused there again, and reported as this mirror's error."""
        assert upstream is not None
        pool = upstream.pool
        headers = mirror_headers(request.headers, SHADOW_HEADER)
        method = request.method.encode("latin-1")
        add_host = not any(name == b"host" for name, _ in headers)  # preserve_host: the client's
        try:
            head = pool.head_for(method, request.raw_target, headers, add_host, b"")
        except UpstreamError:
            return False
        conn = pool.take_idle()
        if conn is None:
            return False
        conn.send_now(head, method == b"HEAD", pool.limits.read_timeout, sink)
        return True

    def _answered(self, sink: _JobSink, answer: UpstreamResponse | UpstreamError) -> None:
        """A buffered answer (or the failure) of a request sent with ``_send_now``: compared here
        when that is cheap (``quick_compare``), else in a task that hands it to the thread."""
        meter, job = sink.meter, sink.job
        meter.start()
        result: Fetched | BaseException
        if isinstance(answer, UpstreamError):
            result = answer
        else:
            try:
                result = self._fetched(answer, answer.buffered(), sink.limit, sink.started, sink.reserved)
            except UpstreamError as exc:  # cut short
                result = exc
        if not isinstance(result, Fetched):
            self._buffered -= sink.reserved
        sink.reserved = 0
        try:
            later = self._settle_now(job.plan, sink.endpoint, job.request, job.primary, result)
        except Exception as exc:  # noqa: BLE001 - a shadow bug costs this mirror, never the connection
            self._once(f"settle:{type(exc).__name__}", "shadow worker failed: %r", exc)
            later = None
        if later is not None:
            meter.stop()
            self._spawn(self._compare_in_thread(job, sink.endpoint, result, later, meter))
            return
        if isinstance(result, Fetched):
            self._buffered -= result.reserved
        meter.stop()
        self._end(job, meter)

    async def _read_on(self, sink: _JobSink, response: UpstreamResponse) -> None:
        """An answer too large (or unsized) to buffer whole, read chunk by chunk in a task."""
        job, meter = sink.job, sink.meter
        result: Fetched | BaseException
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._read(response, job.plan.max_compare, sink.started)
        except asyncio.CancelledError:
            self._end(job, meter)
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the mirror's error
            result = translate("v2", exc)
        await self._finish(job, sink.endpoint, [result], meter)

    async def _exchange(
        self, job: _Job, endpoint: str, calibrate: bool, meter: _Meter, fresh: bool = False
    ) -> None:
        """A request through the pool's coroutine path: a new connection, a body, a calibration
        sample (v1 asked a second time), or a send again after a keep-alive race."""
        plan, request = job.plan, job.request
        headers = mirror_headers(request.headers, SHADOW_HEADER)
        body = request.body or None
        limit = plan.max_compare
        results: list[Fetched | BaseException]
        try:
            if calibrate:
                results = list(
                    await asyncio.gather(
                        self._fetch(self._v2, request, headers, body, limit),
                        self._fetch(self._v1, request, [*headers, CALIBRATION_HEADER], body, limit),
                        return_exceptions=True,
                    )
                )
            else:
                try:
                    results = [await self._fetch(self._v2, request, headers, body, limit, fresh)]
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported as the mirror's error below
                    results = [exc]
        except asyncio.CancelledError:
            self._end(job, meter)
            raise
        await self._finish(job, endpoint, results, meter)

    async def _grpc_exchange(self, job: _Job, endpoint: str, meter: _Meter) -> None:
        """A gRPC call sent again over h2 (to v2, and to v1 for a calibration sample when its
        descriptors say it is a read: they are resolved first, so with reflection the first calls
        to a service wait for it, bounded by its timeout, rather than go uncalibrated)."""
        request = job.request
        headers, host = grpc_headers(mirror_headers(request.headers, SHADOW_HEADER))
        limit = job.plan.max_compare
        results: list[Fetched | BaseException]
        try:
            await self._grpc.resolve(grpc_method(request))  # (the meter is stopped: a wait)
            if self._calibrates(job.plan, endpoint, self._grpc.safe(grpc_method(request))):
                results = list(
                    await asyncio.gather(
                        self._grpc_fetch(self._v2, request, headers, host, limit),
                        self._grpc_fetch(self._v1, request, [*headers, CALIBRATION_HEADER], host, limit),
                        return_exceptions=True,
                    )
                )
            else:
                try:
                    results = [await self._grpc_fetch(self._v2, request, headers, host, limit)]
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - reported as the mirror's error below
                    results = [exc]
        except asyncio.CancelledError:
            self._end(job, meter)
            raise
        await self._finish(job, endpoint, results, meter)

    async def _grpc_fetch(
        self,
        upstream: Upstream | None,
        request: MirrorRequest,
        headers: list[tuple[bytes, bytes]],
        host: bytes | None,
        limit: int,
    ) -> Fetched:
        """One call on the backend's h2 pool, its answer read within the compare limit and the
        byte budget (as ``_read``), its trailers kept. An HTTP/1.1 backend cannot answer gRPC:
        reported as this mirror's error."""
        assert upstream is not None
        started = time.perf_counter()
        pool = upstream.h2
        stream = None
        reserved = 0
        try:
            if pool is None:
                raise UpstreamProtocolError(
                    upstream.version, "a gRPC call needs h2 to this backend (vN_protocol)"
                )
            async with asyncio.timeout(self._timeout):
                stream = await pool.open(
                    request.method.encode("latin-1"), request.raw_target, headers,
                    authority=host or pool.origin.host_header, end_stream=not request.body,
                    read_timeout=self._timeout,
                )  # fmt: skip
                if request.body:
                    await stream.send(request.body, True)
                status, answer = await stream.response()
                body: bytes | None = b""
                over_budget = False
                if not stream.headers_only:
                    body, reserved, over_budget = await self._take(stream.chunks(), limit)
                if body is None:
                    stream.cancel()
        except BaseException as exc:
            self._buffered -= reserved
            if stream is not None:
                stream.cancel()
            if isinstance(exc, Exception):
                raise translate(upstream.version, exc) from exc
            raise
        texts = _text_pairs(answer)
        content_type = next((v for k, v in texts if k == "content-type"), "")
        return Fetched(
            status=status,
            content_type=content_type,
            body=body,
            seconds=time.perf_counter() - started,
            headers=texts,
            reserved=reserved,
            over_budget=over_budget,
            grpc=True,
            trailers=_text_pairs(stream.trailers),
        )

    async def _finish(
        self, job: _Job, endpoint: str, results: list[Fetched | BaseException], meter: _Meter
    ) -> None:
        meter.start()
        try:
            await self._settle(job.plan, endpoint, job.request, job.primary, results, meter)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a shadow bug must never stop the mirror
            self._once(f"worker:{type(exc).__name__}", "shadow worker failed: %r", exc)
        finally:
            for result in results:
                if isinstance(result, Fetched):
                    self._buffered -= result.reserved
            meter.stop()
            self._end(job, meter)

    async def _compare_in_thread(
        self, job: _Job, endpoint: str, shadow: Fetched | BaseException, args: tuple[Any, ...], meter: _Meter
    ) -> None:
        """``_answered``'s comparison that only deepdiff (or a decoder) can do, in the thread."""
        try:
            assert self._executor is not None
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self._executor, self._paced, compare, *args)
            meter.start()
            assert isinstance(shadow, Fetched)
            self._record(endpoint, job.plan.group, outcome, job.request, job.primary, shadow)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._once(f"worker:{type(exc).__name__}", "shadow worker failed: %r", exc)
        finally:
            if isinstance(shadow, Fetched):
                self._buffered -= shadow.reserved
            meter.stop()
            self._end(job, meter)

    def noise_counts(self) -> dict[str, int]:
        """Endpoint -> fields this replica treats as noise now (for GET /shadow)."""
        return {
            endpoint: len(self.noisy(endpoint)) for endpoint in sorted(self._noise) if self.noisy(endpoint)
        }

    @property
    def epoch(self) -> int | None:
        """The report reset epoch this replica last saw (None before its first read)."""
        return self._epoch

    def _options_for(self, max_compare: int) -> Options:
        options = self._options.get(max_compare)
        if options is None:
            options = self._options[max_compare] = Options(max_compare, tuple(self._config.compare_headers))
        return options

    def noisy(self, endpoint: str) -> frozenset[str]:
        """Fields of an endpoint seen to vary in at least ``noise_threshold`` calibrations."""
        seen = self._noise.get(endpoint)
        if not seen:
            return frozenset()
        threshold = self._config.noise_threshold
        return frozenset(name for name, count in seen.items() if count >= threshold)

    def _settle_error(
        self,
        group: str,
        endpoint: str,
        request: MirrorRequest,
        primary: PrimaryResult,
        failure: BaseException,
    ) -> None:
        error = failure if isinstance(failure, UpstreamError) else translate("v2", failure)
        self._count(group, "error")
        self._batch.count(endpoint, group, "errors")
        self._add_sample(
            endpoint, request, primary, None, "error", [], detail=f"{error.kind}: {error.detail}"
        )

    def _answers(
        self, plan: GroupPolicy, endpoint: str, primary: PrimaryResult, shadow: Fetched
    ) -> tuple[Answer, Answer, EndpointRules, Options]:
        content_type, encoding, picked = _answer_headers(primary.headers, self._wanted_headers)
        v1 = Answer(primary.status, content_type, primary.body, picked, encoding)
        v2 = Answer(shadow.status, shadow.content_type, shadow.body, shadow.headers, shadow.encoding)
        rules_set = self._store.current.sections.get(RULES_SECTION)
        rules = rules_set.for_endpoint(endpoint) if isinstance(rules_set, RuleSet) else EndpointRules()
        return v1, v2, rules, self._options_for(plan.max_compare)

    def _grpc_answers(
        self, plan: GroupPolicy, endpoint: str, primary: PrimaryResult, shadow: Fetched
    ) -> tuple[GrpcAnswer, GrpcAnswer, EndpointRules, Options]:
        v1 = GrpcAnswer.from_raw(primary.status, primary.headers, primary.body, primary.trailers or ())
        v2 = GrpcAnswer(shadow.status, shadow.headers, shadow.body, shadow.trailers)
        rules_set = self._store.current.sections.get(RULES_SECTION)
        rules = rules_set.for_endpoint(endpoint) if isinstance(rules_set, RuleSet) else EndpointRules()
        return v1, v2, rules, self._options_for(plan.max_compare)

    def _settle_now(
        self,
        plan: GroupPolicy,
        endpoint: str,
        request: MirrorRequest,
        primary: PrimaryResult,
        shadow: Fetched | BaseException,
    ) -> tuple[Any, ...] | None:
        """Record the result of a request without calibration, here and now; or return the
        arguments of ``compare`` when only the thread can finish it."""
        group = plan.group
        if not isinstance(shadow, Fetched):
            self._settle_error(group, endpoint, request, primary, shadow)
            return None
        self._delta_children_for(group).observe(shadow.seconds - primary.seconds)
        if shadow.over_budget:
            self._result(group, "skipped")
            self._batch.count(endpoint, group, "skipped")
            return None
        v1, v2, rules, options = self._answers(plan, endpoint, primary, shadow)
        noisy = self.noisy(endpoint)
        outcome = quick_compare(v1, v2, rules, noisy, options)
        if outcome is None:
            return (v1, v2, rules, noisy, options)
        self._record(endpoint, group, outcome, request, primary, shadow)
        return None

    async def _settle(
        self,
        plan: GroupPolicy,
        endpoint: str,
        request: MirrorRequest,
        primary: PrimaryResult,
        results: list[Fetched | BaseException],
        meter: _Meter,
    ) -> None:
        group = plan.group
        shadow = results[0]
        second = results[1] if len(results) > 1 else None
        # (self._batch is swapped by every flush: never hold it across an await)
        if not isinstance(shadow, Fetched):
            self._settle_error(group, endpoint, request, primary, shadow)
            return
        self._delta_children_for(group).observe(shadow.seconds - primary.seconds)
        if shadow.over_budget:
            self._result(group, "skipped")
            self._batch.count(endpoint, group, "skipped")
            return
        v1: Answer | GrpcAnswer
        v2: Answer | GrpcAnswer
        method, decoder = "", None
        if shadow.grpc:
            method = grpc_method(request)
            meter.stop()
            decoder = await self._grpc.resolve(method)  # at most the reflection timeout, once per service
            meter.start()
            v1, v2, rules, options = self._grpc_answers(plan, endpoint, primary, shadow)
        else:
            v1, v2, rules, options = self._answers(plan, endpoint, primary, shadow)
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        if isinstance(second, Fetched) and second.body is not None and not second.over_budget:
            teach: tuple[Any, ...]
            if decoder is not None:
                v1g = GrpcAnswer(second.status, second.headers, second.body, second.trailers)
                teach = (learn_grpc, method, v1, v1g, rules, options, decoder)
            else:
                v1b = Answer(second.status, second.content_type, second.body, second.headers, second.encoding)
                teach = (learn, v1, v1b, rules, options)
            meter.stop()
            learnt = await loop.run_in_executor(self._executor, self._paced, *teach)
            meter.start()
            if learnt:
                seen = self._noise.setdefault(endpoint, {})
                for name in learnt:
                    seen[name] = seen.get(name, 0) + 1
                self._batch.noise[endpoint].update(learnt)
            # warm-up counts completed calibrations: until then every safe request calibrates, so
            # answers compared while the first calibration is in flight do not miss the noise
            self._calibrated[endpoint] = self._calibrated.get(endpoint, 0) + 1
        held = _Held(group, v1, v2, rules, options, request, primary, shadow, method, decoder)
        if second is not None and not self.calibrated(endpoint) and self._hold(endpoint, held):
            return  # pending: judged once the endpoint's calibration has run
        await self._judge(endpoint, held, meter)
        if self.calibrated(endpoint) and endpoint in self._pending:
            waiting = self._pending.pop(endpoint)
            for earlier in waiting:
                self._pending_bytes -= earlier.size
                self._batch.counts[endpoint]["pending"] -= 1
            for earlier in waiting:
                await self._judge(endpoint, earlier, meter)

    def calibrated(self, endpoint: str) -> bool:
        """Whether the endpoint's calibration has run (its first ``max(calibration_warmup,
        noise_threshold)`` calibrations completed), so its noise is known."""
        return self._calibrated.get(endpoint, 0) >= self._ready_after

    def _hold(self, endpoint: str, held: _Held) -> bool:
        """Keep a comparison pending (counted as ``pending`` in the report, never by the shadow
        gate); False when the bounds are full (then it is judged at once, as before calibration
        existed): per endpoint what the warm-up plus ``concurrency`` can have in flight, and a
        quarter of ``max_buffered_bytes`` over all endpoints."""
        waiting = self._pending.setdefault(endpoint, [])
        if len(waiting) >= self._ready_after + self._concurrency or (
            self._pending_bytes + held.size > self._budget // 4
        ):
            if not waiting:
                del self._pending[endpoint]
            return False
        waiting.append(held)
        self._pending_bytes += held.size
        self._batch.count(endpoint, held.group, "pending")
        return True

    def pending(self) -> dict[str, int]:
        """Endpoint -> comparisons waiting for its calibration on this replica."""
        return {endpoint: len(waiting) for endpoint, waiting in self._pending.items() if waiting}

    def _drop_pending(self, batch: ReportBatch) -> None:
        """Forget the comparisons still pending (a stop, a report reset), uncounting them."""
        for endpoint, waiting in self._pending.items():
            if waiting:
                batch.endpoint_group.setdefault(endpoint, waiting[0].group)
                batch.counts[endpoint]["pending"] -= len(waiting)
        self._pending.clear()
        self._pending_bytes = 0

    async def _judge(self, endpoint: str, held: _Held, meter: _Meter) -> None:
        noisy = self.noisy(endpoint)
        if held.decoder is not None:  # gRPC: decoded and compared in the thread unless identical
            assert isinstance(held.v1, GrpcAnswer) and isinstance(held.v2, GrpcAnswer)
            texts = None
            quick = quick_compare_grpc(held.v1, held.v2, held.options)
            if quick is None:
                meter.stop()
                loop = asyncio.get_running_loop()
                quick, texts = await loop.run_in_executor(
                    self._executor, self._paced, self._grpc_judgement, held, noisy
                )
                meter.start()
            self._record(endpoint, held.group, quick, held.request, held.primary, held.shadow, texts)
            return
        # small answers are compared here, on the loop (no thread hand-off, no GIL convoy with
        # the loop); large ones or ones that need deepdiff in the paced compare thread
        assert isinstance(held.v1, Answer) and isinstance(held.v2, Answer)
        outcome = quick_compare(held.v1, held.v2, held.rules, noisy, held.options)
        if outcome is None:
            meter.stop()
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(
                self._executor, self._paced, compare, held.v1, held.v2, held.rules, noisy, held.options
            )
            meter.start()
        assert outcome is not None
        self._record(endpoint, held.group, outcome, held.request, held.primary, held.shadow)

    def _grpc_judgement(
        self, held: _Held, noisy: frozenset[str]
    ) -> tuple[Outcome, tuple[str | None, str | None] | None]:
        """Runs in the compare thread: the outcome, and for a mismatch the two answers' messages
        as JSON text for the sample (decoded here, not on the loop)."""
        assert isinstance(held.v1, GrpcAnswer) and isinstance(held.v2, GrpcAnswer)
        assert held.decoder is not None
        outcome = compare_grpc(
            held.method, held.v1, held.v2, held.rules, noisy, held.options, held.decoder, self._grpc.count
        )
        texts = None
        if outcome.result == "mismatch" and self._config.max_samples:
            limit = self._config.sample_body_bytes
            texts = (
                sample_text(held.method, held.v1, held.decoder, limit),
                sample_text(held.method, held.v2, held.decoder, limit),
            )
        return outcome, texts

    def _paced(self, func: Any, *args: Any) -> Any:
        """Runs in the compare thread. Sleeps after each call so its CPU share stays bounded."""
        started = time.perf_counter()
        result = func(*args)
        share = self._config.compare_cpu_share
        if share < 1.0:
            time.sleep((time.perf_counter() - started) * (1.0 / share - 1.0))
        return result

    async def _fetch(
        self,
        upstream: Upstream | None,
        request: MirrorRequest,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        limit: int,
        fresh: bool = False,
    ) -> Fetched:
        """``fresh``: the one send again after a keep-alive race, on a new connection (as the
        primary's: never another idle pooled one)."""
        assert upstream is not None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                method = request.method.encode("latin-1")
                add_host = not any(name == b"host" for name, _ in headers)  # preserve_host: the client's
                response = await upstream.send(
                    method, request.raw_target, headers, body, add_host=add_host, fresh=fresh
                )
                return await self._read(response, limit, started)
        except Exception as exc:
            raise translate(upstream.version, exc) from exc

    async def _read(self, response: UpstreamResponse, limit: int, started: float) -> Fetched:
        """Read an HTTP/1.1 answer within the compare limit and the byte budget (``_take``)."""
        try:
            body, reserved, over_budget = await self._take(response.chunks(), limit)
        finally:
            response.close()  # a no-op after a complete answer; else the connection is dropped
        return self._fetched(response, body, limit, started, reserved, over_budget)

    async def _take(self, chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes | None, int, bool]:
        """An answer's body within the compare limit and the byte budget, for either protocol: its
        bytes are reserved as they arrive, given back here on failure or when a limit is passed,
        else by whoever settles the result. Returns the body (None past a limit), the bytes
        reserved, and whether it was the budget that stopped it."""
        data = bytearray()
        reserved = 0
        try:
            async for chunk in chunks:
                if len(data) + len(chunk) > limit or self._buffered + len(chunk) > self._budget:
                    self._buffered -= reserved
                    return None, 0, len(data) + len(chunk) <= limit
                self._buffered += len(chunk)
                reserved += len(chunk)
                data += chunk
        except BaseException:
            self._buffered -= reserved
            raise
        return bytes(data), reserved, False

    def _fetched(
        self, response: UpstreamResponse, body: bytes | None, limit: int, started: float, reserved: int,
        over_budget: bool = False,
    ) -> Fetched:  # fmt: skip
        wanted = self._wanted_headers
        content_type = encoding = b""
        picked = []
        for name, value in response.raw_headers:
            lower = name.lower()
            if lower == b"content-type":
                content_type = content_type or value
            elif lower == b"content-encoding":
                encoding = encoding or value
            text = lower.decode("latin-1")
            if text in wanted:
                picked.append((text, value.decode("latin-1")))
        return Fetched(
            status=response.status,
            content_type=content_type.decode("latin-1"),
            body=body if body is None or len(body) <= limit else None,
            seconds=time.perf_counter() - started,
            headers=tuple(picked),
            encoding=encoding.decode("latin-1"),
            reserved=reserved,
            over_budget=over_budget,
        )

    # --- recording --------------------------------------------------------------------------------

    def _delta_children_for(self, group: str) -> Any:
        child = self._delta_children.get(group)
        if child is None:
            child = self._delta_children[group] = self._metrics.shadow_latency_delta.labels(group)
        return child

    def _result(self, group: str, result: str) -> None:
        child = self._result_children.get((group, result))
        if child is None:
            child = self._result_children[(group, result)] = self._metrics.shadow_comparisons.labels(
                group, result
            )
        child.inc()

    def _record(
        self,
        endpoint: str,
        group: str,
        outcome: Outcome,
        request: MirrorRequest,
        primary: PrimaryResult,
        shadow: Fetched,
        texts: tuple[str | None, str | None] | None = None,
    ) -> None:
        batch = self._batch
        if outcome.result == "skipped":  # a body over the limit and nothing else differed
            self._result(group, "skipped")
            batch.count(endpoint, group, "skipped")
            return
        batch.count(endpoint, group, "compared")
        if outcome.result == "match":
            self._result(group, "match")
            batch.count(endpoint, group, "matched")
            return
        if outcome.result == "noise":
            self._result(group, "noise")
            batch.count(endpoint, group, "noise")
        else:
            self._result(group, "mismatch")
            batch.count(endpoint, group, "mismatched")
            for name in outcome.mismatched:
                batch.fields[endpoint][name] += 1
        for name in outcome.suppressed:
            batch.suppressed[endpoint][name] += 1
        if outcome.result == "mismatch":
            self._add_sample(endpoint, request, primary, shadow, "mismatch", outcome.differences, texts=texts)

    def _add_sample(
        self,
        endpoint: str,
        request: MirrorRequest,
        primary: PrimaryResult,
        shadow: Fetched | None,
        result: str,
        differences: list[Any],
        detail: str | None = None,
        texts: tuple[str | None, str | None] | None = None,
    ) -> None:
        """``texts``: the bodies as a reader should see them (a gRPC answer's decoded messages)."""
        cap = self._config.max_samples
        if not cap:
            return
        limit = self._config.sample_body_bytes
        payload = {
            "at": time.time(),
            "endpoint": endpoint,
            "method": request.method,
            "path": request.raw_target[:500].decode("latin-1"),
            "request_id": request.request_id,
            "result": result,
            "v1_status": primary.status,
            "v2_status": shadow.status if shadow is not None else None,
            "diff": [d.as_dict() for d in differences],
            "v1_body": texts[0] if texts else _truncate(primary.body, limit),
            "v2_body": texts[1] if texts else _truncate(shadow.body, limit) if shadow is not None else None,
            "detail": detail,
        }
        self._batch.sample(endpoint, orjson.dumps(payload), cap)

    # --- flushing ---------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write what was found since the last flush; on failure keep it for the next attempt."""
        batch, self._batch = self._batch, ReportBatch()
        if not batch:
            return
        try:
            await self._report.write(batch)
        except Exception as exc:  # noqa: BLE001 - Redis down: keep counting in memory
            self._batch.merge(batch, self._config.max_samples)
            self._once("flush", "could not write the shadow report (%r); will retry", exc)

    async def refresh_shared(self) -> None:
        """Take the noise counts of all replicas from Redis (replacing ours, so a forget reaches
        us) and, when a reset moved the epoch on, free the endpoint slots."""
        try:
            epoch, shared = await self._report.read_shared()
        except Exception as exc:  # noqa: BLE001
            self._once("read", "could not read shared shadow state (%r); will retry", exc)
            return
        if self._epoch is not None and epoch != self._epoch:
            # results from before the reset that were not written yet belong to the old report
            self._batch = ReportBatch()
            self._namer.reset()
            self._calibrated.clear()
            self._drop_pending(ReportBatch())  # the reset deleted their counts
        self._epoch = epoch
        noise: dict[str, dict[str, int]] = {e: dict(seen) for e, seen in shared.items()}
        for endpoint, pending in self._batch.noise.items():  # ours, not flushed yet
            seen = noise.setdefault(endpoint, {})
            for name, count in pending.items():
                seen[name] = seen.get(name, 0) + count
        self._noise = noise

    async def _flusher(self) -> None:
        interval = self._config.flush_interval_seconds
        refresh = self._settings.poll_interval_seconds
        last_read = 0.0
        # ends on the stop's cancel, or here when that cancel was swallowed (Python 3.11's
        # wait_for, inside redis-py, returns a result that arrived with the cancel)
        while self._jobs is not None:
            await asyncio.sleep(min(interval, refresh))
            await self.flush()
            now = time.monotonic()
            if now - last_read >= refresh:
                last_read = now
                await self.refresh_shared()

    def _once(self, key: str, message: str, *args: Any) -> None:
        """Log a problem the first time it is seen (never per request)."""
        if key not in self._reported_errors:
            self._reported_errors.add(key)
            log.warning(message, *args)

"""The Mirror: a per-request decision on the hot path, and workers that do everything else.

Hot path (``plan``, ``submit``, ``abandon``): a dict lookup in the snapshot, a random number, a
method check, a size check, a byte-budget check, ``put_nowait`` on a bounded queue. No Redis, no
awaits, no logging. A request planned while the queue is full is shed in ``plan`` already, so the
primary captures and builds nothing for it (at saturation most requests are shed: it must be cheap).

Memory is bounded in bytes, not only in requests: bodies held by queued jobs and answers being read
by workers count against ``max_buffered_bytes``. A job is admitted while held bytes stay under half
the budget (the other half is for answers being read); an answer that cannot be read within the
budget is not compared (``skipped``).

Workers (``settings.shadow.concurrency`` tasks) take a request off the queue, send it to v2 with
their own pools of the edge client (and, for a calibration sample, to v1 a second time), compare,
and add the result to an in-memory batch that a flusher writes to Redis with one pipeline per
interval. Nothing here can fail or delay the primary answer: the client already has it when
``submit`` is called.

Cost (issue 10): a request without a body is sent on a warm connection with the client's no-task
API (``send_now`` and a ``ResponseSink``); small answers are compared on the loop
(``quick_compare``: no thread hand-off, no GIL convoy with the loop) and only deepdiff's cases go
to the paced compare thread. Each mirrored request's own loop time is measured, and workers start
requests no closer than that average over ``compare_cpu_share``: under load the mirror keeps to
about that share of the loop and the queue sheds the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.background import cancel_and_wait
from proxy.control.snapshot import Snapshot
from proxy.control.store import ControlStore
from proxy.edge.client import UpstreamResponse
from proxy.edge.errors import UpstreamError
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
from proxy.shadow.report import ReportBatch, ReportStore
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


@dataclass(slots=True)
class _Job:
    plan: GroupPolicy
    request: MirrorRequest
    primary: PrimaryResult
    size: int  # bytes held against the budget while queued and handled


class _Retry(Exception):
    """A warm connection the backend had closed (keep-alive race): nothing was sent; send again."""


# an answer up to this size (and within the byte budget) is buffered whole by the connection and
# handed over in one piece; a larger or unsized one is read chunk by chunk by the worker
BUFFERED_ANSWER = 64 * 1024


class _Sink:
    """The ``ResponseSink`` of a mirrored request sent on a warm pooled connection (no task, no
    coroutine in the client): the worker waits on ``future`` for the answer.

    The budget bytes of a buffered answer are reserved when its head arrives, before the body
    does; ``reserved`` says how many, and the worker that owns the sink gives them back."""

    __slots__ = ("future", "conn", "reserved", "_mirror", "_limit")

    def __init__(
        self, mirror: ShadowMirror, future: asyncio.Future[UpstreamResponse], conn: Any, limit: int
    ) -> None:
        self.future = future
        self.conn = conn
        self.reserved = 0
        self._mirror = mirror
        self._limit = limit

    def head(self, response: UpstreamResponse) -> bool:
        future = self.future
        if future.done():  # the worker gave up (timeout, stop): it drops the connection
            return True
        length = response.content_length
        mirror = self._mirror
        if length is not None and length <= self._limit and mirror._buffered + length <= mirror._budget:
            mirror._buffered += length
            self.reserved = length
            return True
        future.set_result(response)  # the worker reads the body through chunks()
        return False

    def done(self, response: UpstreamResponse) -> None:
        if not self.future.done():
            self.future.set_result(response)

    def failed(self, error: UpstreamError, retryable: bool) -> None:
        if not self.future.done():
            self.future.set_exception(_Retry() if retryable else error)


class _Meter:
    """The event-loop time one mirrored request takes in its own code (stopped around awaits)."""

    __slots__ = ("spent", "_mark")

    def __init__(self) -> None:
        self.spent = 0.0
        self._mark = time.perf_counter()

    def stop(self) -> None:
        self.spent += time.perf_counter() - self._mark

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
    ) -> None:
        self._settings = settings
        self._store = store
        self._config = settings.shadow
        self._metrics = metrics
        self._report = report
        self._namer = EndpointNamer(routes, self._config.max_endpoints, self._config.endpoint_patterns)
        self._queue: asyncio.Queue[_Job] | None = None
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
        queue = self._queue
        if queue is not None and (queue.full() or self._buffered > self._admit_limit):
            # shed now: the primary then captures nothing and builds nothing for the mirror
            self._count(group, "dropped")
            return None
        return plan

    def submit(self, plan: Any, request: MirrorRequest, primary: PrimaryResult) -> None:
        queue = self._queue
        size = len(request.body) + (len(primary.body) if primary.body is not None else 0)
        if queue is None or self._buffered + size > self._admit_limit or queue.full():
            self._count(plan.group, "dropped")
            return
        queue.put_nowait(_Job(plan, request, primary, size))
        self._buffered += size

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
        self._queue = asyncio.Queue(maxsize=self._config.queue_size)
        # endpoints and noise other replicas (or earlier runs) found; bounded like any control read
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.refresh_shared(), timeout=settings.redis_timeout_seconds * 2)
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"strangler-shadow-{i}")
            for i in range(self._config.concurrency)
        ]
        self._tasks.append(asyncio.create_task(self._flusher(), name="strangler-shadow-flush"))

    async def stop(self) -> None:
        self._queue = None  # new submissions are dropped (counted) while we stop
        await cancel_and_wait(self._tasks)
        self._tasks = []
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
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def buffered_bytes(self) -> int:
        """Body bytes held by queued and in-flight mirrored requests (against max_buffered_bytes)."""
        return self._buffered

    async def _worker(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            job = await queue.get()
            try:
                delay = self._pace()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.handle(job.plan, job.request, job.primary)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a shadow bug must never stop the workers
                self._once(f"worker:{type(exc).__name__}", "shadow worker failed: %r", exc)
            finally:
                self._buffered -= job.size
                queue.task_done()

    def _pace(self) -> float:
        """Seconds this worker waits before starting its request. Starts are spaced by the
        average event-loop time of a mirrored request over ``compare_cpu_share``, so under load
        the mirror's own work on the loop stays near that share and the queue sheds the rest;
        idle time earns no credit (no bursts after a quiet spell)."""
        if self._share >= 1.0:
            return 0.0
        now = time.perf_counter()
        start = self._next_start if self._next_start > now else now
        self._next_start = start + self._cost / self._share
        return start - now

    def _measured(self, meter: _Meter) -> None:
        self._cost += (meter.spent - self._cost) * 0.05

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

    async def handle(self, plan: GroupPolicy, request: MirrorRequest, primary: PrimaryResult) -> None:
        """Mirror one request, compare, and record the result in the batch."""
        meter = _Meter()
        group = plan.group
        claimed = override_method(request.headers, request.raw_target)
        endpoint = self._namer.name(claimed or request.method, request.path)
        calibrate = (
            plan.calibration_percentage > 0
            and is_safe(request.method, request.headers, request.raw_target)
            and (
                self._calibrated.get(endpoint, 0) < self._config.calibration_warmup
                or _random() * 100.0 < plan.calibration_percentage
            )
        )
        headers = mirror_headers(request.headers, SHADOW_HEADER)
        body = request.body or None
        assert self._v2 is not None and self._v1 is not None
        self._count(group, "sent")
        limit = plan.max_compare
        results: list[Fetched | BaseException]
        if calibrate:
            v1_headers = [*headers, CALIBRATION_HEADER]
            meter.stop()
            sinks = (
                self._send_now(self._v2, request, headers, body, limit),
                self._send_now(self._v1, request, v1_headers, body, limit),
            )
            results = list(
                await asyncio.gather(
                    self._fetch(self._v2, request, headers, body, limit, sinks[0]),
                    self._fetch(self._v1, request, v1_headers, body, limit, sinks[1]),
                    return_exceptions=True,
                )
            )
        else:
            sink = self._send_now(self._v2, request, headers, body, limit)
            meter.stop()
            try:
                results = [await self._fetch(self._v2, request, headers, body, limit, sink)]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported as the mirror's error below
                results = [exc]
        meter.start()
        try:
            await self._settle(plan, endpoint, request, primary, results, meter)
        finally:
            for result in results:
                if isinstance(result, Fetched):
                    self._buffered -= result.reserved
            meter.stop()
            self._measured(meter)

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
        if isinstance(shadow, BaseException):
            error = shadow if isinstance(shadow, UpstreamError) else translate("v2", shadow)
            self._count(group, "error")
            self._batch.count(endpoint, group, "errors")
            self._add_sample(
                endpoint, request, primary, None, "error", [], detail=f"{error.kind}: {error.detail}"
            )
            return
        assert isinstance(shadow, Fetched)
        self._delta_children_for(group).observe(shadow.seconds - primary.seconds)
        if shadow.over_budget:
            self._result(group, "skipped")
            self._batch.count(endpoint, group, "skipped")
            return
        content_type, encoding, picked = _answer_headers(primary.headers, self._wanted_headers)
        v1 = Answer(primary.status, content_type, primary.body, picked, encoding)
        v2 = Answer(shadow.status, shadow.content_type, shadow.body, shadow.headers, shadow.encoding)
        v1b = None
        if isinstance(second, Fetched) and second.body is not None and not second.over_budget:
            v1b = Answer(second.status, second.content_type, second.body, second.headers, second.encoding)
        rules_set = self._store.current.sections.get(RULES_SECTION)
        rules = rules_set.for_endpoint(endpoint) if isinstance(rules_set, RuleSet) else EndpointRules()
        options = self._options_for(plan.max_compare)
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        learnt = set()
        if v1b is not None:
            meter.stop()
            learnt = await loop.run_in_executor(self._executor, self._paced, learn, v1, v1b, rules, options)
            meter.start()
            if learnt:
                seen = self._noise.setdefault(endpoint, {})
                for name in learnt:
                    seen[name] = seen.get(name, 0) + 1
                self._batch.noise[endpoint].update(learnt)
            # warm-up counts completed calibrations: until then every safe request calibrates, so
            # answers compared while the first calibration is in flight do not miss the noise
            self._calibrated[endpoint] = self._calibrated.get(endpoint, 0) + 1
        noisy = self.noisy(endpoint)
        # small answers are compared here, on the loop (no thread hand-off, no GIL convoy with
        # the loop); large ones or ones that need deepdiff in the paced compare thread
        outcome = quick_compare(v1, v2, rules, noisy, options)
        if outcome is None:
            meter.stop()
            outcome = await loop.run_in_executor(
                self._executor, self._paced, compare, v1, v2, rules, noisy, options
            )
            meter.start()
        assert outcome is not None
        self._record(endpoint, group, outcome, request, primary, shadow)

    def _paced(self, func: Any, *args: Any) -> Any:
        """Runs in the compare thread. Sleeps after each call so its CPU share stays bounded."""
        started = time.perf_counter()
        result = func(*args)
        share = self._config.compare_cpu_share
        if share < 1.0:
            time.sleep((time.perf_counter() - started) * (1.0 / share - 1.0))
        return result

    def _send_now(
        self, upstream: Upstream, request: MirrorRequest, headers: list[tuple[bytes, bytes]],
        body: bytes | None, limit: int,
    ) -> _Sink | None:  # fmt: skip
        """Send a request without a body on a warm pooled connection, now (the client's no-task
        path); None when there is none free (or a body to send): ``_fetch`` uses the pool's
        coroutine path then. A head the client refuses is refused there again, and reported."""
        if body is not None:
            return None
        pool = upstream.pool
        method = request.method.encode("latin-1")
        add_host = not any(name == b"host" for name, _ in headers)  # preserve_host: the client's
        try:
            head = pool.head_for(method, request.raw_target, headers, add_host, b"")
        except UpstreamError:
            return None
        conn = pool.take_idle()
        if conn is None:
            return None
        sink = _Sink(self, pool.loop.create_future(), conn, min(limit, BUFFERED_ANSWER))
        conn.send_now(head, method == b"HEAD", pool.limits.read_timeout, sink)
        return sink

    async def _fetch(
        self,
        upstream: Upstream,
        request: MirrorRequest,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        limit: int,
        sink: _Sink | None = None,
    ) -> Fetched:
        started = time.perf_counter()
        data = bytearray()
        over = over_budget = False
        reserved = 0
        try:
            async with asyncio.timeout(self._timeout):
                response = None
                if sink is not None:
                    try:
                        response = await sink.future
                    except _Retry:
                        response = None
                    except BaseException:
                        sink.future.cancel()  # a late head or answer is ignored, never reserved
                        sink.conn.abort()  # the exchange is unfinished: the connection is dropped
                        raise
                    finally:
                        reserved, sink.reserved = sink.reserved, 0
                if response is None:
                    method = request.method.encode("latin-1")
                    add_host = not any(name == b"host" for name, _ in headers)
                    response = await upstream.send(
                        method, request.raw_target, headers, body, add_host=add_host
                    )
                if reserved:  # buffered whole by the connection, its bytes reserved at its head
                    data += response.buffered()
                    if len(data) > limit:
                        over = True
                else:
                    try:
                        async for chunk in response.chunks():
                            if len(data) + len(chunk) > limit:
                                over = True
                                break
                            if self._buffered + len(chunk) > self._budget:
                                over_budget = True
                                break
                            self._buffered += len(chunk)
                            reserved += len(chunk)
                            data += chunk
                    finally:
                        response.close()  # a no-op after a complete answer; else the connection is dropped
        except Exception as exc:
            self._buffered -= reserved
            raise translate(upstream.version, exc) from exc
        except BaseException:
            self._buffered -= reserved
            raise
        if over or over_budget:
            self._buffered -= reserved
            reserved = 0
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
            body=None if over or over_budget else bytes(data),
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
            self._add_sample(endpoint, request, primary, shadow, "mismatch", outcome.differences)

    def _add_sample(
        self,
        endpoint: str,
        request: MirrorRequest,
        primary: PrimaryResult,
        shadow: Fetched | None,
        result: str,
        differences: list[Any],
        detail: str | None = None,
    ) -> None:
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
            "v1_body": _truncate(primary.body, limit),
            "v2_body": _truncate(shadow.body, limit) if shadow is not None else None,
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
        while True:
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

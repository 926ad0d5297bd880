"""The Mirror: a per-request decision on the hot path, and workers that do everything else.

Hot path (``plan``, ``submit``, ``abandon``): a dict lookup in the snapshot, a random number, a
method check, a size check, a byte-budget check, ``put_nowait`` on a bounded queue. No Redis, no
awaits, no logging.

Memory is bounded in bytes, not only in requests: bodies held by queued jobs and answers being read
by workers count against ``max_buffered_bytes``. A job is admitted while held bytes stay under half
the budget (the other half is for answers being read); an answer that cannot be read within the
budget is not compared (``skipped``).

Workers (``settings.shadow.concurrency`` tasks) take a request off the queue, send it to v2 with
their own pools of the edge client (and, for a calibration sample, to v1 a second time), compare in a small
thread pool whose CPU share is capped, and add the result to an in-memory batch that a flusher
writes to Redis with one pipeline per interval. Nothing here can fail or delay the primary answer:
the client already has it when ``submit`` is called.
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
from proxy.edge.errors import UpstreamError
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.shadow.compare import Answer, Options, Outcome, compare, learn
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


class _OverBudget(Exception):
    pass


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
        return plan

    def submit(self, plan: Any, request: MirrorRequest, primary: PrimaryResult) -> None:
        queue = self._queue
        size = len(request.body) + (len(primary.body) if primary.body is not None else 0)
        if queue is None or self._buffered + size > self._admit_limit:
            self._count(plan.group, "dropped")
            return
        try:
            queue.put_nowait(_Job(plan, request, primary, size))
        except asyncio.QueueFull:
            self._count(plan.group, "dropped")
            return
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
                await self.handle(job.plan, job.request, job.primary)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a shadow bug must never stop the workers
                self._once(f"worker:{type(exc).__name__}", "shadow worker failed: %r", exc)
            finally:
                self._buffered -= job.size
                queue.task_done()

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
        fetches = [self._fetch(self._v2, request, headers, body, plan.max_compare)]
        if calibrate:
            fetches.append(
                self._fetch(self._v1, request, [*headers, CALIBRATION_HEADER], body, plan.max_compare)
            )
        results = await asyncio.gather(*fetches, return_exceptions=True)
        try:
            await self._settle(plan, endpoint, request, primary, results)
        finally:
            for result in results:
                if isinstance(result, Fetched):
                    self._buffered -= result.reserved

    async def _settle(
        self,
        plan: GroupPolicy,
        endpoint: str,
        request: MirrorRequest,
        primary: PrimaryResult,
        results: list[Fetched | BaseException],
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
            learnt = await loop.run_in_executor(self._executor, self._paced, learn, v1, v1b, rules, options)
            if learnt:
                seen = self._noise.setdefault(endpoint, {})
                for name in learnt:
                    seen[name] = seen.get(name, 0) + 1
                self._batch.noise[endpoint].update(learnt)
            # warm-up counts completed calibrations: until then every safe request calibrates, so
            # answers compared while the first calibration is in flight do not miss the noise
            self._calibrated[endpoint] = self._calibrated.get(endpoint, 0) + 1
        noisy = self.noisy(endpoint)
        outcome = await loop.run_in_executor(
            self._executor, self._paced, compare, v1, v2, rules, noisy, options
        )
        self._record(endpoint, group, outcome, request, primary, shadow)

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
        upstream: Upstream,
        request: MirrorRequest,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        limit: int,
    ) -> Fetched:
        started = time.perf_counter()
        data = bytearray()
        over = over_budget = False
        reserved = 0
        try:
            async with asyncio.timeout(self._timeout):
                method = request.method.encode("latin-1")
                add_host = not any(name == b"host" for name, _ in headers)  # preserve_host: the client's
                response = await upstream.send(method, request.raw_target, headers, body, add_host=add_host)
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
        if over or over_budget:
            self._buffered -= reserved
            reserved = 0
        wanted = self._wanted_headers
        return Fetched(
            status=response.status,
            content_type=(response.header(b"content-type") or b"").decode("latin-1"),
            body=None if over or over_budget else bytes(data),
            seconds=time.perf_counter() - started,
            headers=tuple(
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in response.raw_headers
                if name.decode("latin-1").lower() in wanted
            ),
            encoding=(response.header(b"content-encoding") or b"").decode("latin-1"),
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

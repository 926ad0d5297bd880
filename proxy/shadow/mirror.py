"""The Mirror: a per-request decision on the hot path, and workers that do everything else.

Hot path (``plan``, ``submit``, ``abandon``): a dict lookup in the snapshot, a random number, a
method check, a size check, ``put_nowait`` on a bounded queue. No Redis, no awaits, no logging.

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
from proxy.capability import Deps
from proxy.control.snapshot import Snapshot
from proxy.edge.errors import UpstreamError
from proxy.shadow.compare import Answer, Outcome, compare, noise_between
from proxy.shadow.endpoints import EndpointNamer
from proxy.shadow.policy import RULES_SECTION, SAFE_METHODS, SECTION, EndpointRules, GroupPolicy, RuleSet
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


@dataclass(frozen=True, slots=True)
class Fetched:
    """A shadow-side answer; ``body`` is None when it was over the compare limit."""

    status: int
    content_type: str
    body: bytes | None
    seconds: float


@dataclass(slots=True)
class _Job:
    plan: GroupPolicy
    request: MirrorRequest
    primary: PrimaryResult


def _content_type(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"content-type":
            return value.decode("latin-1")
    return ""


def _truncate(body: bytes | None, limit: int) -> str | None:
    if body is None:
        return None
    text = body[:limit].decode("utf-8", "replace")
    return text + "..." if len(body) > limit else text


class ShadowMirror:
    """Implements ``proxy.traffic.hooks.Mirror`` and is a lifespan Component (start/stop)."""

    def __init__(self, deps: Deps, routes: RouteTable, report: ReportStore) -> None:
        self._deps = deps
        self._config = deps.settings.shadow
        self._metrics = deps.metrics
        self._report = report
        self._namer = EndpointNamer(routes, self._config.max_endpoints)
        self._queue: asyncio.Queue[_Job] | None = None
        self._batch = ReportBatch()
        self._noise: dict[str, set[str]] = {}
        self._calibrated: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._v1: Upstream | None = None
        self._v2: Upstream | None = None
        self._reported_errors: set[str] = set()
        self._timeout = self._config.timeout_seconds  # per mirrored request, whole
        # metric children resolved once for the closed label sets
        groups = deps.settings.group_names
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
        if queue is None:
            self._count(plan.group, "dropped")
            return
        try:
            queue.put_nowait(_Job(plan, request, primary))
        except asyncio.QueueFull:
            self._count(plan.group, "dropped")

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
        settings = self._deps.settings
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
                queue.task_done()

    async def handle(self, plan: GroupPolicy, request: MirrorRequest, primary: PrimaryResult) -> None:
        """Mirror one request, compare, and record the result in the batch."""
        group = plan.group
        endpoint = self._namer.name(request.method, request.path)
        calibrate = (
            request.method in SAFE_METHODS
            and plan.calibration_percentage > 0
            and (
                self._calibrated.get(endpoint, 0) < self._config.calibration_warmup
                or _random() * 100.0 < plan.calibration_percentage
            )
        )
        headers = [*request.headers, SHADOW_HEADER]
        body = request.body or None
        assert self._v2 is not None and self._v1 is not None
        self._count(group, "sent")
        fetches = [self._fetch(self._v2, request, headers, body, plan.max_compare)]
        if calibrate:
            fetches.append(
                self._fetch(self._v1, request, [*headers, CALIBRATION_HEADER], body, plan.max_compare)
            )
        results = await asyncio.gather(*fetches, return_exceptions=True)
        shadow = results[0]
        second = results[1] if calibrate else None
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
        if primary.body is None or shadow.body is None:
            self._result(group, "skipped")
            self._batch.count(endpoint, group, "skipped")
            return
        v1 = Answer(primary.status, _content_type(primary.headers), primary.body)
        v2 = Answer(shadow.status, shadow.content_type, shadow.body)
        v1b = None
        if isinstance(second, Fetched) and second.body is not None:
            v1b = Answer(second.status, second.content_type, second.body)
        snapshot = self._deps.store.current if self._deps.store is not None else None
        rules_set = snapshot.sections.get(RULES_SECTION) if snapshot is not None else None
        rules = rules_set.for_endpoint(endpoint) if isinstance(rules_set, RuleSet) else EndpointRules()
        noisy = frozenset(self._noise.get(endpoint, ()))
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        outcome, learnt = await loop.run_in_executor(
            self._executor, self._compare_paced, v1, v2, v1b, rules, noisy
        )
        if learnt:
            new = learnt - self._noise.get(endpoint, set())
            if new:
                self._noise.setdefault(endpoint, set()).update(new)
                self._batch.noise[endpoint].update(new)
        if v1b is not None:
            # warm-up counts completed calibrations: until then every safe request calibrates, so
            # answers compared while the first calibration is in flight do not miss the noise
            self._calibrated[endpoint] = self._calibrated.get(endpoint, 0) + 1
        self._record(endpoint, group, outcome, request, primary, shadow)

    def _compare_paced(
        self, v1: Answer, v2: Answer, v1b: Answer | None, rules: EndpointRules, noisy: frozenset[str]
    ) -> tuple[Outcome, set[str]]:
        """Runs in the compare thread. Sleeps after each comparison so its CPU share stays bounded."""
        started = time.perf_counter()
        learnt: set[str] = set()
        if v1b is not None:
            learnt = noise_between(v1, v1b, rules)
        outcome = compare(v1, v2, rules, noisy | learnt if learnt else noisy)
        share = self._config.compare_cpu_share
        if share < 1.0:
            time.sleep((time.perf_counter() - started) * (1.0 / share - 1.0))
        return outcome, learnt

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
        over = False
        try:
            async with asyncio.timeout(self._timeout):
                method = request.method.encode("latin-1")
                add_host = not any(name == b"host" for name, _ in headers)  # preserve_host: the client's Host
                response = await upstream.send(method, request.raw_target, headers, body, add_host=add_host)
                try:
                    async for chunk in response.chunks():
                        if len(data) + len(chunk) > limit:
                            over = True
                            break
                        data += chunk
                finally:
                    response.close()
        except Exception as exc:
            raise translate(upstream.version, exc) from exc
        return Fetched(
            status=response.status,
            content_type=(response.header(b"content-type") or b"").decode("latin-1"),
            body=None if over else bytes(data),
            seconds=time.perf_counter() - started,
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
        """Learn endpoint names and noise fields found by other replicas."""
        try:
            endpoints, noise = await self._report.read_shared()
        except Exception as exc:  # noqa: BLE001
            self._once("read", "could not read shared shadow state (%r); will retry", exc)
            return
        self._namer.learn(endpoints)
        for endpoint, fields in noise.items():
            self._noise.setdefault(endpoint, set()).update(fields)

    async def _flusher(self) -> None:
        interval = self._config.flush_interval_seconds
        last_read = 0.0
        while True:
            await asyncio.sleep(interval)
            await self.flush()
            now = time.monotonic()
            if now - last_read >= max(interval, 2.0):
                last_read = now
                await self.refresh_shared()

    def _once(self, key: str, message: str, *args: Any) -> None:
        """Log a problem the first time it is seen (never per request)."""
        if key not in self._reported_errors:
            self._reported_errors.add(key)
            log.warning(message, *args)

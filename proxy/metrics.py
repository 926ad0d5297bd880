"""Every metric in one recorder, with methods named for events (flagger's recorder shape).

Label values come from closed sets (version, group, method, status code, outcome); children are
resolved once and cached so the request path does a dict lookup and an increment, nothing more.
With several workers, prometheus-client's multiprocess mode is used (PROMETHEUS_MULTIPROC_DIR is
set by ``strangler serve`` before any worker starts), except for the per-request metrics: each
worker keeps them as plain tallies too and writes them to a file of its own in that directory
every ``TALLY_FLUSH_SECONDS``; a scrape sums those files (the answering worker's own tallies are
read live). prometheus-client's objects would cost about 3.4 us a request there (a lock and an
mmap write per metric), half again the whole request's own CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from bisect import bisect_left
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from proxy.control.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TALLY_FLUSH_SECONDS = 0.5  # how far another worker's request metrics may lag in a scrape
TALLY_FILE_PREFIX = "strangler_tallies_"

# sub-millisecond to 10 s, fine enough for p50/p95/p99 of a fast backend and of a slow one
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0,
)  # fmt: skip
DELTA_BUCKETS = (-1.0, -0.25, -0.1, -0.05, -0.01, -0.001, 0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 1.0, 5.0)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def close_code_label(code: int) -> str:
    if 1000 <= code <= 1015:
        return str(code)
    if 3000 <= code < 4000:
        return "3xxx"
    if 4000 <= code < 5000:
        return "4xxx"
    return "other"


BUCKET_LABELS = (*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf")  # as prometheus-client writes them
REQUESTS_HELP = "Requests answered, by version served."
ERRORS_HELP = "5xx answers and proxy-generated errors."
DURATION_HELP = "Time to the end of the answer, per version."
GROUP_HELP = "Requests routed, per route group and version."


def _new_row() -> list[Any]:
    """count, seconds, then one count per latency bucket and one over the last."""
    return [0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)


class RequestTallies:
    """The per-request metrics in plain lists, exported by ``collect`` when Prometheus scrapes.

    prometheus-client takes a lock for every increment: about 2 us a request for these four
    metrics, a few percent of the whole request at the proxy's speed. Here a request costs a dict
    lookup, a bisect and three list increments; the sums are made at scrape time (the event loop
    is the only writer, so no lock is needed)."""

    def __init__(self) -> None:
        # (group, version, method, status) -> [count, seconds, per-bucket counts..., over the last]
        self.rows: dict[tuple[str, str, str, int], list[Any]] = {}

    def add(self, group: str, version: str, method: str, status: int, seconds: float) -> None:
        key = (group, version, method, status)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _new_row()
        row[0] += 1
        row[1] += seconds
        row[2 + bisect_left(LATENCY_BUCKETS, seconds)] += 1  # "le": the first bound >= seconds

    def dump(self) -> str:
        """The rows as JSON, for the worker's tally file."""
        return json.dumps([[*key, *row] for key, row in self.rows.items()])

    def merge(self, dumped: str) -> None:
        """Add rows another worker dumped (counts are cumulative per worker, so files sum)."""
        width = len(LATENCY_BUCKETS) + 3  # count, seconds, one per bucket and the overflow
        for item in json.loads(dumped):
            key = (str(item[0]), str(item[1]), str(item[2]), int(item[3]))
            values = item[4:]
            if len(values) != width:
                continue  # a file from another bucket layout: skipped, never a failed scrape
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = _new_row()
            for index, value in enumerate(values):
                row[index] += value

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        requests: dict[tuple[str, str, str], int] = {}
        errors: dict[str, int] = {}
        groups: dict[tuple[str, str], int] = {}
        durations: dict[str, list[Any]] = {}
        for (group, version, method, status), row in list(self.rows.items()):
            count = row[0]
            label = method if method in KNOWN_METHODS else "OTHER"
            key = (version, label, str(status))
            requests[key] = requests.get(key, 0) + count
            groups[(group, version)] = groups.get((group, version), 0) + count
            if status >= 500:
                errors[version] = errors.get(version, 0) + count
            else:
                errors.setdefault(version, 0)
            total = durations.setdefault(version, [0.0] + [0] * (len(LATENCY_BUCKETS) + 1))
            total[0] += row[1]
            for i, n in enumerate(row[2:], 1):
                total[i] += n
        req_f, err_f, dur_f, grp_f = self._families()
        for labels, n in requests.items():
            req_f.add_metric(list(labels), n)
        for version, n in errors.items():
            err_f.add_metric([version], n)
        for labels2, n in groups.items():
            grp_f.add_metric(list(labels2), n)
        for version, total in durations.items():
            running = 0
            buckets = []
            for bound, n in zip(BUCKET_LABELS, total[1:], strict=True):
                running += n
                buckets.append((bound, running))
            dur_f.add_metric([version], buckets, total[0])
        return [req_f, err_f, dur_f, grp_f]

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily("http_requests", REQUESTS_HELP, labels=["version", "method", "code"]),
            CounterMetricFamily("http_errors", ERRORS_HELP, labels=["version"]),
            HistogramMetricFamily("http_request_duration_seconds", DURATION_HELP, labels=["version"]),
            CounterMetricFamily("strangler_group_requests", GROUP_HELP, labels=["group", "version"]),
        ]


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The recorder. One per process; tests make their own, so nothing is registered globally."""

    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        gauge_mode: dict[str, Any] = {"multiprocess_mode": "mostrecent"} if self.multiprocess else {}
        max_mode: dict[str, Any] = {"multiprocess_mode": "max"} if self.multiprocess else {}

        # names kept stable on purpose: users' dashboards query these: plain tallies exported at scrape
        # time (RequestTallies); with several workers, summed from every worker's tally file.
        self._tallies = RequestTallies()
        self._flushed = ""  # the tallies as last written to this worker's file
        self._extra: list[Any] = []  # collectors added by the process's owner (the supervisor's counters)
        if not self.multiprocess:
            reg.register(self._tallies)  # type: ignore[arg-type]
        self.split_percentage = Gauge(
            "strangler_split_percentage", "Share of traffic for v2 in force, per route group.",
            ["group"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.fallbacks = Counter(
            "strangler_fallbacks_total", "Requests for v2 served by v1 because v2 could not be reached.",
            ["group"], registry=reg,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "strangler_upstream_errors_total", "Upstream failures by kind.",
            ["version", "kind"], registry=reg,
        )  # fmt: skip
        self.invalid_values = Counter(
            "strangler_invalid_control_values_total", "Control values in Redis rejected (last good kept).",
            ["key"], registry=reg,
        )  # fmt: skip
        self.parity_in_sync = Gauge(
            "strangler_parity_in_sync", "Last `strangler parity` result per table: 1 equal, 0 not.",
            ["table"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.parity_differences = Gauge(
            "strangler_parity_differences", "Rows missing, extra or changed in the last parity run.",
            ["table"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.redis_errors = Counter(
            "strangler_control_redis_errors_total",
            "Failed control refreshes (Redis down or slow).",
            registry=reg,
        )
        self.snapshot_age_gauge = Gauge(
            "strangler_snapshot_age_seconds", "Age of the control snapshot in use.",
            registry=reg, **max_mode,
        )  # fmt: skip
        self.redis_up = Gauge(
            "strangler_redis_up", "1 when the last control refresh reached Redis.",
            registry=reg, **gauge_mode,
        )  # fmt: skip
        self.rejected = Counter(
            "strangler_rejected_requests_total", "Requests refused by the proxy itself, by reason.",
            ["reason"], registry=reg,
        )  # fmt: skip
        self.client_disconnects = Counter(
            "strangler_client_disconnects_total", "Clients gone before the answer was complete.",
            ["version", "stage"], registry=reg,
        )  # fmt: skip
        # WebSockets: never in the request latency; a failed handshake is an answer
        sum_mode: dict[str, Any] = {"multiprocess_mode": "livesum"} if self.multiprocess else {}
        self.ws_opened_total = Counter(
            "strangler_websocket_connections_total", "WebSocket connections relayed, per version.",
            ["version"], registry=reg,
        )  # fmt: skip
        self.ws_open = Gauge(
            "strangler_websocket_open_connections", "WebSocket connections open now, per version.",
            ["version"], registry=reg, **sum_mode,
        )  # fmt: skip
        self.ws_closed_total = Counter(
            "strangler_websocket_closed_total", "WebSocket connections closed, by version and close code.",
            ["version", "code"], registry=reg,
        )  # fmt: skip
        self.ws_messages = Counter(
            "strangler_websocket_messages_total", "WebSocket messages relayed, by version and direction.",
            ["version", "direction"], registry=reg,
        )  # fmt: skip
        self.ws_handshake_failures = Counter(
            "strangler_websocket_handshake_failures_total",
            "Upgrades that did not become a relayed connection, by version and reason.",
            ["version", "reason"], registry=reg,
        )  # fmt: skip
        self.ws_drained_total = Counter(
            "strangler_websocket_drained_total",
            "v2 WebSocket connections closed with 1012 because the split moved them to v1.",
            ["group", "reason"], registry=reg,
        )  # fmt: skip

        # shadow
        self.shadow_requests = Counter(
            "strangler_shadow_requests_total", "Mirrored requests by outcome.",
            ["group", "outcome"], registry=reg,
        )  # fmt: skip
        self.shadow_comparisons = Counter(
            "strangler_shadow_comparisons_total", "Shadow comparisons by result.",
            ["group", "result"], registry=reg,
        )  # fmt: skip
        self.shadow_grpc_decoding = Counter(
            "strangler_shadow_grpc_decoding_total",
            "Mirrored gRPC answers by how their messages were read (descriptor, wire, wire_fallback) "
            "or what stopped it (truncated, malformed, too_large, corrupt_compressed, unknown_encoding, "
            "not_protobuf, reflection_failed).",
            ["outcome"], registry=reg,
        )  # fmt: skip
        self.shadow_latency_delta = Histogram(
            "strangler_shadow_latency_delta_seconds", "v2 minus v1 latency of mirrored requests.",
            ["group"], buckets=DELTA_BUCKETS, registry=reg,
        )  # fmt: skip

        # canary
        self.rollbacks = Counter(
            "strangler_rollbacks_total", "Automatic and manual rollbacks.", ["group", "reason"], registry=reg
        )
        self.rollout_step = Gauge(
            "strangler_rollout_step", "Current rollout step percentage (-1 when no rollout).",
            ["group"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.rollout_awaiting = Gauge(
            "strangler_rollout_awaiting_approval",
            "1 while a rollout holds at an approval step (25! in the ladder) that nobody approved yet.",
            ["group"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.check_verdicts = Counter(
            "strangler_check_verdicts_total", "Health check verdicts.", ["group", "verdict"], registry=reg
        )
        self.judged_error_rate = Gauge(
            "strangler_judged_error_rate", "Error rate in the last judged window.",
            ["group", "version"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.judged_p95 = Gauge(
            "strangler_judged_p95_seconds", "p95 latency in the last judged window.",
            ["group", "version"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.gate_checks = Counter(
            "strangler_canary_gate_checks_total", "Metric gate evaluations by result.",
            ["group", "gate", "result"], registry=reg,
        )  # fmt: skip
        self.gate_value = Gauge(
            "strangler_canary_gate_value", "Last value a metric gate read (NaN: none).",
            ["group", "gate"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.canary_evidence = Gauge(
            "strangler_canary_evidence",
            "Statistical judge: evidence against v2 as a share of its rollback threshold (1 rolls back).",
            ["group", "test"], registry=reg, **gauge_mode,
        )  # fmt: skip
        self.alerts = Counter(
            "strangler_alerts_total", "Alert deliveries by target kind and outcome.",
            ["target", "outcome"], registry=reg,
        )  # fmt: skip

        # deprecation
        self.deprecated_requests = Counter(
            "strangler_deprecated_requests_total", "Requests to deprecated endpoints.",
            ["rule", "phase"], registry=reg,
        )  # fmt: skip

        # gRPC calls (proxy/traffic/duplex.py): grpc_method is bounded per process (grpc.max_method_labels)
        self.grpc_requests = Counter(
            "strangler_grpc_requests_total", "gRPC calls by method and the grpc-status they ended with.",
            ["group", "version", "grpc_method", "grpc_code"], registry=reg,
        )  # fmt: skip
        self.grpc_duration = Histogram(
            "strangler_grpc_request_duration_seconds", "gRPC call time, from the request to its trailers.",
            ["group", "version", "grpc_method"], buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self._grpc_children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

        # reliability: what a task leak would show; computed at scrape time, free per request
        if not self.multiprocess:
            self.loop_tasks = Gauge(
                "strangler_event_loop_tasks", "asyncio tasks alive: requests in flight, background loops.",
                registry=reg,
            )  # fmt: skip
            self.loop_tasks.set_function(_count_loop_tasks)

    # --- request path -------------------------------------------------------------------------

    def request_done(self, group: str, version: str, method: str, status: int, seconds: float) -> None:
        """One answered request: a dict lookup, a bisect and three list increments."""
        self._tallies.add(group, version, method, status, seconds)

    def fallback(self, group: str) -> None:
        self.fallbacks.labels(group).inc()

    def upstream_error(self, version: str, kind: str) -> None:
        self.upstream_errors.labels(version, kind).inc()

    def rejected_request(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def client_disconnected(self, version: str, stage: str) -> None:
        self.client_disconnects.labels(version, stage).inc()

    def grpc_call(self, group: str, version: str, method: str, code: str, seconds: float) -> None:
        """One gRPC call ended (labels from closed sets: the method bounded, the code a name);
        children resolved once per label set."""
        key = (group, version, method, code)
        children = self._grpc_children.get(key)
        if children is None:
            children = self._grpc_children[key] = (
                self.grpc_requests.labels(group, version, method, code),
                self.grpc_duration.labels(group, version, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    # --- websockets -------------------------------------------------------------------------------

    def ws_opened(self, version: str) -> None:
        self.ws_opened_total.labels(version).inc()
        self.ws_open.labels(version).inc()

    def ws_closed(self, version: str, code: int) -> None:
        """Close codes outside the registered set are labelled by range (bounded cardinality)."""
        self.ws_open.labels(version).dec()
        self.ws_closed_total.labels(version, close_code_label(code)).inc()

    def ws_message_counters(self, version: str) -> tuple[Any, Any]:
        """(to upstream, to client) children, resolved once per connection."""
        return self.ws_messages.labels(version, "to_upstream"), self.ws_messages.labels(version, "to_client")

    def ws_handshake_failed(self, version: str, reason: str) -> None:
        self.ws_handshake_failures.labels(version, reason).inc()

    def ws_drained(self, group: str, reason: str) -> None:
        self.ws_drained_total.labels(group, reason).inc()

    # --- control ------------------------------------------------------------------------------

    def control_refreshed(self, snapshot: Snapshot, groups: list[str]) -> None:
        self.redis_up.set(1)
        self.split_percentage.labels("default").set(snapshot.global_percentage)
        for group in groups:
            self.split_percentage.labels(group).set(snapshot.percentage(group))

    def control_redis_error(self) -> None:
        self.redis_errors.inc()
        self.redis_up.set(0)

    def snapshot_age(self, seconds: float | None) -> None:
        self.snapshot_age_gauge.set(-1 if seconds is None else seconds)

    def parity_results(self, results: dict[str, dict[str, Any]]) -> None:
        """Replace the parity gauges with the tables now in Redis (a reset table disappears)."""
        self.parity_in_sync.clear()
        self.parity_differences.clear()
        for table, result in results.items():
            self.parity_in_sync.labels(table).set(1 if result["status"] == "equal" else 0)
            self.parity_differences.labels(table).set(result["differences"])

    def invalid_control_value(self, key: str) -> None:
        self.invalid_values.labels(key).inc()

    # --- canary ------------------------------------------------------------------------------------

    def check_judged(self, group: str, verdict: str, figures: dict[str, dict[str, Any]]) -> None:
        """One health check: its verdict, and the judged figures of each version that had traffic."""
        self.check_verdicts.labels(group, verdict).inc()
        for version, numbers in figures.items():
            if numbers.get("requests"):
                self.judged_error_rate.labels(group, version).set(numbers["error_rate"])
                self.judged_p95.labels(group, version).set(numbers["p95_seconds"])

    def gate_checked(self, group: str, gate: str, result: str, value: float | None) -> None:
        """One metric gate evaluation (labels: configured group and gate names, closed results)."""
        self.gate_checks.labels(group, gate, result).inc()
        self.gate_value.labels(group, gate).set(float("nan") if value is None else value)

    def judge_evidence(self, group: str, evidence: dict[str, float]) -> None:
        """The statistical judge's evidence per test (errors, latency): log likelihood ratio over
        the threshold, so 1 is where it rolls back."""
        for test, value in evidence.items():
            self.canary_evidence.labels(group, test).set(value)

    def rolled_back(self, group: str, reason: str) -> None:
        self.rollbacks.labels(group, reason).inc()

    def rollout_at(self, group: str, percentage: float | None, awaiting_approval: bool = False) -> None:
        self.rollout_step.labels(group).set(-1 if percentage is None else percentage)
        self.rollout_awaiting.labels(group).set(1 if awaiting_approval else 0)

    def alert_delivery(self, target: str, outcome: str) -> None:
        self.alerts.labels(target, outcome).inc()

    # --- exposition ---------------------------------------------------------------------------

    def add_collector(self, collector: Any) -> None:
        """A collector read at scrape time, in both modes (the parent's counters, in shared memory)."""
        self._extra.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        """Prometheus text; in multiprocess mode the sum over every worker's files."""
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            registry.register(self._all_tallies())  # type: ignore[arg-type]
            for collector in self._extra:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def _all_tallies(self) -> RequestTallies:
        """This worker's tallies, live, plus every other worker's last flushed file (a worker that
        died keeps its counts there, so counters never go back)."""
        total = RequestTallies()
        total.rows = {key: list(row) for key, row in self._tallies.rows.items()}
        directory = multiprocess_dir()
        mine = f"{TALLY_FILE_PREFIX}{os.getpid()}.json"
        if directory is not None:
            for path in Path(directory).glob(f"{TALLY_FILE_PREFIX}*.json"):
                if path.name == mine:
                    continue
                with contextlib.suppress(OSError, ValueError, TypeError, IndexError):
                    total.merge(path.read_text())
        return total

    def flush_tallies(self) -> None:
        """Write this worker's tallies for the others' scrapes (atomic: a temp file, renamed)."""
        directory = multiprocess_dir()
        if directory is None:
            return
        dumped = self._tallies.dump()
        if dumped == self._flushed:
            return  # nothing answered since the last write: an idle worker writes nothing
        target = Path(directory) / f"{TALLY_FILE_PREFIX}{os.getpid()}.json"
        temp = target.with_suffix(".tmp")
        temp.write_text(dumped)
        os.replace(temp, target)
        self._flushed = dumped

    async def run_tally_flusher(self, interval: float = TALLY_FLUSH_SECONDS) -> None:
        """With several workers: flush every ``interval`` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval)
                with contextlib.suppress(OSError):
                    self.flush_tallies()
        finally:
            with contextlib.suppress(OSError):
                self.flush_tallies()


def _count_loop_tasks() -> float:
    """Tasks of the running loop (the scrape runs on it); -1 when read outside a loop."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return -1.0

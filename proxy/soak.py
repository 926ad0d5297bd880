"""``strangler soak``: hold a fixed request rate through the proxy for a long time, mirroring on.

A benchmark answers "how fast"; a soak answers "does it stay healthy": errors, latency percentiles
per interval (does p99 creep up?), and the proxy's resident memory at the start and the end (does
it leak?). By default it starts everything itself: two small JSON backends (v1 and v2, in one
child process), and ``strangler serve`` with shadow mirroring of GET and POST at 100% and an
embedded Redis. ``--target``/``--pid`` soak a proxy you started instead.

The load is open-loop: requests are launched on a fixed schedule whether or not earlier ones have
finished (a closed loop would slow down with the proxy and hide latency), with a cap on requests
in flight; launches skipped at the cap are reported as "behind", separately from errors.

The verdict: PASS when the error rate stays at or under ``--max-error-rate`` (percent of the
requests sent) and the proxy's RSS grows by at most ``--max-rss-growth`` MB after the first
interval (the warm-up: pools, caches and the allocator settle there); exit 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from proxy.control.embedded import free_port

MAX_IN_FLIGHT = 512
MAX_ERROR_RATE = 0.1  # percent of the requests sent: the default verdict threshold
MAX_RSS_GROWTH_MB = 50.0  # after the warm-up interval: the default verdict threshold


@dataclass
class Interval:
    """Figures for one reporting interval."""

    t_end: float
    sent: int = 0
    errors: int = 0
    behind: int = 0
    latencies: list[float] = field(default_factory=list)
    rss: int = 0

    @property
    def error_rate(self) -> float:
        """Errors per request sent, in percent."""
        return 100.0 * self.errors / self.sent if self.sent else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SoakReport:
    seconds: float
    rate: float
    intervals: list[Interval]
    rss_start: int
    rss_warm: int
    rss_end: int
    errors_by_kind: dict[str, int]
    mirrored: dict[str, float] | None = None

    @property
    def sent(self) -> int:
        return sum(i.sent for i in self.intervals)

    @property
    def errors(self) -> int:
        return sum(i.errors for i in self.intervals)

    @property
    def behind(self) -> int:
        return sum(i.behind for i in self.intervals)

    @property
    def error_rate(self) -> float:
        """Errors per request sent over the whole run, in percent."""
        return 100.0 * self.errors / self.sent if self.sent else 0.0

    @property
    def rss_growth_mb(self) -> float:
        """RSS growth after the warm-up interval, in MB (0 when RSS is not measured)."""
        return (self.rss_end - self.rss_warm) / 2**20 if self.rss_end and self.rss_warm else 0.0

    def failures(self, max_error_rate: float, max_rss_growth_mb: float) -> list[str]:
        """What breaks the thresholds, one phrase each; empty: the soak passed."""
        found = []
        if self.sent == 0:
            found.append("no request was sent")
        if self.error_rate > max_error_rate:
            found.append(f"error rate {self.error_rate:.2f}% > {max_error_rate:g}%")
        if self.rss_growth_mb > max_rss_growth_mb:
            found.append(f"RSS grew {self.rss_growth_mb:.1f} MB after warm-up > {max_rss_growth_mb:g} MB")
        return found

    def verdict_line(self, max_error_rate: float, max_rss_growth_mb: float) -> str:
        failures = self.failures(max_error_rate, max_rss_growth_mb)
        if failures:
            return "soak: FAIL: " + "; ".join(failures)
        return (
            f"soak: PASS: error rate {self.error_rate:.2f}% <= {max_error_rate:g}%, "
            f"RSS growth after warm-up {self.rss_growth_mb:.1f} MB <= {max_rss_growth_mb:g} MB"
        )

    def overall(self) -> Interval:
        merged = Interval(t_end=self.seconds)
        for interval in self.intervals:
            merged.latencies.extend(interval.latencies)
        return merged

    def as_dict(self) -> dict[str, Any]:
        overall = self.overall()
        return {
            "seconds": self.seconds,
            "target_rate": self.rate,
            "sent": self.sent,
            "achieved_rate": round(self.sent / self.seconds, 1) if self.seconds else 0,
            "errors": self.errors,
            "error_rate_percent": round(self.error_rate, 3),
            "errors_by_kind": self.errors_by_kind,
            "behind_schedule": self.behind,
            "p50_ms": round(overall.percentile(0.50) * 1000, 2),
            "p95_ms": round(overall.percentile(0.95) * 1000, 2),
            "p99_ms": round(overall.percentile(0.99) * 1000, 2),
            "rss_start_mb": round(self.rss_start / 2**20, 1),
            "rss_after_warmup_mb": round(self.rss_warm / 2**20, 1),
            "rss_end_mb": round(self.rss_end / 2**20, 1),
            "rss_growth_mb": round((self.rss_end - self.rss_start) / 2**20, 1),
            "rss_growth_after_warmup_mb": round((self.rss_end - self.rss_warm) / 2**20, 1),
            "mirrored": self.mirrored,
        }


# --- the backends and the proxy it starts ----------------------------------------------------------


def serve_backends(port_file: str) -> None:
    """Child process: v1 and v2 on two ports, deterministic JSON (so mirrored answers compare equal)."""
    from aiohttp import web

    def build(name: str) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            if request.can_read_body:
                await request.read()
            item = request.match_info.get("tail", "")
            return web.json_response({"item": item, "method": request.method, "tags": ["a", "b"], "n": 42})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def main() -> None:
        ports = []
        for name in ("v1", "v2"):
            runner = web.AppRunner(build(name), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        tmp = port_file + ".tmp"
        Path(tmp).write_text(json.dumps(ports))
        os.replace(tmp, port_file)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


class StackError(RuntimeError):
    """The stack the soak starts did not come up: one line for the CLI."""


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.1)
    raise StackError(f"soak: {what} did not come up within {timeout:.0f}s")


class Stack:
    """Backends + ``strangler serve`` in a temporary directory; stopped in reverse order."""

    def __init__(self, split: float, mirror: bool = True) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="strangler-soak-"))
        self.split = split
        self.mirror = mirror
        self.procs: list[subprocess.Popen[bytes]] = []
        self.url = ""
        self.pid = 0

    def start(self) -> Stack:
        import httpx
        import yaml

        port_file = self.dir / "backends.json"
        backends = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from proxy.soak import serve_backends; serve_backends({str(port_file)!r})",
            ]
        )
        self.procs.append(backends)
        _wait(port_file.exists, 20, "the backends")
        v1, v2 = json.loads(port_file.read_text())
        port = free_port()
        config = {
            "v1_url": f"http://127.0.0.1:{v1}",
            "v2_url": f"http://127.0.0.1:{v2}",
            "port": port,
            "embedded_redis_dir": str(self.dir / "redis"),
            "embedded_redis_port": 0,
            "default_percentage": self.split,
            "log_level": "warning",
            "canary": {"enabled": False},
            "shadow": {"enabled": self.mirror, "methods": ["GET", "POST"], "sample_percentage": 100},
        }
        (self.dir / "strangler.yaml").write_text(yaml.safe_dump(config))
        log = open(self.dir / "proxy.log", "wb")  # noqa: SIM115 - lives as long as the proxy
        # Only the config file above configures this proxy: an exported STRANGLER_REDIS_URL (the
        # demo suggests one) must never attach the soak's proxy to a live Redis.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STRANGLER_")}
        proxy = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve", "--config", str(self.dir / "strangler.yaml")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        self.procs.append(proxy)
        self.url = f"http://127.0.0.1:{port}"
        self.pid = proxy.pid
        _wait(
            lambda: httpx.get(self.url + "/_strangler/health", timeout=1).status_code == 200, 30, "the proxy"
        )
        return self

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_of(pid: int) -> int:
    """Resident memory of the proxy: ``strangler serve``'s parent and its workers (not the embedded
    Redis it may have started)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *(c for c in root.children(recursive=True) if "redis" not in c.name())]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += int(proc.memory_info().rss)
    return total


def mirrored_count(url: str) -> dict[str, float] | None:
    """Shadow outcomes from the proxy's metrics (sent, dropped, error, ...), or None if unreadable."""
    import httpx

    try:
        text = httpx.get(url + "/_strangler/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    outcomes: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("strangler_shadow_requests_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0] if 'outcome="' in line else "?"
            outcomes[outcome] = outcomes.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return outcomes


# --- the load ---------------------------------------------------------------------------------------


async def drive(
    url: str, seconds: float, rate: float, interval: float, pid: int | None, out: Any
) -> tuple[list[Interval], dict[str, int]]:
    """Open-loop load at ``rate`` req/s; prints one line per ``interval``."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=30)
    intervals: list[Interval] = []
    errors: dict[str, int] = {}
    in_flight: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    current = Interval(t_end=interval)
    body = json.dumps({"order": [1, 2, 3], "note": "soak"}).encode()

    async def one(session: aiohttp.ClientSession, n: int, bucket: Interval) -> None:
        t0 = time.perf_counter()
        user = f"user-{n % 5000}"
        try:
            if n % 5 == 0:
                response = await session.post(f"{url}/api/orders", data=body, headers={"X-User-ID": user,
                                               "Content-Type": "application/json"})  # fmt: skip
            else:
                response = await session.get(f"{url}/api/items/{n % 1000}", headers={"X-User-ID": user})
            async with response:
                await response.read()
                if response.status >= 400:
                    bucket.errors += 1
                    errors[f"status {response.status}"] = errors.get(f"status {response.status}", 0) + 1
        except Exception as exc:  # noqa: BLE001 - every failure is a figure in the report
            bucket.errors += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        bucket.latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        n = 0
        while True:
            now = time.monotonic() - start
            if now >= seconds:
                break
            due = int(now * rate) - n
            for _ in range(max(0, due)):
                if len(in_flight) >= MAX_IN_FLIGHT:
                    current.behind += 1
                else:
                    task = asyncio.create_task(one(session, n, current))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    current.sent += 1
                n += 1
            if now >= current.t_end:
                current.rss = rss_of(pid) if pid else 0
                intervals.append(current)
                _print_interval(out, current, interval)
                current = Interval(t_end=current.t_end + interval)
            await asyncio.sleep(0.002)
        if in_flight:
            await asyncio.wait(in_flight, timeout=35)
        current.rss = rss_of(pid) if pid else 0
        if current.sent:
            intervals.append(current)
            _print_interval(out, current, interval)
    return intervals, errors


def _print_interval(out: Any, iv: Interval, length: float) -> None:
    print(
        f"t={iv.t_end:7.1f}s  sent={iv.sent:6d}  rate={iv.sent / length:7.1f}/s  errors={iv.errors:4d}  "
        f"error_rate={iv.error_rate:6.2f}%  behind={iv.behind:4d}  p50={iv.percentile(0.5) * 1000:6.2f}ms  "
        f"p95={iv.percentile(0.95) * 1000:6.2f}ms  p99={iv.percentile(0.99) * 1000:7.2f}ms  "
        f"rss={iv.rss / 2**20:6.1f}MB",
        file=out,
        flush=True,
    )


def run_soak(
    seconds: float,
    rate: float,
    interval: float | None = None,
    target: str | None = None,
    pid: int | None = None,
    split: float = 0.0,
    out: Any = sys.stdout,
    mirror: bool = True,
) -> SoakReport:
    """Start the stack (unless ``target``), drive the load, stop what was started, report."""
    interval = interval or max(1.0, min(30.0, seconds / 20))
    stack: Stack | None = None
    mirroring = "mirroring GET/POST to v2" if mirror or target else "no mirroring"  # target: its own config
    if target is None:
        stack = Stack(split, mirror).start()
        target, pid = stack.url, stack.pid
    try:
        random.seed(0)
        rss_start = rss_of(pid) if pid else 0
        print(f"soak: {rate:g} req/s for {seconds:g}s against {target} ({mirroring}), "
              f"proxy pid {pid}, RSS {rss_start / 2**20:.1f} MB", file=out, flush=True)  # fmt: skip
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
            runner = asyncio.Runner()
        with runner:
            intervals, errors = runner.run(drive(target, seconds, rate, interval, pid, out))
        rss_end = rss_of(pid) if pid else 0
        warm = intervals[0].rss if intervals else rss_start
        report = SoakReport(
            seconds, rate, intervals, rss_start, warm, rss_end, errors, mirrored_count(target)
        )
    finally:
        if stack is not None:
            stack.stop()
    return report


def _bad_option(
    seconds: float,
    rate: float,
    interval: float | None,
    target: str | None,
    split: float,
    max_error_rate: float,
    max_rss_growth: float,
) -> str | None:
    """The first option that cannot run, as the one line the user sees (before anything starts)."""
    if not seconds > 0:
        return f"--seconds must be above 0 (got {seconds:g})"
    if not rate > 0:
        return f"--rate must be above 0 requests per second (got {rate:g})"
    if interval is not None and not interval > 0:
        return f"--interval must be above 0 seconds (got {interval:g})"
    if not 0 <= split <= 100:
        return f"--split must be between 0 and 100 (got {split:g})"
    if not max_error_rate >= 0:
        return f"--max-error-rate must be 0 or more percent (got {max_error_rate:g})"
    if not max_rss_growth >= 0:
        return f"--max-rss-growth must be 0 or more MB (got {max_rss_growth:g})"
    if target is not None and not target.startswith(("http://", "https://")):
        return f"--target must be an http:// or https:// URL (got {target!r})"
    return None


def soak(
    seconds: Annotated[float, typer.Option("--seconds", help="How long to hold the rate.")] = 60,
    rate: Annotated[float, typer.Option("--rate", help="Requests per second (open loop).")] = 500,
    interval: Annotated[float | None, typer.Option(help="Seconds per report line.")] = None,
    target: Annotated[str | None, typer.Option(help="Soak this running proxy instead.")] = None,
    pid: Annotated[int | None, typer.Option(help="With --target: the proxy's pid, for RSS.")] = None,
    split: Annotated[float, typer.Option(help="v2 share while soaking (mirroring covers v1).")] = 0.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="The report as one JSON document (interval lines on stderr).")
    ] = False,
    mirror: Annotated[bool, typer.Option(help="Mirror GET/POST to v2 (the started stack only).")] = True,
    max_error_rate: Annotated[
        float, typer.Option(help="Verdict: FAIL above this error rate, in percent of the requests sent.")
    ] = MAX_ERROR_RATE,
    max_rss_growth: Annotated[
        float, typer.Option(help="Verdict: FAIL if the proxy's RSS grows more MB than this after warm-up.")
    ] = MAX_RSS_GROWTH_MB,
) -> None:
    """Hold a fixed request rate through the proxy (mirroring on): errors, latency, RSS over time."""
    from proxy.cliutil import EXIT_USAGE, fail, require_extra

    problem = _bad_option(seconds, rate, interval, target, split, max_error_rate, max_rss_growth)
    if problem:
        fail(problem, EXIT_USAGE)
    require_extra("soak", "aiohttp", "psutil")  # the backends, the load and RSS (the tools extra)
    out = sys.stderr if as_json else sys.stdout  # --json: stdout is the one document
    try:
        report = run_soak(seconds, rate, interval, target, pid, split, out=out, mirror=mirror)
    except StackError as exc:
        fail(str(exc))
    summary = report.as_dict()
    failures = report.failures(max_error_rate, max_rss_growth)
    if as_json:
        verdict = {
            "verdict": "fail" if failures else "pass",
            "failures": failures,
            "max_error_rate_percent": max_error_rate,
            "max_rss_growth_mb": max_rss_growth,
        }
        print(json.dumps({**summary, **verdict}))
    else:
        print("soak summary:")
        for key, value in summary.items():
            print(f"  {key}: {value}")
        print(report.verdict_line(max_error_rate, max_rss_growth))
    if failures:
        raise typer.Exit(1)

"""Chaos under load: mixed, checksummed keep-alive traffic at
about 1,000 req/s while one fault at a time is injected, and 20 graceful stops under keep-alive
load.

One run of the scenario (the module fixture ``chaos``, about 35 s) feeds the phase tests:

- steady: nothing wrong, nothing may fail;
- (a) v2 killed (split 50%, ``fallback_to_v1``): v1 serves everything, 0 failed requests;
- (b) Redis frozen (SIGSTOP, SIGCONT), then killed and started again: 0 failed requests;
- (c) v1 killed: v1's requests get clean 502/503/504 JSON answers, v2's are untouched;
- (d) the proxy stopped with SIGTERM and started again on the same port: nothing lost or cut;
- (e) beside it all, one client uploads below the minimum rate (408) and one never reads its
  answers (dropped, and nobody else notices).

Requests in flight at the instant a backend is killed may fail (that backend died under them);
they are counted apart ("at the kill") and only have to be free of corruption and hangs. A
corrupted body (complete by its framing, wrong by its checksum) fails the run in every phase.
``pytest -s`` prints one line of figures per phase.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.chaos_load import (
    SMALL_MIX,
    ChaosBackend,
    ChaosLoad,
    ForkedProxy,
    NeverReader,
    Record,
    Tally,
    Zygote,
    slow_upload,
)
from tests.support import ProxyProcess, RedisServer

# the scenario (a module fixture) runs inside the first test's time; 20 stops take 40-80 s
pytestmark = [pytest.mark.soak, pytest.mark.timeout(300)]

RATE = 1000.0
FAULT_SECONDS = 4.0
SETTLE_SECONDS = 1.5
SLOW_UPLOAD_DEADLINE = 10.0  # grace 2 s + margin: the 408 must come well before the read timeout
NEVER_READER_DEADLINE = 12.0  # the client that never reads is dropped within this


def chaos_settings(v1: ChaosBackend, v2: ChaosBackend, redis_url: str, **extra: Any) -> dict[str, Any]:
    """Split 50% (default_percentage, so it holds while Redis is away), no canary (it would roll
    v2 back when it is killed), short timeouts so a fault shows within a phase."""
    limits: dict[str, Any] = {
        "keepalive_timeout_seconds": 2.0,
        "body_timeout_seconds": 5.0,
        "min_body_rate_bytes_per_second": 1024,
        "body_rate_grace_seconds": 2.0,
        "send_timeout_seconds": 5.0,  # the client that never reads is dropped well within the phase
    }
    return {
        "v1_url": v1.url,
        "v2_url": v2.url,
        "redis_url": redis_url,
        "default_percentage": 50.0,
        "fallback_to_v1": True,
        "canary": {"enabled": False},
        "log_level": "warning",
        "poll_interval_seconds": 0.2,
        "connect_timeout_seconds": 1.0,
        "read_timeout_seconds": 5.0,
        "drain_timeout_seconds": 3.0,
        "limits": limits,
        **extra,
    }


@pytest.fixture(scope="module")
def chaos_backends(workdir: Path) -> Iterator[tuple[ChaosBackend, ChaosBackend]]:
    v1 = ChaosBackend("v1", workdir / "chaos").start()
    v2 = ChaosBackend("v2", workdir / "chaos").start()
    yield v1, v2
    v1.stop()
    v2.stop()


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    """Starts `strangler serve` in well under a second, as often as a test needs (chaos_load.py)."""
    made = Zygote()
    yield made
    made.close()


def ensure_running(*backends: ChaosBackend) -> None:
    for backend in backends:
        if backend.process is None or backend.process.poll() is not None:
            backend.start()


def graceful_restart(proxy: ProxyProcess, timeout: float) -> tuple[float, float, int | None]:
    """SIGTERM, wait for the process to end, start it again on the same port. Returns when it
    ended, when the new one answered /health, and the old one's exit code."""
    assert proxy.process is not None
    proxy.process.send_signal(signal.SIGTERM)
    try:
        code: int | None = proxy.process.wait(timeout)
    except Exception:  # noqa: BLE001 - a drain that never ends: killed, reported as None
        proxy.process.kill()
        proxy.process.wait()
        code = None
    exited = time.monotonic()
    proxy.start()
    return exited, time.monotonic(), code


@dataclass
class Phase:
    """Instants of one fault: injected from ``start`` to ``on``, removed from ``clear`` to ``end``."""

    name: str
    start: float = 0.0
    on: float = 0.0
    clear: float = 0.0
    end: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChaosRun:
    load: ChaosLoad
    phases: dict[str, Phase]
    t0: float
    t_end: float
    slow: dict[str, Any]
    never_reader_dropped_after: float | None
    seconds: float

    def started(self, start: float, end: float) -> list[Record]:
        return self.load.between(start, end)

    def steady(self) -> list[Record]:
        """Before the first fault, answered before it."""
        a = self.phases["a"]
        return [r for r in self.started(self.t0, a.start) if r.ended <= a.start]

    def at_kill(self, name: str) -> list[Record]:
        """In flight while a backend was being killed: they may fail (it died under them)."""
        phase = self.phases[name]
        return self.load.in_flight(phase.start, phase.on)

    def judged(self, name: str) -> list[Record]:
        """The requests a phase's target is judged on: from the fault (for a backend kill: started
        once it was dead; otherwise also those in flight at the fault) until the phase has settled,
        and answered before the next fault began (those in flight then belong to the next)."""
        phase = self.phases[name]
        following = {"a": "b", "b": "c", "c": "d"}.get(name)
        until = self.phases[following].start if following else float("inf")
        if name in ("a", "c"):
            records = self.started(phase.on, phase.end)
        else:
            records = self.load.in_flight(phase.start, phase.end)
        return [r for r in records if r.ended <= until]

    def tally(self, records: list[Record], seconds: float = 0.0) -> Tally:
        return Tally(records, seconds)


@pytest.fixture(scope="module")
def chaos(
    workdir: Path, chaos_backends: tuple[ChaosBackend, ChaosBackend], zygote: Zygote
) -> Iterator[ChaosRun]:
    began = time.monotonic()
    v1, v2 = chaos_backends
    ensure_running(v1, v2)
    redis = RedisServer(workdir / "chaos-redis").start()
    proxy = ForkedProxy(zygote, workdir / "chaos-proxy", chaos_settings(v1, v2, redis.url))
    never: NeverReader | None = None
    load: ChaosLoad | None = None
    watching = threading.Event()
    try:
        proxy.start()
        load = ChaosLoad(proxy.port, rate=RATE, workers=16).start()
        t0 = time.monotonic()
        phases = {name: Phase(name) for name in ("a", "b", "c", "d")}

        # (e) beside everything: a slow uploader and a client that never reads, both sent to v1
        # (killed only in phase c, after the deadlines below)
        slow: dict[str, Any] = {}
        forced_v1 = b"X-Strangler-Version: v1\r\n"
        load.spawn(lambda: slow_upload(proxy.port, slow, headers=forced_v1, give_up=20.0))
        never = NeverReader(proxy.port, headers=forced_v1)
        dropped: list[float] = []

        def watch() -> None:
            assert never is not None and proxy.process is not None
            pid = proxy.process.pid
            while not watching.is_set():
                if not never.held_by(pid):
                    dropped.append(time.monotonic() - never.sent_at)
                    return
                watching.wait(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(2.0)

        a = phases["a"]
        a.start = time.monotonic()
        v2.kill()
        a.on = time.monotonic()
        time.sleep(FAULT_SECONDS)
        a.clear = time.monotonic()
        v2.start()
        time.sleep(SETTLE_SECONDS)
        a.end = time.monotonic()

        b = phases["b"]
        b.start = time.monotonic()
        redis.freeze()
        b.on = time.monotonic()
        time.sleep(FAULT_SECONDS / 2)
        redis.thaw()
        time.sleep(0.5)
        redis.kill()
        time.sleep(FAULT_SECONDS / 2)
        b.clear = time.monotonic()
        redis.start()  # same port, empty (the split comes from default_percentage)
        time.sleep(SETTLE_SECONDS)
        b.end = time.monotonic()

        watching.set()  # phase c kills v1, which would drop the never-reader for another reason
        watcher.join(5)

        c = phases["c"]
        c.start = time.monotonic()
        v1.kill()
        c.on = time.monotonic()
        time.sleep(FAULT_SECONDS)
        c.clear = time.monotonic()
        v1.start()
        time.sleep(SETTLE_SECONDS)
        c.end = time.monotonic()

        d = phases["d"]
        d.start = time.monotonic()
        d.on, d.clear, d.notes["exit_code"] = graceful_restart(proxy, timeout=10.0)
        time.sleep(SETTLE_SECONDS)
        d.end = time.monotonic()

        load.stop()
        run = ChaosRun(load, phases, t0, time.monotonic(), slow, dropped[0] if dropped else None,
                       time.monotonic() - began)  # fmt: skip
        report(run)
        yield run
    finally:
        watching.set()
        if load is not None:
            load.stop()
        if never is not None:
            never.close()
        proxy.stop()
        redis.stop()
        ensure_running(v1, v2)


def report(run: ChaosRun) -> None:
    """One line of figures per phase (pytest -s)."""
    p = run.phases
    a, b, c, d = p["a"], p["b"], p["c"], p["d"]
    dropped = run.never_reader_dropped_after
    never = (
        f"dropped after {dropped:.1f}s" if dropped is not None else f"still held after {b.end - run.t0:.1f}s"
    )
    lines = [
        run.tally(run.steady(), a.start - run.t0).line("chaos steady"),
        run.tally(run.at_kill("a")).line("chaos (a) in flight at the v2 kill"),
        run.tally(run.judged("a"), a.end - a.on).line("chaos (a) v2 killed, then restarted"),
        run.tally(run.judged("b"), b.end - b.start).line("chaos (b) Redis frozen, thawed, killed, restarted"),
        run.tally(run.at_kill("c")).line("chaos (c) in flight at the v1 kill"),
        run.tally(run.judged("c"), c.end - c.on).line("chaos (c) v1 killed, then restarted"),
        run.tally(run.judged("d"), d.end - d.start).line(
            f"chaos (d) SIGTERM, exit after {d.on - d.start:.2f}s (code {d.notes['exit_code']}), "
            f"new proxy ready after {d.clear - d.start:.2f}s"
        ),
        run.tally(run.load.records, run.t_end - run.t0).line("chaos all"),
        f"chaos (e) slow upload: status {run.slow.get('status')} after {run.slow.get('seconds', 0):.1f}s "
        f"({run.slow.get('sent')} bytes sent) {run.slow.get('error', '')} {run.slow.get('body', '')[:120]!r}",
        "chaos (e) never-reader: " + never,
        f"chaos unsolicited answers={run.load.unsolicited} refused connects={run.load.refused} "
        f"scenario {run.seconds:.1f}s",
    ]
    print("\n" + "\n".join(lines))
    # what failed, grouped: phase, kind of request, outcome, status, version, detail
    groups: dict[tuple[str, ...], int] = {}
    for r in run.load.records:
        if r.outcome != "ok":
            phase = next((n for n, ph in p.items() if ph.start <= r.started < ph.end), "-")
            key = (phase, r.kind, r.outcome, str(r.status), r.version, r.detail[:110])
            groups[key] = groups.get(key, 0) + 1
    for key, count in sorted(groups.items(), key=lambda item: -item[1])[:15]:
        print(f"  {count:5d} x ({key[0]}) {' '.join(key[1:5])} {key[5]!r}")


def failures(records: list[Record]) -> list[str]:
    return [f"{r.kind} {r.outcome} {r.status} {r.version} {r.detail[:120]}" for r in records if r.failed]


def test_no_corrupted_or_spliced_answers(chaos: ChaosRun) -> None:
    """Whatever fails, no answer is ever wrong: every complete answer has the body the backend
    sent for that very request, and the backend got the body the client sent."""
    corrupted = [r for r in chaos.load.records if r.outcome == "corrupt"]
    assert corrupted == [], corrupted[:5]
    assert chaos.load.unsolicited == 0, "bytes no request asked for"
    assert len(chaos.load.records) > 1000


def test_steady_load_fails_nothing(chaos: ChaosRun) -> None:
    """Before the first fault (requests still in flight at the v2 kill are counted with (a))."""
    records = chaos.steady()
    assert records and failures(records) == []


def test_v2_killed_is_served_by_v1(chaos: ChaosRun) -> None:
    """(a) From the kill until v2 is back: 0 failed requests, all served by v1."""
    a = chaos.phases["a"]
    during = chaos.started(a.on, a.clear)
    assert during and failures(chaos.judged("a")) == []
    assert {r.version for r in during if r.outcome == "ok"} == {"v1"}
    assert [r for r in chaos.at_kill("a") if r.outcome == "timeout"] == []


def test_redis_frozen_and_restarted_fails_nothing(chaos: ChaosRun) -> None:
    """(b) Redis is not on the request path: frozen, killed or restarted, 0 failed requests."""
    b = chaos.phases["b"]
    records = chaos.judged("b")
    assert records and failures(records) == []
    assert {r.version for r in chaos.started(b.on, b.clear)} == {"v1", "v2"}, "the split held"


def test_v1_killed_gives_clean_errors_and_v2_unaffected(chaos: ChaosRun) -> None:
    """(c) While v1 is down: its requests get a clean 502/503/504 JSON answer (never a cut body,
    never a hang), v2's are served as before."""
    records = chaos.judged("c")
    bad = []
    for r in records:
        if r.outcome == "ok":
            continue
        if r.outcome == "error" and r.clean and r.status in (502, 503, 504) and r.version == "v1":
            continue
        bad.append(r)
    assert records and [f"{r.kind} {r.outcome} {r.status} {r.version} {r.detail[:120]}" for r in bad] == []
    assert any(r.outcome == "error" for r in records), "v1 was down: some requests must have hit it"
    assert all(r.outcome == "ok" for r in records if r.version == "v2")
    assert [r for r in chaos.at_kill("c") if r.outcome == "timeout"] == []


def test_graceful_restart_under_chaos_loses_nothing(chaos: ChaosRun) -> None:
    """(d) SIGTERM, then a new proxy on the same port: every request sent gets its whole answer
    (or its connection is refused while no proxy listens, which is no request)."""
    d = chaos.phases["d"]
    records = chaos.judged("d")
    assert records and failures(records) == []
    assert d.notes["exit_code"] is not None, "the drain did not end"


def test_slow_upload_gets_408(chaos: ChaosRun) -> None:
    """(e) An upload below the minimum rate is the client's fault: 408, soon after the grace."""
    assert chaos.slow.get("status") == 408, chaos.slow
    assert chaos.slow["seconds"] < SLOW_UPLOAD_DEADLINE, chaos.slow


def test_client_that_never_reads_is_dropped(chaos: ChaosRun) -> None:
    """(e) A client that asks for 8 MiB answers and never reads is let go (it held a backend
    connection); the others were not affected (the steady, (a) and (b) tests)."""
    dropped = chaos.never_reader_dropped_after
    assert dropped is not None and dropped < NEVER_READER_DEADLINE, dropped


# --- 20 graceful stops ------------------------------------------------------------------------


STOPS = 20


def test_twenty_graceful_stops_under_keepalive_load(
    workdir: Path, chaos_backends: tuple[ChaosBackend, ChaosBackend], redis_url: str, zygote: Zygote
) -> None:
    """8 keep-alive clients sending back to back; SIGTERM, a new proxy on the same port, 20 times:
    no request lost (written, then the connection closed before any answer) or cut (part of an
    answer). While no proxy listens, connections are refused: those are no requests."""
    v1, v2 = chaos_backends
    ensure_running(v1, v2)
    proxy = ForkedProxy(zygote, workdir / "stops-proxy", chaos_settings(v1, v2, redis_url)).start()
    load = ChaosLoad(proxy.port, rate=None, workers=8, mix=SMALL_MIX).start()
    rows = []
    try:
        time.sleep(1.0)
        for _ in range(STOPS):
            signalled = time.monotonic()
            exited, ready, code = graceful_restart(proxy, timeout=10.0)
            time.sleep(0.5)
            rows.append((signalled, exited, ready, time.monotonic(), code))
    finally:
        load.stop()
        proxy.stop()
    lines, lost, cut, failed, closing, answered = [], 0, 0, 0, 0, 0
    for i, (signalled, exited, ready, end, code) in enumerate(rows):
        window = Tally(load.in_flight(signalled, end))
        after = [r for r in load.records if signalled <= r.ended < exited and r.outcome in ("ok", "error")]
        lost += window.count("lost")
        cut += window.count("cut")
        failed += window.failed
        answered += len(after)
        closing += sum(r.close for r in after)
        lines.append(f"  stop {i + 1}: drained in {exited - signalled:.2f}s (code {code}), up again after "
                     f"{ready - signalled:.2f}s; {len(after)} answers after SIGTERM "
                     f"({sum(r.close for r in after)} with close); {window.line('window')}")  # fmt: skip
    total = Tally(load.records)
    print("\n" + "\n".join(lines))
    print(f"graceful stops x{STOPS}: sent={total.sent} ok={total.count('ok')} lost={lost} cut={cut} "
          f"failed={failed} answers after SIGTERM={answered} with Connection: close={closing} "
          f"refused connects={load.refused} unsolicited={load.unsolicited} "
          f"corrupt={total.count('corrupt')}")  # fmt: skip
    assert total.count("corrupt") == 0 and load.unsolicited == 0
    assert all(code is not None for *_, code in rows), "a drain did not end"
    assert (lost, cut) == (0, 0)
    assert total.failed == 0, [f"{r.kind} {r.outcome} {r.status} {r.detail[:100]}" for r in load.records
                               if r.failed][:10]  # fmt: skip

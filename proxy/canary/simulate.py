"""Drive the statistical judge check by check on simulated traffic (seeded, pure, no Redis).

Requests arrive as a Poisson process; each version's latency is lognormal (v2's optionally scaled)
and lands in the proxy's latency buckets; each request fails with its version's error rate. Because
Poisson arrivals thin into independent Poisson counts, each bucket's count per check is drawn
directly (a few dozen draws per check instead of one per request), which is exact, not an
approximation. Each check counts the seconds up to two seconds before it, as the controller does.

This is how the issue's targets are measured (docs/canary.md, "The statistical judge"):
``summarise(run_many(...))``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from statistics import NormalDist

from proxy.canary.analysis import BOUNDS, History, Status, Window, assess
from proxy.canary.judge import Tally, assess_statistical
from proxy.settings import CanaryThresholds

_NORMAL = NormalDist()


@dataclass(frozen=True, slots=True)
class Scenario:
    """Traffic of one group: total request rate, v2's share, and each version's behaviour."""

    rate: float = 200.0  # requests per second, both versions
    split: float = 0.05  # v2's share
    v1_error_rate: float = 0.01
    v2_error_rate: float = 0.01
    median_seconds: float = 0.05
    sigma: float = 0.5  # of log latency
    v2_latency_factor: float = 1.0  # 1.2: every v2 latency 20% longer (p95 +20%)


@dataclass(frozen=True, slots=True)
class Run:
    """One simulated judged period: the check that rolled back (1-based), if any."""

    rolled_back_at: int | None
    checks: int
    failed_check: str | None = None
    statuses: tuple[str, ...] = field(default=())
    reason: str | None = None  # the rolling-back verdict's


def poisson(rng: random.Random, mean: float) -> int:
    """Poisson draw: Knuth below 10, Hoermann's PTRS (as numpy does) above."""
    if mean <= 0:
        return 0
    if mean < 10:
        limit, k, product = math.exp(-mean), 0, rng.random()
        while product > limit:
            k += 1
            product *= rng.random()
        return k
    slam, loglam = math.sqrt(mean), math.log(mean)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + mean + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(inv_alpha) - math.log(
            a / (us * us) + b
        ) <= -mean + k * loglam - math.lgamma(k + 1):
            return k


def binomial(rng: random.Random, n: int, p: float) -> int:
    """Binomial draw by geometric skips: about n p + 1 steps (error rates are small)."""
    if n <= 0 or p <= 0:
        return 0
    if p >= 1:
        return n
    if p > 0.5:
        return n - binomial(rng, n, 1 - p)
    log_q = math.log1p(-p)
    successes, trial = 0, 0
    while True:
        trial += int(math.log(1.0 - rng.random()) / log_q) + 1
        if trial > n:
            return successes
        successes += 1


def bucket_shares(median: float, sigma: float) -> list[float]:
    """Probability of each latency bucket (the last: above the last bound) for a lognormal."""
    cdf = [_NORMAL.cdf((math.log(b) - math.log(median)) / sigma) for b in BOUNDS]
    shares, previous = [], 0.0
    for c in cdf:
        shares.append(c - previous)
        previous = c
    shares.append(1.0 - previous)
    return shares


def draw(rng: random.Random, requests_mean: float, shares: list[float], error_rate: float) -> Window:
    buckets = tuple(poisson(rng, requests_mean * s) for s in shares)
    requests = sum(buckets)
    return Window(requests, binomial(rng, requests, error_rate), buckets)


def _sum(windows: list[Window]) -> Window:
    if not windows:
        return Window(0, 0, (0,) * (len(BOUNDS) + 1))
    buckets = tuple(sum(col) for col in zip(*(w.buckets for w in windows), strict=True))
    return Window(sum(w.requests for w in windows), sum(w.errors for w in windows), buckets)


def run_once(
    scenario: Scenario,
    thresholds: CanaryThresholds,
    rng: random.Random,
    *,
    checks: int = 30,
    interval: float = 10.0,
    window_seconds: float = 60.0,
    lag_seconds: int = 2,
    failures_to_act: int = 3,
) -> Run:
    """One judged period of ``checks`` checks, stopping at the first rollback."""
    s = scenario
    shares1 = bucket_shares(s.median_seconds, s.sigma)
    shares2 = bucket_shares(s.median_seconds * s.v2_latency_factor, s.sigma)
    per_window = max(1, round(window_seconds / interval))
    recent: list[tuple[Window, Window]] = []
    tally: Tally | None = None
    history = History()
    counted = 0
    statuses: list[str] = []
    for check in range(1, checks + 1):
        now = check * interval
        until = int(now) - lag_seconds
        seconds = until - counted
        counted = until
        inc1 = draw(rng, s.rate * (1 - s.split) * seconds, shares1, s.v1_error_rate)
        inc2 = draw(rng, s.rate * s.split * seconds, shares2, s.v2_error_rate)
        recent = [*recent[-(per_window - 1) :], (inc1, inc2)] if per_window > 1 else [(inc1, inc2)]
        w1, w2 = _sum([a for a, _ in recent]), _sum([b for _, b in recent])
        if thresholds.judge == "statistical":
            verdict, tally = assess_statistical(
                w1, w2, inc1, inc2, thresholds, history, tally,
                now=now, until=until, failures_to_act=failures_to_act,
            )  # fmt: skip
        else:  # the fixed limits, on the same traffic: what the statistical judge is compared with
            verdict = assess(w1, w2, thresholds, history, failures_to_act=failures_to_act)
        history = History(verdict.consecutive_failures)
        statuses.append(verdict.status.value)
        if verdict.rollback:
            return Run(check, check, verdict.failed_check, tuple(statuses), verdict.reason)
    return Run(None, checks, None, tuple(statuses))


def run_many(
    scenario: Scenario,
    thresholds: CanaryThresholds,
    *,
    runs: int,
    seed: int,
    checks: int = 30,
) -> Iterator[Run]:
    rng = random.Random(seed)
    for _ in range(runs):
        yield run_once(scenario, thresholds, rng, checks=checks)


def run_checks(
    scenario: Scenario, thresholds: CanaryThresholds, *, total: int, seed: int, checks: int = 30
) -> list[Run]:
    """Judged periods of ``checks`` checks until at least ``total`` checks were made (a period that
    rolls back ends early, and a new one starts, as a new rollout would)."""
    rng = random.Random(seed)
    runs: list[Run] = []
    made = 0
    while made < total:
        run = run_once(scenario, thresholds, rng, checks=checks)
        runs.append(run)
        made += run.checks
    return runs


def summarise(runs: list[Run], interval: float = 10.0) -> dict[str, float | int | None]:
    """Rollbacks per check and per run, and how soon they came (seconds, for the caught runs)."""
    checks = sum(r.checks for r in runs)
    caught = sorted(r.rolled_back_at * interval for r in runs if r.rolled_back_at is not None)
    passed = sum(1 for r in runs for st in r.statuses if st == Status.PASS.value)
    return {
        "runs": len(runs),
        "checks": checks,
        "rollbacks": len(caught),
        "per_check_rate": len(caught) / checks if checks else 0.0,
        "per_run_rate": len(caught) / len(runs) if runs else 0.0,
        "median_seconds_to_rollback": caught[len(caught) // 2] if caught else None,
        "pass_share": passed / checks if checks else 0.0,
    }


def targets(
    *, checks: int = 10_000, runs: int = 1000, seed: int = 11, judge: str = "statistical", period: int = 30
) -> dict[str, dict[str, float | int | None]]:
    """The issue's three measures with the default thresholds of ``judge`` (docs/canary.md);
    ``period``: checks per judged period with identical versions (30: 5 minutes, 270: a ladder)."""
    t = CanaryThresholds(judge="statistical" if judge == "statistical" else "thresholds")
    return {
        "identical": summarise(run_checks(Scenario(), t, total=checks, seed=seed, checks=period)),
        "errors_1_to_2_percent": summarise(
            list(run_many(Scenario(v2_error_rate=0.02), t, runs=runs, seed=seed + 1))
        ),
        "latency_x1.2": summarise(
            list(run_many(Scenario(v2_latency_factor=1.2), t, runs=runs, seed=seed + 2))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m proxy.canary.simulate [--checks N] [--runs N] [--seed S] [--judge J] [--period N]``:
    the figures as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m proxy.canary.simulate", description=main.__doc__)
    parser.add_argument("--checks", type=int, default=10_000, help="checks with identical versions")
    parser.add_argument("--runs", type=int, default=1000, help="5-minute runs per regression")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--judge", choices=("statistical", "thresholds"), default="statistical",
        help="thresholds: the fixed limits on the same traffic, for comparison",
    )  # fmt: skip
    parser.add_argument("--period", type=int, default=30, help="checks per period, identical versions")
    args = parser.parse_args(argv)
    if args.checks < 1 or args.runs < 1 or args.period < 1:
        parser.error("--checks, --runs and --period must be at least 1")
    figures = targets(
        checks=args.checks, runs=args.runs, seed=args.seed, judge=args.judge, period=args.period
    )
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

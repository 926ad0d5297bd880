"""The bounded check history a backtest replays: one compact record per check, per group.

The per-second window hashes expire after about two windows, so the only lasting trace of what the
leader judged is this list (``<prefix>canary:checks:<group>``, newest first, capped by
``canary.history_checks``). Each record holds what a replay needs and nothing more: the summed v1
and v2 window slots (requests, errors, latency buckets as ``windows`` builds them), the split, the
rollout's state and hold, and what the leader concluded and did. It is pushed in the same
transaction as the verdict, so the history never shows a check the verdict does not.

``entry`` and ``parse`` are pure; ``push`` only queues commands on a pipeline; ``read`` is the one
Redis read (the CLI's). A record that does not parse (a hand edit, a newer format) is skipped and
counted, never fatal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from proxy.canary.analysis import BOUNDS, Window
from proxy.control.keys import Keys

FORMAT = 1
BUCKETS = len(BOUNDS) + 1
# judging parts other helpers add to the verdict record (metric gates, the statistical judge): kept
# as they are, so a replay can use them
EXTRA_KEYS = ("gates", "statistics", "tally", "parity_hold", "step_hold")
# one record is read at most this large: a hostile list item must not eat the CLI's memory
MAX_RECORD_BYTES = 64 * 1024


def checks_key(keys: Keys, group: str) -> str:
    return keys.canary_checks(group)


def _slots(window: Window) -> dict[str, Any]:
    buckets = list(window.buckets)
    while buckets and buckets[-1] == 0:  # trailing empty buckets carry nothing: most of them
        buckets.pop()
    return {"r": window.requests, "e": window.errors, "b": buckets}


def entry(
    record: dict[str, Any],
    windows: dict[str, Window],
    rollout: dict[str, Any] | None,
    *,
    fresh: bool,
    advance_due: bool,
    increment: Increment | None = None,
) -> dict[str, Any]:
    """The history record of one check, from the verdict record the leader writes (``record``),
    the windows it judged, the rollout it saw (``RolloutState.as_dict()``, or None) and the
    seconds new since the previous check (``increment``)."""
    out: dict[str, Any] = {
        "f": FORMAT,
        "at": record["at"],
        "split": record.get("split"),
        "v1": _slots(windows["v1"]),
        "v2": _slots(windows["v2"]),
        "status": record.get("status"),
        "failed_check": record.get("failed_check"),
        "streak": record.get("consecutive_failures", 0),
        "action": record.get("action") or ("advance_due" if advance_due else None),
        "fresh": fresh,
    }
    if rollout is not None:
        out["rollout"] = {
            "state": rollout.get("state"),
            "percentage": rollout.get("percentage"),
            "interval": rollout.get("interval_seconds"),
            "hold": [rollout.get("started_at"), rollout.get("hold_id")],
            "step_started_at": rollout.get("step_started_at"),
        }
    if increment is not None:
        out["inc"] = {"from": increment.start, "until": increment.until,
                      "v1": _slots(increment.v1), "v2": _slots(increment.v2)}  # fmt: skip
    for key in EXTRA_KEYS:
        if key in record:
            out[key] = record[key]
    return out


@dataclass(frozen=True, slots=True)
class Increment:
    """The seconds ``(start, until]`` counted by no earlier check: what a sequential judge (the
    statistical one) adds at this check. ``until`` stays two seconds behind the check, so every
    replica's flush for a second is in; consecutive increments never overlap."""

    start: int
    until: int
    v1: Window
    v2: Window


async def increment(
    redis: aioredis.Redis, keys: Keys, group: str, now: float, window_seconds: float, since: float | None
) -> Increment:
    """Read the seconds since the previous stored check (its ``inc.until``; at most two windows
    back, where the window hashes expire; never before ``since``, a fresh history)."""
    from proxy.canary.windows import SETTLE_SECONDS, read_increment

    start = int(now) - SETTLE_SECONDS - int(window_seconds)
    last = await redis.lindex(checks_key(keys, group), 0)
    try:
        previous = json.loads(last)["inc"]["until"] if last else None
    except (ValueError, TypeError, KeyError, RecursionError):
        previous = None
    if isinstance(previous, int) and not isinstance(previous, bool) and previous <= int(now) - SETTLE_SECONDS:
        start = previous
    return Increment(
        *await read_increment(redis, keys, group, max(start, int(since or 0)), now, window_seconds)
    )


def push(pipe: Any, keys: Keys, group: str, item: dict[str, Any], limit: int) -> None:
    """Queue LPUSH + LTRIM on ``pipe`` (the verdict's transaction). ``limit`` 0 keeps nothing."""
    if limit <= 0:
        return
    key = checks_key(keys, group)
    pipe.lpush(key, json.dumps(item, separators=(",", ":"), default=str))
    pipe.ltrim(key, 0, limit - 1)


# --- reading back -------------------------------------------------------------------------------


class BadRecord(ValueError):
    """A stored record that is not a check record; the message says what is wrong, in one line."""


@dataclass(frozen=True, slots=True)
class Rollout:
    state: str
    percentage: float
    interval: float
    hold: tuple[Any, ...]
    step_started_at: float


@dataclass(frozen=True, slots=True)
class Check:
    """One stored check, validated: finite numbers, counts that are non-negative integers."""

    at: float
    split: float
    v1: Window
    v2: Window
    status: str
    failed_check: str | None
    streak: int
    action: str | None
    fresh: bool
    rollout: Rollout | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    increment: Increment | None = None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRecord(f"{what} is not a finite number: {str(value)[:40]!r}")
    return float(value)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRecord(f"{what} is not a count: {str(value)[:40]!r}")
    return value


def _window(raw: Any, what: str) -> Window:
    if not isinstance(raw, dict):
        raise BadRecord(f"{what} is not an object")
    buckets = raw.get("b", [])
    if not isinstance(buckets, list) or len(buckets) > BUCKETS:
        raise BadRecord(f"{what}.b is not a list of at most {BUCKETS} counts")
    counts = [_count(b, f"{what}.b") for b in buckets]
    requests, errors = _count(raw.get("r"), f"{what}.r"), _count(raw.get("e"), f"{what}.e")
    if errors > requests:
        raise BadRecord(f"{what} has more errors than requests")
    return Window(requests, errors, tuple(counts + [0] * (BUCKETS - len(counts))))


def parse(raw: str | bytes) -> Check:
    """One list item -> ``Check``; ``BadRecord`` (one line) for anything else."""
    if len(raw) > MAX_RECORD_BYTES:
        raise BadRecord(f"record of {len(raw)} bytes, above {MAX_RECORD_BYTES}")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRecord("not JSON") from None
    if not isinstance(data, dict):
        raise BadRecord("not a JSON object")
    status = data.get("status")
    if status not in ("pass", "fail", "insufficient_data", "error"):
        raise BadRecord(f"unknown status {str(status)[:40]!r}")
    failed, action = data.get("failed_check"), data.get("action")
    if failed is not None and not isinstance(failed, str):
        raise BadRecord("failed_check is not a string")
    if action is not None and not isinstance(action, str):
        raise BadRecord("action is not a string")
    rollout = None
    if data.get("rollout") is not None:
        ro = data["rollout"]
        if not isinstance(ro, dict) or not isinstance(ro.get("state"), str):
            raise BadRecord("rollout is not an object with a state")
        hold = ro.get("hold")
        rollout = Rollout(
            ro["state"],
            _number(ro.get("percentage"), "rollout.percentage"),
            _number(ro.get("interval"), "rollout.interval"),
            tuple(hold) if isinstance(hold, list) else (),
            _number(ro.get("step_started_at", 0.0), "rollout.step_started_at"),
        )
    inc = None
    if data.get("inc") is not None:
        raw_inc = data["inc"]
        if not isinstance(raw_inc, dict):
            raise BadRecord("inc is not an object")
        bounds = [_number(raw_inc.get(k), f"inc.{k}") for k in ("from", "until")]
        inc = Increment(int(bounds[0]), int(bounds[1]), _window(raw_inc.get("v1"), "inc.v1"),
                        _window(raw_inc.get("v2"), "inc.v2"))  # fmt: skip
    return Check(
        increment=inc,
        at=_number(data.get("at"), "at"),
        split=_number(data.get("split", 0.0), "split"),
        v1=_window(data.get("v1"), "v1"),
        v2=_window(data.get("v2"), "v2"),
        status=status,
        failed_check=failed,
        streak=_count(data.get("streak", 0), "streak"),
        action=action,
        fresh=data.get("fresh") is True,
        rollout=rollout,
        extras={k: data[k] for k in EXTRA_KEYS if k in data},
    )


@dataclass
class Loaded:
    checks: list[Check]  # oldest first
    skipped: int  # records that did not parse
    first_problem: str | None = None


def load(items: list[Any], since: float) -> Loaded:
    """Parse the list (newest first, as stored) into checks at or after ``since``, oldest first."""
    checks: list[Check] = []
    skipped, problem = 0, None
    for raw in items:
        try:
            check = parse(raw)
        except BadRecord as exc:
            skipped += 1
            problem = problem or str(exc)
            continue
        if check.at >= since:
            checks.append(check)
    checks.sort(key=lambda c: c.at)
    return Loaded(checks, skipped, problem)


async def read(redis: aioredis.Redis, keys: Keys, group: str, since: float) -> Loaded:
    """The group's stored checks at or after ``since`` (one LRANGE of the capped list)."""
    items = await redis.lrange(checks_key(keys, group), 0, -1)
    return load(items, since)

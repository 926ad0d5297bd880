"""The last parity result per table, kept in Redis for ``strangler status`` and the dashboard.

Key (prefix ``strangler:``): ``parity:last`` (hash): table -> JSON summary (status, counts,
rows, when, how long). Only the summary is stored, never row values (they may be personal
data): samples stay in the report file. A table found different also pushes an alert event to
the canary outbox, so it is delivered by the notifiers the proxy already has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from proxy.canary import events
from proxy.control.keys import Keys
from proxy.parity.report import DIFFERENT, ERROR, TableResult

SUMMARY_FIELDS = (
    "status", "source_rows", "target_rows", "missing", "extra", "changed", "changed_columns",
    "skipped_recent", "resolved_after_lag", "seconds", "finished_at", "error",
)  # fmt: skip


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I)
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-f:]+\](?::\d+)?", re.I)
_SERVER = re.compile(r'(server at|host|to server) "[^"]*"', re.I)
_PORT = re.compile(r"\bport \d+", re.I)


def redact(text: str | None) -> str | None:
    """Error text leaves the operator's terminal (Redis, Slack): no URLs, addresses or ports."""
    if text is None:
        return None
    text = _URL.sub("<url>", text)
    text = _SERVER.sub(r"\1 <host>", text)
    text = _ADDRESS.sub("<address>", text)
    return _PORT.sub("port <n>", text)[:300]


def parity_key(keys: Keys) -> str:
    return keys.parity_last


def summary(result: TableResult, kind: str) -> dict[str, Any]:
    data = {name: getattr(result, name) for name in SUMMARY_FIELDS}
    data["error"] = redact(result.error)
    data["kind"] = kind
    return data


async def store_results(
    redis: aioredis.Redis, keys: Keys, results: list[TableResult], kind: str, alert: bool = True
) -> None:
    """One transaction: the summaries, and an alert event per table that is out of parity."""
    pipe = redis.pipeline(transaction=True)
    for result in results:
        if result.table == "*":
            continue
        pipe.hset(parity_key(keys), result.table, json.dumps(summary(result, kind), default=str))
        if alert and result.status in (DIFFERENT, ERROR):
            message = (
                f"parity {result.table}: {result.missing} missing, {result.extra} extra, "
                f"{result.changed} changed"
                if result.status == DIFFERENT
                else f"parity {result.table}: could not be checked ({redact(result.error)})"
            )
            event = events.Event(
                "parity_different" if result.status == DIFFERENT else "parity_error",
                result.table,
                message,
                "warning",
                by=f"strangler parity {kind}",
                fields={k: v for k, v in summary(result, kind).items() if k != "changed_columns"},
            )
            events.push(pipe, keys, event)
    await pipe.execute()


async def read_last_results(redis: aioredis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """``{table: summary}`` of the last run per table (for ``strangler status`` / the admin API).
    Unreadable entries are skipped, never raised: a status page must not fail on them."""
    raw: dict[Any, Any] = await redis.hgetall(parity_key(keys))  # type: ignore[misc]
    found: dict[str, dict[str, Any]] = {}
    for table, value in raw.items():
        name = table.decode() if isinstance(table, bytes) else str(table)
        try:
            data = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(data, dict):
            found[name] = data
    return dict(sorted(found.items()))


async def tables_behind(redis: aioredis.Redis, keys: Keys, tables: Sequence[str]) -> list[str]:
    """The rollout gate's read (app.py hands it to the canary controller, which never learns the
    layout): the given tables whose last result is not ``equal``, or that were never checked."""
    return out_of_parity(await read_last_results(redis, keys), list(tables))


def out_of_parity(last: dict[str, dict[str, Any]], tables: list[str]) -> list[str]:
    """For a rollout gate: the configured tables whose last result is not ``equal`` (or missing)."""
    return [t for t in tables if last.get(t, {}).get("status") != "equal"]

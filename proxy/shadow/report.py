"""The diff report in Redis, shared by all replicas, and the noise fields learnt by calibration.

Writers (shadow workers) add to an in-memory :class:`ReportBatch` and a flusher writes it with one
pipeline per interval, so Redis sees a handful of commands per second whatever the traffic.
Readers (CLI, admin API) only read. Keys (prefix ``strangler:``):

* ``diffs:endpoints`` (set): every endpoint in the report.
* ``diffs:counts:<endpoint>`` (hash): compared, matched, mismatched, noise, skipped, errors,
  pending (waiting for the endpoint's calibration; not compared yet), group.
* ``diffs:fields:<endpoint>`` (hash): field -> comparisons in which it differed (mismatches).
* ``diffs:suppressed:<endpoint>`` (hash): field -> differences reported as noise instead.
* ``diffs:samples:<endpoint>`` (list, newest first, capped): recent mismatches and errors, JSON.
* ``diffs:groups`` (hash): ``<group>:<outcome>`` -> mirrored requests by outcome (sent, dropped, ...).
* ``noise:endpoints`` (set) and ``noise:seen:<endpoint>`` (hash): per endpoint, field -> number of
  calibrations in which it varied between two v1 answers; noise from ``noise_threshold`` on. Kept
  across ``diffs --reset`` (they describe v1, not v2); ``--forget-noise`` clears them too.
* ``diffs_epoch`` (string): incremented by every reset; replicas that see it change free their
  endpoint slots and drop what they had not written yet, so a reset reaches all of them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from proxy.control.keys import Keys
from proxy.control.snapshot import as_text

# "pending": comparisons held until the endpoint's noise calibration has run (then judged and
# counted in the others); never in ``compared``, so the canary's shadow gate never sees them
COUNTERS = ("compared", "matched", "mismatched", "noise", "skipped", "errors", "pending")
OUTCOMES = ("sent", "dropped", "skipped_method", "skipped_size", "error")


def _text(value: Any) -> str:
    return as_text(value) or ""


@dataclass
class ReportBatch:
    """What the workers found since the last flush. Event-loop-only, so no locks."""

    counts: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    fields: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    suppressed: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    samples: defaultdict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    groups: Counter[str] = field(default_factory=Counter)
    endpoint_group: dict[str, str] = field(default_factory=dict)
    noise: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def __bool__(self) -> bool:
        return bool(self.counts or self.groups or self.noise or self.samples)

    def count(self, endpoint: str, group: str, counter: str) -> None:
        self.endpoint_group[endpoint] = group
        self.counts[endpoint][counter] += 1

    def sample(self, endpoint: str, payload: bytes, cap: int) -> None:
        kept = self.samples[endpoint]
        kept.append(payload)
        if len(kept) > cap:
            del kept[: len(kept) - cap]

    def merge(self, older: ReportBatch, cap: int) -> None:
        """Put back a batch that could not be written (Redis down): counts add up, samples stay capped."""
        for target, source in (
            (self.counts, older.counts),
            (self.fields, older.fields),
            (self.suppressed, older.suppressed),
        ):
            for endpoint, counter in source.items():
                target[endpoint].update(counter)
        for endpoint, payloads in older.samples.items():
            self.samples[endpoint] = (payloads + self.samples[endpoint])[-cap:] if cap else []
        self.groups.update(older.groups)
        for endpoint, group in older.endpoint_group.items():
            self.endpoint_group.setdefault(endpoint, group)
        for endpoint, seen in older.noise.items():
            self.noise[endpoint].update(seen)


class ReportStore:
    """Reads and writes the report keys. One instance per process; the client is shared."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, max_samples: int = 20, noise_threshold: int = 2
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.max_samples = max_samples
        self.noise_threshold = noise_threshold

    # key names ---------------------------------------------------------------------------------
    def key(self, kind: str, endpoint: str | None = None) -> str:
        return self.keys.diffs(kind, endpoint)

    def noise_key(self, endpoint: str | None = None) -> str:
        return self.keys.noise(endpoint)

    @property
    def epoch_key(self) -> str:
        return self.keys.diffs_epoch

    # writing -----------------------------------------------------------------------------------
    async def write(self, batch: ReportBatch) -> None:
        """One pipeline (no transaction: every command is an increment or an add)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            endpoints = set(batch.counts) | set(batch.fields) | set(batch.samples)
            if endpoints:
                pipe.sadd(self.key("endpoints"), *endpoints)
            for endpoint, counter in batch.counts.items():
                key = self.key("counts", endpoint)
                for name, value in counter.items():
                    pipe.hincrby(key, name, value)
                group = batch.endpoint_group.get(endpoint)
                if group:
                    pipe.hset(key, "group", group)
            for endpoint, counter in batch.fields.items():
                for name, value in counter.items():
                    pipe.hincrby(self.key("fields", endpoint), name, value)
            for endpoint, counter in batch.suppressed.items():
                for name, value in counter.items():
                    pipe.hincrby(self.key("suppressed", endpoint), name, value)
            for endpoint, payloads in batch.samples.items():
                if self.max_samples and payloads:
                    key = self.key("samples", endpoint)
                    pipe.lpush(key, *payloads)
                    pipe.ltrim(key, 0, self.max_samples - 1)
            for name, value in batch.groups.items():
                pipe.hincrby(self.key("groups"), name, value)
            for endpoint, seen in batch.noise.items():
                if seen:
                    pipe.sadd(self.noise_key(), endpoint)
                    for name, value in seen.items():
                        pipe.hincrby(self.noise_key(endpoint), name, value)
            await pipe.execute()

    async def read_shared(self) -> tuple[int, dict[str, dict[str, int]]]:
        """The reset epoch and, per endpoint, how often each field was seen to vary (all replicas)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.epoch_key)
            pipe.smembers(self.noise_key())
            epoch_raw, noisy_raw = await pipe.execute()
        noisy_endpoints = sorted(_text(e) for e in noisy_raw)
        noise: dict[str, dict[str, int]] = {}
        if noisy_endpoints:
            async with self.redis.pipeline(transaction=False) as pipe:
                for endpoint in noisy_endpoints:
                    pipe.hgetall(self.noise_key(endpoint))
                results = await pipe.execute()
            noise = {
                e: {_text(f): int(c) for f, c in r.items()}
                for e, r in zip(noisy_endpoints, results, strict=True)
            }
        return int(_text(epoch_raw) or 0), noise

    # reading -----------------------------------------------------------------------------------
    async def summary(self) -> dict[str, Any]:
        """Every endpoint's counts, worst first, plus per-group outcomes."""
        endpoints = sorted(_text(e) for e in await self.redis.smembers(self.key("endpoints")))
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.hgetall(self.key("counts", endpoint))
                pipe.hgetall(self.key("fields", endpoint))
            pipe.hgetall(self.key("groups"))
            results = await pipe.execute()
        rows = []
        for i, endpoint in enumerate(endpoints):
            counts = {_text(k): _text(v) for k, v in results[2 * i].items()}
            fields = {_text(k): int(v) for k, v in results[2 * i + 1].items()}
            row: dict[str, Any] = {"endpoint": endpoint, "group": counts.get("group", "default")}
            for name in COUNTERS:
                row[name] = int(counts.get(name, 0))
            row["mismatch_rate"] = row["mismatched"] / row["compared"] if row["compared"] else 0.0
            row["top_fields"] = sorted(fields.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            rows.append(row)
        rows.sort(key=worst_first)
        groups: dict[str, dict[str, int]] = {}
        for name, value in results[-1].items():
            group, _, outcome = _text(name).rpartition(":")
            groups.setdefault(group, {o: 0 for o in OUTCOMES})[outcome] = int(value)
        return {"endpoints": rows, "groups": groups}

    async def group_totals(self) -> dict[str, tuple[int, int]]:
        """Per route group, ``(compared, mismatched)`` summed over its endpoints: what the canary's
        shadow-mismatch gate reads (app.py hands it this method, so canary never learns the layout).
        A malformed count is skipped, never raised."""
        endpoints = [_text(e) for e in await self.redis.smembers(self.key("endpoints"))]
        if not endpoints:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.hmget(self.key("counts", endpoint), "compared", "mismatched", "group")
            rows = await pipe.execute()
        totals: dict[str, tuple[int, int]] = {}
        for compared, mismatched, group in rows:
            try:
                name = _text(group) or "default"
                seen, differed = totals.get(name, (0, 0))
                totals[name] = (seen + int(compared or 0), differed + int(mismatched or 0))
            except (TypeError, ValueError):
                continue
        return totals

    async def endpoint(self, endpoint: str) -> dict[str, Any] | None:
        """One endpoint: counts, differing fields, suppressed noise, learnt noise and samples."""
        import orjson

        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sismember(self.key("endpoints"), endpoint)
            pipe.hgetall(self.key("counts", endpoint))
            pipe.hgetall(self.key("fields", endpoint))
            pipe.hgetall(self.key("suppressed", endpoint))
            pipe.lrange(self.key("samples", endpoint), 0, -1)
            pipe.hgetall(self.noise_key(endpoint))
            known, counts_raw, fields_raw, suppressed_raw, samples_raw, noise_raw = await pipe.execute()
        if not known and not noise_raw:
            return None
        counts = {_text(k): _text(v) for k, v in counts_raw.items()}
        result: dict[str, Any] = {"endpoint": endpoint, "group": counts.get("group", "default")}
        for name in COUNTERS:
            result[name] = int(counts.get(name, 0))
        result["fields"] = dict(sorted(((_text(k), int(v)) for k, v in fields_raw.items()), key=_by_count))
        result["suppressed"] = dict(
            sorted(((_text(k), int(v)) for k, v in suppressed_raw.items()), key=_by_count)
        )
        seen = {_text(f): int(c) for f, c in noise_raw.items()}
        result["noise_fields"] = sorted(f for f, c in seen.items() if c >= self.noise_threshold)
        result["noise_seen"] = dict(sorted(seen.items()))
        result["samples"] = [orjson.loads(s) for s in samples_raw]
        return result

    async def reset(self, forget_noise: bool = False) -> int:
        """Delete the report (and, if asked, the learnt noise) and move the epoch on, so every
        replica frees its endpoint slots (and forgets noise) at its next refresh. Returns the
        number of keys deleted."""
        patterns = [self.key("*")]
        if forget_noise:
            patterns.append(self.keys.noise_pattern)
        deleted = 0
        for pattern in patterns:
            batch: list[Any] = []
            async for key in self.redis.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await self.redis.delete(*batch)
                    batch = []
            if batch:
                deleted += await self.redis.delete(*batch)
        await self.redis.incr(self.epoch_key)
        return deleted


def worst_first(row: dict[str, Any]) -> tuple[Any, ...]:
    return (-row["mismatched"], -row["errors"], -row["mismatch_rate"], -row["compared"], row["endpoint"])


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])

"""One SQL parity run: pass 0 aggregates, pass 1 segment checksums, then only differing rows.

Per table:

1. **Pass 0**: row count, key bounds and numeric sums on both sides, read at the same time.
2. **Pass 1**: the key range is cut into chunks (the unit of progress and of the checkpoint); each
   chunk is one grouped query per side returning ``(segment, rows, sum of row hashes)``. Equal
   segments are done. A differing segment is not re-checksummed (with scattered differences every
   segment differs, which is what makes bisecting by checksums slow): its rows are streamed as
   ``key + row hash``, and only keys whose hash differs become candidates.
3. **Pass 2**: candidate rows are fetched whole from both sides and judged by the normalisers:
   missing in target, extra in target, or changed (column: old, new).
4. **Lag**: rows whose ``updated`` column is newer than the lag window are not judged; the rest
   are fetched again after the window and only differences that persist are reported.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from proxy.parity.checkpoint import Checkpoint
from proxy.parity.config import ParityConfig
from proxy.parity.errors import ParityConfigError, ParityDataError, ParityError
from proxy.parity.normalise import FloatTolerance, display, instant, same
from proxy.parity.plan import UPDATED, Database, Key, Raw, TablePlan, TableSide, build_plan, is_postgres
from proxy.parity.report import DIFFERENT, EQUAL, ERROR, TableResult
from proxy.parity.throttle import Throttle

T = TypeVar("T")
U = TypeVar("U")
Progress = Callable[[str, int, int], None]


@dataclass(slots=True)
class RunOptions:
    samples: int = 20
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    progress: Progress | None = None
    on_chunk: Callable[[str, int], None] | None = None  # after a chunk is checkpointed (tests stop here)
    on_query: Callable[[str], None] | None = None
    tables: list[str] = field(default_factory=list)  # only these (default: all)


@dataclass(slots=True)
class ChunkPlan:
    """Chunks and segments in key units. ``None`` bounds: one chunk, one segment, no ranges."""

    lo: int | None
    hi: int | None
    chunk_width: int
    segment_width: int

    @property
    def chunks(self) -> list[tuple[int | None, int | None]]:
        if self.lo is None or self.hi is None:
            return [(None, None)]
        return [
            (start, min(self.hi, start + self.chunk_width - 1))
            for start in range(self.lo, self.hi + 1, self.chunk_width)
        ]


def plan_chunks(
    plan: TablePlan, source: dict[str, Any], target: dict[str, Any], config: ParityConfig
) -> ChunkPlan:
    rows = max(source["rows"], target["rows"])
    bounds = [v for v in (source["min"], source["max"], target["min"], target["max"]) if v is not None]
    if not plan.ranged or not bounds:
        return ChunkPlan(None, None, 1, 1)
    lo, hi = int(min(bounds)), int(max(bounds))
    density = rows / (hi - lo + 1)
    segment = max(1, math.ceil(config.segment_rows / density))
    chunk = max(segment, math.ceil(config.chunk_rows / density) // segment * segment)
    return ChunkPlan(lo, hi, chunk, segment)


class Runner:
    """Runs a whole config. Dependencies come in; the runner owns the two databases."""

    def __init__(
        self,
        config: ParityConfig,
        checkpoint: Checkpoint,
        options: RunOptions,
        throttle: Throttle | None = None,
    ) -> None:
        self.config = config
        self.checkpoint = checkpoint
        self.options = options
        self.throttle = throttle or Throttle(config.max_qps)

    def both(self, left: Callable[[], T], right: Callable[[], U]) -> tuple[T, U]:
        """Read both sides at the same time: each database works on its own core."""
        outcome: list[Any] = [None, None]  # value or error, per side

        def source() -> None:
            try:
                outcome[0] = (left(),)
            except BaseException as exc:  # noqa: BLE001 - raised again below, in this thread
                outcome[0] = exc

        thread = threading.Thread(target=source, name="parity-source", daemon=True)
        thread.start()  # one thread per call, not a pool: no executor imported, no idle threads
        try:
            outcome[1] = (right(),)
        except BaseException as exc:  # noqa: BLE001 - the source side's error comes first
            outcome[1] = exc
        thread.join()
        for side in outcome:
            if isinstance(side, BaseException):
                raise side
        return outcome[0][0], outcome[1][0]

    def run(self) -> list[TableResult]:
        source: Database | None = None
        target: Database | None = None
        results: list[TableResult] = []
        try:
            source = self.open(self.config.source)
            target = self.open(self.config.target)
            for table in self.config.tables:
                assert table.name is not None
                if self.options.tables and table.name not in self.options.tables:
                    continue
                stored = self.checkpoint.table(table.name).get("result")
                if stored is not None:
                    results.append(TableResult.from_dict(stored))
                    continue
                started, cpu = time.monotonic(), time.process_time()
                try:
                    result = self.run_table(source, target, table.name)
                except (ParityError, ParityConfigError) as exc:
                    result = TableResult(table.name, ERROR, error=str(exc))
                result.seconds = round(time.monotonic() - started, 3)
                result.client_cpu_seconds = round(time.process_time() - cpu, 3)
                result.finished_at = time.time()
                if result.status != ERROR:
                    self.checkpoint.table(table.name)["result"] = result.as_dict()
                    self.checkpoint.save()
                results.append(result)
        except ParityError as exc:
            results.append(TableResult("*", ERROR, error=str(exc)))
        finally:
            for db in (source, target):
                if db is not None:
                    db.dispose()
        return results

    def open(self, url: str) -> Database:
        """PostgreSQL on both sides: the driver alone (proxy.parity.pg, SQLAlchemy never imported);
        anything else through SQLAlchemy (proxy.parity.sql)."""
        both_postgres = is_postgres(self.config.source) and is_postgres(self.config.target)
        try:
            if both_postgres:
                from proxy.parity.pg import PgDatabase

                return PgDatabase(url, self.throttle, self.config.read_only, self.options.on_query)
            from proxy.parity.sql import Database as AlchemyDatabase
        except ImportError as exc:  # the drivers are in the `parity` extra
            needs = "psycopg2" if both_postgres else "SQLAlchemy 2"
            raise ParityError(
                f"strangler parity sql needs {needs} ({exc.name} is missing): pip install 'strangler[parity]'"
            ) from exc
        return AlchemyDatabase(url, self.throttle, self.config.read_only, self.options.on_query)

    def run_table(self, source_db: Database, target_db: Database, name: str) -> TableResult:
        table = next(t for t in self.config.tables if t.name == name)
        assert table.target_table is not None
        src_table, tgt_table = self.both(
            lambda: source_db.reflect(table.source_table), lambda: target_db.reflect(table.target_table or "")
        )
        plan = build_plan(table, src_table, tgt_table)
        in_db = source_db.hashes_in_db and target_db.hashes_in_db
        source = source_db.side(plan, "source", in_db)
        target = target_db.side(plan, "target", in_db)
        result = TableResult(name, mode="checksums in the database" if in_db else "row hashes in the client")

        # pass 0
        src_agg, tgt_agg = self.both(source.aggregates, target.aggregates)
        result.source_rows, result.target_rows = src_agg["rows"], tgt_agg["rows"]
        result.aggregates = {"source": _jsonable(src_agg), "target": _jsonable(tgt_agg)}

        # pass 1
        state = self.checkpoint.table(name)
        if state["plan"] is None:
            chunks = plan_chunks(plan, src_agg, tgt_agg, self.config)
            state["plan"] = [chunks.lo, chunks.hi, chunks.chunk_width, chunks.segment_width]
        chunks = ChunkPlan(*state["plan"])
        todo = chunks.chunks
        candidates: dict[Key, Raw] = {}
        for raw_list in state["chunks"].values():
            for raw in raw_list:
                raw_key = tuple(raw)
                candidates[source.canonical_key(raw_key)] = raw_key
        for index, (lo, hi) in enumerate(todo):
            chunk_id = f"{lo}:{hi}"
            if chunk_id not in state["chunks"]:
                try:
                    found = self.chunk(source, target, lo, hi, chunks.segment_width)
                except ParityDataError as exc:
                    if not source.in_db_hash:
                        raise
                    # a text value SQL cannot read as the compared kind: the client normalisers
                    # can (it is a difference), so the rest of this table is hashed there
                    source.in_db_hash = target.in_db_hash = False
                    result.mode = f"row hashes in the client (SQL could not read a value: {exc})"
                    found = self.chunk(source, target, lo, hi, chunks.segment_width)
                candidates.update(found)
                state["chunks"][chunk_id] = [list(raw) for raw in found.values()]
                self.checkpoint.save()
                if self.options.on_chunk:
                    self.options.on_chunk(name, index)
            if self.options.progress:
                self.options.progress(name, index + 1, len(todo))

        # pass 2 and the lag window
        raws = list(candidates.values())
        diffs = self.judge(plan, source, target, raws, result)
        if diffs and self.config.lag_seconds > 0:
            before = len(diffs)
            self.options.sleep(self.config.lag_seconds)
            diffs = self.judge(plan, source, target, [candidates[k] for k in diffs], result)
            result.resolved_after_lag = before - len(diffs)
        self.classify(diffs, result)
        return result

    def chunk(
        self, source: TableSide, target: TableSide, lo: int | None, hi: int | None, width: int
    ) -> dict[Key, Raw]:
        """Candidate keys of one chunk: rows whose hash differs or that exist on one side only."""
        ranges: list[tuple[int, int]] | None
        if source.in_db_hash:
            left, right = self.both(
                lambda: source.checksums(lo, hi, width), lambda: target.checksums(lo, hi, width)
            )
            differing = sorted(s for s in set(left) | set(right) if left.get(s) != right.get(s))
            if not differing:
                return {}
            if lo is None or hi is None:
                ranges = None
            else:
                ranges = _merge([(lo + s * width, min(hi, lo + (s + 1) * width - 1)) for s in differing])
        else:
            ranges = None if lo is None or hi is None else [(lo, hi)]
        src_rows, tgt_rows = self.both(lambda: source.row_hashes(ranges), lambda: target.row_hashes(ranges))
        found: dict[Key, Raw] = {}
        for key, (raw, digest) in src_rows.items():
            other = tgt_rows.get(key)
            if other is None or other[1] != digest:
                found[key] = raw
        for key, (raw, _digest) in tgt_rows.items():
            if key not in src_rows:
                found[key] = raw
        return found

    def judge(
        self, plan: TablePlan, source: TableSide, target: TableSide, raws: list[Raw], result: TableResult
    ) -> dict[Key, tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, list[Any]]]]:
        """Fetch candidate rows on both sides and keep the real differences (recent rows skipped)."""
        if not raws:
            return {}
        src_rows, tgt_rows = self.both(lambda: source.fetch(raws), lambda: target.fetch(raws))
        cutoff = self.options.now() - timedelta(seconds=self.config.lag_seconds)
        limits = plan.table.float_tolerance
        tolerance = FloatTolerance(limits.ulps, limits.relative) if limits is not None else None
        diffs: dict[Key, tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, list[Any]]]] = {}
        for key in {source.canonical_key(raw) for raw in raws}:
            old, new = src_rows.get(key), tgt_rows.get(key)
            if old is None and new is None:
                continue
            if plan.source_updated is not None and (_recent(old, cutoff) or _recent(new, cutoff)):
                result.skipped_recent += 1
                continue
            if old is not None and new is not None:
                changed = {
                    c.name: [display(old[c.name]), display(new[c.name])]
                    for c in plan.columns
                    if not same(old[c.name], new[c.name], c.kind, plan.precision, tolerance)
                }
                if not changed:
                    continue
                diffs[key] = (old, new, changed)
            else:
                diffs[key] = (old, new, {})
        return diffs

    def classify(
        self,
        diffs: dict[Key, tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, list[Any]]]],
        result: TableResult,
    ) -> None:
        limit = self.options.samples
        key_names = [c for c in self.config.tables if c.name == result.table][0].target_key
        for key in sorted(diffs, key=_sort_key):
            old, new, changed = diffs[key]
            row = old if old is not None else new
            assert row is not None
            shown = [display(row[name]) for name in key_names]
            shown_key: Any = shown[0] if len(shown) == 1 else shown
            if new is None:
                result.missing += 1
                if len(result.samples["missing"]) < limit:
                    result.samples["missing"].append(shown_key)
            elif old is None:
                result.extra += 1
                if len(result.samples["extra"]) < limit:
                    result.samples["extra"].append(shown_key)
            else:
                result.changed += 1
                for column in changed:
                    result.changed_columns[column] = result.changed_columns.get(column, 0) + 1
                if len(result.samples["changed"]) < limit:
                    result.samples["changed"].append({"key": shown_key, "columns": changed})
        result.status = DIFFERENT if result.differences else EQUAL


def _recent(row: dict[str, Any] | None, cutoff: datetime) -> bool:
    if row is None:
        return False
    when = instant(row.get(UPDATED))
    return when is not None and when > cutoff


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _sort_key(key: Key) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p is not None and p.lstrip("-").isdigit() else (1, str(p)) for p in key)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: display(v) for k, v in values.items()}

"""The column plan and what every SQL path shares, with no database library imported.

Two paths run the queries: :mod:`proxy.parity.pg` (PostgreSQL on both sides: the driver alone,
checksums in the database) and :mod:`proxy.parity.sql` (SQLAlchemy Core: any other dialect or a
mixed pair, row hashes in the client). Both reflect a table into a :class:`Reflected` (column
names, comparison kinds, type text), build the same :class:`TablePlan` from it, and subclass
:class:`TableSide`, which turns their rows into candidate keys and fetched rows the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from proxy.parity.config import TableMap
from proxy.parity.errors import ParityConfigError
from proxy.parity.normalise import canonical, common_kind, row_hash
from proxy.parity.throttle import Throttle

FETCH_BATCH = 500
RANGE_BATCH = 100  # key ranges per row-hash query
UPDATED = "__updated__"

Key = tuple[Any, ...]  # canonical key (matches across sides)
Raw = tuple[Any, ...]  # the key as one side stores it

# Text output of timestamps, floats and bytea depends on session settings: pin them, so two
# servers configured differently still render equal values as equal text. Floats are read
# exactly (extra_float_digits 3: the shortest exact text from PostgreSQL 12, 17 digits before);
# the hash queries render them at the type's own digits instead (proxy.parity.pg.HASH_SETTINGS).
PG_SESSION = (
    "SET TIME ZONE 'UTC'",
    "SET datestyle = 'ISO, YMD'",
    "SET intervalstyle = 'postgres'",
    "SET extra_float_digits = 3",
    "SET bytea_output = 'hex'",
)
PG_READ_ONLY = "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"  # parity never writes


def is_postgres(url: str) -> bool:
    """``postgresql://``, ``postgres://`` or ``postgresql+<driver>://``."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower().split("+", 1)[0] in ("postgresql", "postgres")


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class ReflectedColumn:
    name: str
    kind: str  # proxy.parity.normalise.KINDS
    type_text: str | None = None  # the SQL type as PostgreSQL spells it (same text: same output)


@dataclass(frozen=True, slots=True)
class Reflected:
    """One table as one side stores it; ``handle`` is the path's own object (a SQLAlchemy Table)."""

    name: str
    columns: tuple[ReflectedColumn, ...]
    handle: Any = None


@dataclass(frozen=True, slots=True)
class ColumnPlan:
    """One compared column: its report name (the target's), its kind, and where each side reads it:
    ``source`` is a source column name, or None when ``transform`` (SQL) produces the value."""

    name: str
    kind: str
    source: str | None
    transform: str | None
    source_kind: str
    target_kind: str
    same_type: bool = False  # plain columns of one SQL type: their text output already agrees


@dataclass(slots=True)
class TablePlan:
    table: TableMap
    source: Reflected
    target: Reflected
    key: list[ColumnPlan]
    columns: list[ColumnPlan]
    source_updated: str | None = None
    target_updated: str | None = None
    precision: int = 6

    @property
    def ranged(self) -> bool:
        """Key ranges need an integer first key column on both sides."""
        first = self.key[0]
        return first.source_kind == "int" and first.target_kind == "int"

    @property
    def all_columns(self) -> list[ColumnPlan]:
        return self.key + self.columns


def build_plan(table: TableMap, source: Reflected, target: Reflected) -> TablePlan:
    """Map every target column to a source expression; anything unaccounted for is an error,
    never a column silently left out of the comparison."""
    problems: list[str] = []
    src_cols = {c.name: c for c in source.columns}
    tgt_cols = {c.name: c for c in target.columns}
    inverse = {t: s for s, t in table.rename.items()}
    for name in list(table.rename) + table.key + table.ignore + ([table.updated] if table.updated else []):
        if name not in src_cols:
            problems.append(f"source column {name!r} is not in {table.source_table}")
    for name in table.ignore_target:
        if name not in tgt_cols:
            problems.append(f"target column {name!r} is not in {table.target_table}")
    ignored_targets = set(table.ignore_target) | {table.target_name(c) for c in table.ignore}
    used_sources: set[str] = set()
    plans: dict[str, ColumnPlan] = {}
    for name, column in tgt_cols.items():
        if name in ignored_targets:
            continue
        if name in table.transforms:
            used_sources |= _mentioned(table.transforms[name], src_cols)
            source_name, transform, source_kind, same = None, table.transforms[name], column.kind, False
        else:
            source_name = inverse.get(name, name)
            if source_name not in src_cols or source_name in table.ignore:
                problems.append(
                    f"target column {name!r} has no source column: "
                    "add it to rename, transforms or ignore_target"
                )
                continue
            used_sources.add(source_name)
            own = src_cols[source_name]
            transform, source_kind = None, own.kind
            same = own.type_text is not None and own.type_text == column.type_text
        kind = common_kind(source_kind, column.kind)
        plans[name] = ColumnPlan(name, kind, source_name, transform, source_kind, column.kind, same)
    for name in table.transforms:
        if name not in tgt_cols:
            problems.append(f"transform target {name!r} is not a column of {table.target_table}")
    unused = [c for c in src_cols if c not in used_sources and c not in table.ignore and c != table.updated]
    for name in unused:
        problems.append(
            f"source column {name!r} maps to nothing in {table.target_table}: rename, transform or ignore it"
        )
    key_names = table.target_key
    for name in key_names:
        if name not in plans:
            problems.append(f"key column {name!r} is not comparable on both sides")
    if problems:
        raise ParityConfigError(f"table {table.name}: " + "; ".join(problems))
    key = [plans[name] for name in key_names]
    columns = [plan for name, plan in plans.items() if name not in key_names]
    source_updated = target_updated = None
    if table.updated:
        source_updated = table.updated
        target_name = table.target_name(table.updated)
        target_updated = target_name if target_name in tgt_cols else None
    return TablePlan(
        table, source, target, key, columns, source_updated, target_updated, table.timestamp_precision
    )


def _mentioned(expression: str, columns: Iterable[str]) -> set[str]:
    import re

    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression))
    return {c for c in columns if c in words}


OnQuery = Callable[[str], None] | None


class Database:
    """One side's connection, whichever path runs it: every query paced by the run's throttle
    and reported to ``on_query`` (tests count them)."""

    dialect = ""
    hashes_in_db = False  # can hash rows in SQL (both sides must)

    def __init__(
        self, url: str, throttle: Throttle, read_only: bool = True, on_query: OnQuery = None
    ) -> None:
        self.throttle = throttle
        self.read_only = read_only
        self.on_query = on_query
        self.open(url)

    def open(self, url: str) -> None:
        """Set up (a path connects lazily or builds its engine here)."""
        raise NotImplementedError

    def pace(self, label: str | None) -> None:
        """Before each query (``label`` None: reflection, paced but not counted)."""
        self.throttle.wait()
        if label is not None and self.on_query:
            self.on_query(label)

    def reflect(self, name: str) -> Reflected:
        raise NotImplementedError

    def side(self, plan: TablePlan, side: str, in_db_hash: bool) -> TableSide:
        raise NotImplementedError

    def dispose(self) -> None:
        raise NotImplementedError


class TableSide:
    """The queries for one table on one database (``side`` is ``source`` or ``target``). A path
    supplies the rows (:meth:`_aggregate`, :meth:`_hash_rows`, :meth:`_fetch_rows`); what they
    mean is decided here, once for both paths."""

    def __init__(self, plan: TablePlan, side: str, in_db_hash: bool = False) -> None:
        self.plan = plan
        self.side = side
        self.in_db_hash = in_db_hash
        self.where = plan.table.where if side == "source" else plan.table.target_where
        self.updated = plan.source_updated if side == "source" else plan.target_updated

    def side_kind(self, column: ColumnPlan) -> str:
        return column.source_kind if self.side == "source" else column.target_kind

    def column_name(self, column: ColumnPlan) -> str | None:
        """This side's column, or None for a transform (source side only)."""
        return column.source if self.side == "source" else column.name

    def canonical_key(self, raw: Raw) -> Key:
        precision = self.plan.precision
        return tuple(canonical(v, c.kind, precision) for v, c in zip(raw, self.plan.key, strict=True))

    # pass 0
    def aggregates(self) -> dict[str, Any]:
        """Rows, key bounds and sums of numeric columns: cheap, and a first verdict on its own."""
        numbers = ("int", "decimal")  # summed only where both sides store numbers: no cast of text
        numeric = [
            c
            for c in self.plan.columns
            if c.kind in numbers and {c.source_kind, c.target_kind} <= set(numbers)
        ][:4]
        row = self._aggregate(numeric)
        result: dict[str, Any] = {"rows": row[0], "min": row[1], "max": row[2]}
        for column, total in zip(numeric, row[3:], strict=True):
            result[f"sum:{column.name}"] = _plain_number(total)
        return result

    def _aggregate(self, summed: list[ColumnPlan]) -> Sequence[Any]:
        """``(count, min of the first key, max of it, *sums)`` over the table."""
        raise NotImplementedError

    # pass 1
    def checksums(self, lo: int | None, hi: int | None, width: int) -> dict[int, int]:
        """``{segment: rows << 64 | sum of row hashes mod 2**64}`` for one chunk (in-database
        paths): one int per segment, not a tuple of two, as a chunk has thousands of them."""
        raise NotImplementedError

    def row_hashes(self, ranges: Sequence[tuple[int, int]] | None) -> dict[Key, tuple[Raw, int]]:
        """``{canonical key: (raw key, row hash)}`` for the given key ranges (None: everything).
        Rows are ``key columns + (row hash,)`` in the database, or ``key columns + columns``."""
        found: dict[Key, tuple[Raw, int]] = {}
        nkey = len(self.plan.key)
        columns, precision = self.plan.all_columns, self.plan.precision
        batches: list[Sequence[tuple[int, int]] | None] = (
            [ranges[i : i + RANGE_BATCH] for i in range(0, len(ranges), RANGE_BATCH)]
            if ranges is not None
            else [None]
        )
        for batch in batches:
            for row in self._hash_rows(batch):
                raw = tuple(row[:nkey])
                if self.in_db_hash:
                    digest = int(row[nkey])
                else:
                    digest = row_hash(
                        [canonical(v, c.kind, precision) for v, c in zip(row, columns, strict=True)]
                    )
                found[self.canonical_key(raw)] = (raw, digest)
        return found

    def _hash_rows(self, ranges: Sequence[tuple[int, int]] | None) -> Iterable[Sequence[Any]]:
        raise NotImplementedError

    # pass 2
    def fetch(self, raws: Sequence[Raw]) -> dict[Key, dict[str, Any]]:
        """Whole rows (target column names, plus ``UPDATED``) for the given keys, in batches."""
        names = [c.name for c in self.plan.all_columns] + ([UPDATED] if self.updated else [])
        nkey = len(self.plan.key)
        rows: dict[Key, dict[str, Any]] = {}
        for i in range(0, len(raws), FETCH_BATCH):
            batch = [tuple(raw) for raw in raws[i : i + FETCH_BATCH]]
            for row in self._fetch_rows(batch):
                rows[self.canonical_key(tuple(row[:nkey]))] = dict(zip(names, row, strict=True))
        return rows

    def _fetch_rows(self, raws: list[Raw]) -> Iterable[Sequence[Any]]:
        """Rows of ``all_columns`` (then the updated column, when there is one) for these keys."""
        raise NotImplementedError


def _plain_number(value: Any) -> Any:
    """Sums arrive as Decimal (PostgreSQL) or float (SQLite): reported as canonical text."""
    return canonical(value, "decimal") if isinstance(value, Decimal | float) else value

"""The SQL side: reflection, the column plan, and every query parity runs (SQLAlchemy 2 Core).

Two ways to hash a row:

* **in the database** when both sides are PostgreSQL: each compared column is rendered to
  canonical text by SQL (``trim_scale`` for decimals, floats at their type's digits, timestamps
  cast to ``timestamptz(p)`` so the database rounds them as it stores them, ``::jsonb`` for JSON,
  ``CASE`` over the spellings for booleans: never a cast that can fail on a value), and the row's
  text is hashed with ``hashtextextended`` (64-bit). Segment checksums are ``count`` and ``sum`` of those
  hashes grouped by key range in one scan: order-free, and nothing but one row per segment leaves
  the server.
* **in the client** for any other dialect or a mixed pair (SQLite has no md5): rows are streamed,
  normalised by :mod:`proxy.parity.normalise` and hashed with blake2b. Correct everywhere, slower.

Either way the verdict on a row comes from the Python normalisers; hashes only find candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from proxy.parity.config import TableMap
from proxy.parity.errors import ParityConfigError, ParityDataError, ParityError
from proxy.parity.normalise import FALSE_WORDS, FLOATS, MASK64, TRUE_WORDS, canonical, common_kind, row_hash
from proxy.parity.throttle import Throttle

FETCH_BATCH = 500
UPDATED = "__updated__"

Key = tuple[Any, ...]  # canonical key (matches across sides)
Raw = tuple[Any, ...]  # the key as one side stores it


class _Bit64(sa.types.UserDefinedType[Any]):
    cache_ok = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "bit(64)"


@dataclass(frozen=True, slots=True)
class ColumnPlan:
    """One compared column: its report name (the target's), kind and expression on each side."""

    name: str
    kind: str
    source: Any  # ColumnElement
    target: Any
    source_kind: str
    target_kind: str
    same_type: bool = False  # plain columns of one SQL type: their text output already agrees


@dataclass(slots=True)
class TablePlan:
    table: TableMap
    source_table: sa.Table
    target_table: sa.Table
    key: list[ColumnPlan]
    columns: list[ColumnPlan]
    source_updated: Any = None
    target_updated: Any = None
    precision: int = 6

    @property
    def ranged(self) -> bool:
        """Key ranges need an integer first key column on both sides."""
        first = self.key[0]
        return first.source_kind == "int" and first.target_kind == "int"

    @property
    def all_columns(self) -> list[ColumnPlan]:
        return self.key + self.columns


class Database:
    """One side's engine: read-only sessions where the dialect allows, every query paced."""

    def __init__(
        self,
        url: str,
        throttle: Throttle,
        read_only: bool = True,
        on_query: Callable[[str], None] | None = None,
    ) -> None:
        try:
            self.engine: Engine = (
                sa.create_engine(url, pool_size=4, max_overflow=4)
                if not url.startswith("sqlite")
                else sa.create_engine(url)
            )
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ParityError(f"cannot use database URL ({type(exc).__name__}: {_first_line(exc)})") from exc
        self.dialect = self.engine.dialect.name
        self.throttle = throttle
        self.on_query = on_query
        if self.dialect == "postgresql":
            event.listen(self.engine, "connect", _pg_session_read_only if read_only else _pg_session)
        self.server_version: tuple[int, ...] = ()

    def reflect(self, name: str) -> sa.Table:
        schema, _, table = name.rpartition(".")
        self.throttle.wait()
        try:
            with self.engine.connect() as conn:
                version = self.engine.dialect.server_version_info or ()
                self.server_version = tuple(int(v) for v in version if isinstance(v, int))
                return sa.Table(table, sa.MetaData(), autoload_with=conn, schema=schema or None)
        except NoSuchTableError as exc:
            raise ParityError(f"table {name!r} does not exist in the {self.dialect} database") from exc
        except SQLAlchemyError as exc:
            raise ParityError(f"cannot read {name!r}: {_first_line(exc)}") from exc

    def run(self, label: str, statement: Any, settings: Sequence[str] = ()) -> Sequence[Any]:
        """One query, in its own transaction; ``settings`` (``SET LOCAL``) apply to it alone."""
        self.throttle.wait()
        if self.on_query:
            self.on_query(label)
        try:
            with self.engine.connect() as conn:
                for setting in settings if self.dialect == "postgresql" else ():
                    conn.exec_driver_sql(setting)
                return conn.execute(statement).all()
        except SQLAlchemyError as exc:
            data = str(getattr(getattr(exc, "orig", None), "sqlstate", "") or "").startswith("22")
            error = ParityDataError if data else ParityError
            raise error(f"{label} failed on the {self.dialect} side: {_first_line(exc)}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


# Text output of timestamps, floats and bytea depends on session settings: pin them, so two
# servers configured differently still render equal values as equal text. Floats are read
# exactly (extra_float_digits 3: the shortest exact text from PostgreSQL 12, 17 digits before);
# the hash queries render them at the type's own digits instead (HASH_SETTINGS).
_PG_SESSION = (
    "SET TIME ZONE 'UTC'",
    "SET datestyle = 'ISO, YMD'",
    "SET intervalstyle = 'postgres'",
    "SET extra_float_digits = 3",
    "SET bytea_output = 'hex'",
)
# In the hash queries a real prints 6 significant digits and a double precision 15 (%g): the
# canonical text of :mod:`proxy.parity.normalise`'s float kinds, on every PostgreSQL version.
HASH_SETTINGS = ("SET LOCAL extra_float_digits = 0",)
# float8 -> real refuses what it cannot hold; these are the limits of C's round-to-nearest
_FLOAT4_OVERFLOW = 3.4028235677973366e38  # FLT_MAX + half an ulp: from here on, infinity
_FLOAT4_UNDERFLOW = 2.0**-150  # half the smallest denormal: up to here, zero


def _pg_session(dbapi_connection: Any, _record: Any, read_only: bool = False) -> None:
    cursor = dbapi_connection.cursor()
    for statement in _PG_SESSION:
        cursor.execute(statement)
    if read_only:  # parity never writes: say so, so a mistyped transform cannot change data
        cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    cursor.close()
    dbapi_connection.commit()


def _pg_session_read_only(dbapi_connection: Any, record: Any) -> None:
    _pg_session(dbapi_connection, record, read_only=True)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- the plan ---------------------------------------------------------------------------------


def kind_of(sql_type: Any, dialect: str = "postgresql") -> str:
    """The comparison kind of one reflected SQLAlchemy type (``dialect`` tells what a ``REAL`` is)."""
    if isinstance(sql_type, sa.types.Boolean):
        return "bool"
    if isinstance(sql_type, sa.types.Integer):
        return "int"
    if isinstance(sql_type, sa.types.Float):  # before Numeric: SQLAlchemy < 2.1 made it one
        return _float_kind(sql_type, dialect)
    if isinstance(sql_type, sa.types.Numeric):
        return "decimal"
    if isinstance(sql_type, sa.types.DateTime):
        return "timestamp"
    if isinstance(sql_type, sa.types.Date):
        return "date"
    if isinstance(sql_type, sa.types.JSON):
        return "json"
    if isinstance(sql_type, sa.types._Binary):
        return "bytes"
    return "text"


def _float_kind(sql_type: Any, dialect: str) -> str:
    """``float4`` for single precision (PostgreSQL ``real``, MySQL ``FLOAT``, ``float(p <= 24)``),
    ``float8`` for double (and for SQLite, whose REAL is always 8 bytes)."""
    if isinstance(sql_type, sa.types.Double) or dialect == "sqlite":
        return "float8"
    if isinstance(sql_type, sa.types.REAL) or dialect in ("mysql", "mariadb"):
        return "float4"
    precision = getattr(sql_type, "precision", None)
    return "float4" if isinstance(precision, int) and precision <= 24 else "float8"


def build_plan(
    table: TableMap,
    source: sa.Table,
    target: sa.Table,
    source_dialect: str = "postgresql",
    target_dialect: str = "postgresql",
) -> TablePlan:
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
        target_kind = kind_of(column.type, target_dialect)
        if name in table.transforms:
            expression: Any = sa.literal_column(f"({table.transforms[name]})")
            used_sources |= _mentioned(table.transforms[name], src_cols)
            source_kind = target_kind
            source_expr: Any = expression
        else:
            source_name = inverse.get(name, name)
            if source_name not in src_cols or source_name in table.ignore:
                problems.append(
                    f"target column {name!r} has no source column: "
                    "add it to rename, transforms or ignore_target"
                )
                continue
            used_sources.add(source_name)
            source_expr = src_cols[source_name]
            source_kind = kind_of(src_cols[source_name].type, source_dialect)
        kind = common_kind(source_kind, target_kind)
        same = (
            isinstance(source_expr, sa.Column) and _type_text(source_expr) == _type_text(column) is not None
        )
        plans[name] = ColumnPlan(name, kind, source_expr, column, source_kind, target_kind, same)
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
        source_updated = src_cols[table.updated]
        target_name = table.target_name(table.updated)
        target_updated = tgt_cols.get(target_name)
    return TablePlan(
        table, source, target, key, columns, source_updated, target_updated, table.timestamp_precision
    )


def _type_text(column: sa.Column[Any]) -> str | None:
    try:
        return str(column.type.compile(dialect=postgresql.dialect()))
    except Exception:  # noqa: BLE001 - a type PostgreSQL cannot spell is never "the same type"
        return None


def _mentioned(expression: str, columns: Iterable[str]) -> set[str]:
    import re

    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expression))
    return {c for c in columns if c in words}


# --- one table on one side --------------------------------------------------------------------


@dataclass(slots=True)
class TableSide:
    """The queries for one table on one database. ``side`` is ``source`` or ``target``."""

    db: Database
    plan: TablePlan
    side: str
    in_db_hash: bool = False
    table: sa.Table = field(init=False)
    where: Any = field(init=False)

    def __post_init__(self) -> None:
        self.table = self.plan.source_table if self.side == "source" else self.plan.target_table
        clause = self.plan.table.where if self.side == "source" else self.plan.table.target_where
        self.where = sa.text(clause) if clause else None

    def expr(self, column: ColumnPlan) -> Any:
        return column.source if self.side == "source" else column.target

    def side_kind(self, column: ColumnPlan) -> str:
        return column.source_kind if self.side == "source" else column.target_kind

    @property
    def range_column(self) -> Any:
        return self.expr(self.plan.key[0])

    def _filtered(self, statement: Any, lo: int | None = None, hi: int | None = None) -> Any:
        statement = statement.select_from(self.table)
        if self.where is not None:
            statement = statement.where(self.where)
        if lo is not None and hi is not None:
            statement = statement.where(self.range_column >= lo, self.range_column <= hi)
        return statement

    # pass 0
    def aggregates(self) -> dict[str, Any]:
        """Rows, key bounds and sums of numeric columns: cheap, and a first verdict on its own."""
        first = self.range_column
        numbers = ("int", "decimal")  # summed only where both sides store numbers: no cast of text
        numeric = [
            c
            for c in self.plan.columns
            if c.kind in numbers and {c.source_kind, c.target_kind} <= set(numbers)
        ][:4]
        items = [
            sa.func.count().label("rows"),
            sa.func.min(first).label("min"),
            sa.func.max(first).label("max"),
        ]
        items += [sa.func.sum(sa.cast(self.expr(c), sa.Numeric)).label(f"sum:{c.name}") for c in numeric]
        row = self.db.run(f"aggregates of {self.plan.table.name}", self._filtered(sa.select(*items)))[0]
        result = dict(row._mapping)
        return {k: (_plain_number(v) if k.startswith("sum:") else v) for k, v in result.items()}

    # pass 1, in the database
    def _sql_value(self, column: ColumnPlan) -> Any:
        """The column as it enters the row text: itself when both sides store the same type (its
        text output already agrees), else rendered to the canonical form of its kind."""
        expr = self.expr(column)
        kind, own = column.kind, self.side_kind(column)
        if column.same_type and not (kind == "timestamp" and self.plan.precision < 6) and kind not in FLOATS:
            return expr
        if kind in ("int", "decimal"):
            numeric: Any = sa.cast(expr, sa.Numeric)
            if self.db.server_version[:1] and self.db.server_version[0] >= 13:
                numeric = sa.func.trim_scale(numeric)
            return numeric
        if kind in FLOATS:  # printed at the type's digits (HASH_SETTINGS)
            return _sql_float(expr, own, kind)
        if kind == "bool":
            return _sql_bool(expr, own)
        if kind == "timestamp":
            # the database rounds to timestamptz(p) as it rounds what it stores (half away from
            # zero, counted from 2000-01-01); naive values are UTC (the session's zone)
            return sa.cast(expr, postgresql.TIMESTAMP(timezone=True, precision=self.plan.precision))
        if kind == "json":
            return sa.cast(expr, postgresql.JSONB)
        if kind == "date":
            return sa.cast(expr, sa.Date)
        if kind == "bytes":
            return expr
        return sa.cast(expr, sa.Text)

    def _sql_hash(self) -> Any:
        """64-bit hash of the row's text. ``row(...)::text`` quotes values with separators and
        writes NULL as nothing and '' as "", so the text is unambiguous, and it is built in C."""
        text = sa.cast(sa.func.row(*(self._sql_value(c) for c in self.plan.all_columns)), sa.Text)
        if self.db.server_version[:1] and self.db.server_version[0] < 11:  # no hashtextextended
            return sa.cast(
                sa.cast(sa.literal("x") + sa.func.substr(sa.func.md5(text), 1, 16), _Bit64()), sa.BigInteger
            )
        return sa.func.hashtextextended(text, 0)

    def checksums(self, lo: int | None, hi: int | None, width: int) -> dict[int, tuple[int, int]]:
        """``{segment: (rows, sum of row hashes mod 2**64)}`` for one chunk, in one scan."""
        if lo is None or hi is None:
            segment: Any = sa.literal(0)
        else:
            segment = (sa.cast(self.range_column, sa.BigInteger) - lo) // width  # integer division
        statement = self._filtered(
            sa.select(segment.label("seg"), sa.func.count(), sa.func.sum(self._sql_hash())), lo, hi
        ).group_by(sa.text("1"))
        # the planner cannot know there are few segments, and sorts every row to group them;
        # hashing into a few thousand groups is much cheaper
        rows = self.db.run(
            f"checksums of {self.plan.table.name}", statement, ("SET LOCAL enable_sort = off", *HASH_SETTINGS)
        )
        return {int(row[0]): (int(row[1]), int(row[2]) & MASK64) for row in rows}

    # pass 1, streaming
    def row_hashes(self, ranges: Sequence[tuple[int, int]] | None) -> dict[Key, tuple[Raw, int]]:
        """``{canonical key: (raw key, row hash)}`` for the given key ranges (None: everything)."""
        keys = [self.expr(c).label(f"k{i}") for i, c in enumerate(self.plan.key)]
        found: dict[Key, tuple[Raw, int]] = {}
        batches: list[Sequence[tuple[int, int]] | None] = (
            [ranges[i : i + 100] for i in range(0, len(ranges), 100)] if ranges is not None else [None]
        )
        for batch in batches:
            if self.in_db_hash:
                statement = sa.select(*keys, self._sql_hash())
            else:
                statement = sa.select(
                    *keys, *(self.expr(c).label(f"c{i}") for i, c in enumerate(self.plan.columns))
                )
            statement = self._filtered(statement)
            if batch is not None:
                column = self.range_column
                statement = statement.where(sa.or_(*(column.between(a, b) for a, b in batch)))
            nkey = len(keys)
            settings = HASH_SETTINGS if self.in_db_hash else ()
            for row in self.db.run(f"row hashes of {self.plan.table.name}", statement, settings):
                raw = tuple(row[:nkey])
                key = self.canonical_key(raw)
                if self.in_db_hash:
                    found[key] = (raw, int(row[nkey]))
                else:
                    columns, precision = self.plan.all_columns, self.plan.precision
                    pieces = [canonical(v, c.kind, precision) for v, c in zip(row, columns, strict=False)]
                    found[key] = (raw, row_hash(pieces))
        return found

    def canonical_key(self, raw: Raw) -> Key:
        precision = self.plan.precision
        return tuple(canonical(v, c.kind, precision) for v, c in zip(raw, self.plan.key, strict=True))

    # pass 2
    def fetch(self, raws: Sequence[Raw]) -> dict[Key, dict[str, Any]]:
        """Whole rows (target column names) for the given keys, in batches."""
        items = [self.expr(c).label(c.name) for c in self.plan.all_columns]
        updated = self.plan.source_updated if self.side == "source" else self.plan.target_updated
        if updated is not None:
            items.append(updated.label(UPDATED))
        key_exprs = [self.expr(c) for c in self.plan.key]
        rows: dict[Key, dict[str, Any]] = {}
        for i in range(0, len(raws), FETCH_BATCH):
            batch = [tuple(raw) for raw in raws[i : i + FETCH_BATCH]]
            if len(key_exprs) == 1:
                condition = key_exprs[0].in_([raw[0] for raw in batch])
            else:
                condition = sa.tuple_(*key_exprs).in_(batch)
            statement = self._filtered(sa.select(*items)).where(condition)
            for row in self.db.run(f"rows of {self.plan.table.name}", statement):
                values = dict(row._mapping)
                raw = tuple(values[c.name] for c in self.plan.key)
                rows[self.canonical_key(raw)] = values
        return rows


def _sql_float(expr: Any, own: str, kind: str) -> Any:
    """A float in the compared type, plus zero (IEEE: -0 + 0 is 0, anything else is itself). A
    double (or a number) compared as a real is rounded to one as C rounds, never through a cast
    that refuses overflow or underflow. (PostgreSQL sorts NaN above every number.)"""
    real_zero: Any = sa.literal_column("0::real")
    if own == kind:
        return expr + (real_zero if kind == "float4" else sa.literal_column("0::float8"))
    double = expr if own == "float8" else sa.cast(expr, postgresql.DOUBLE_PRECISION)
    if kind == "float8":
        return double + sa.literal_column("0::float8")
    return sa.case(
        (
            double == sa.cast(sa.literal("NaN"), postgresql.DOUBLE_PRECISION),
            sa.cast(sa.literal("NaN"), postgresql.REAL),
        ),
        (double >= _FLOAT4_OVERFLOW, sa.cast(sa.literal("Infinity"), postgresql.REAL)),
        (double <= -_FLOAT4_OVERFLOW, sa.cast(sa.literal("-Infinity"), postgresql.REAL)),
        (sa.func.abs(double) <= _FLOAT4_UNDERFLOW, real_zero),
        else_=sa.cast(double, postgresql.REAL) + real_zero,
    )


def _sql_bool(expr: Any, own: str) -> Any:
    """``1``, ``0``, NULL, or ``?<text>`` for a value that spells no boolean: the canonical
    text of :func:`proxy.parity.normalise.canonical`, without a cast that can fail."""
    if own == "bool":
        return sa.cast(expr, sa.Integer)
    if own in ("int", "decimal", *FLOATS):
        return sa.case((expr == 0, "0"), (expr.is_not(None), "1"))
    text = sa.cast(expr, sa.Text)
    word = sa.func.lower(sa.func.btrim(text, sa.literal(" \t\n\r\x0b\x0c")))
    return sa.case(
        (word.in_(sorted(TRUE_WORDS)), "1"),
        (word.in_(sorted(FALSE_WORDS)), "0"),
        else_=sa.literal("?") + text,
    )


def _plain_number(value: Any) -> Any:
    """Sums arrive as Decimal (PostgreSQL) or float (SQLite): reported as canonical text."""
    return canonical(value, "decimal") if isinstance(value, Decimal | float) else value

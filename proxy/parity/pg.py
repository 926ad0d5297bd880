"""The PostgreSQL path: both sides PostgreSQL, run on the driver alone (psycopg2), no SQLAlchemy.

Rows are hashed in the database: each compared column is rendered to canonical text by SQL
(``trim_scale`` for decimals, floats at their type's digits, timestamps cast to
``timestamptz(p)`` so the database rounds them as it stores them, ``::jsonb`` for JSON, ``CASE``
over the spellings for booleans: never a cast that can fail on a value), and the row's text is
hashed with ``hashtextextended`` (64-bit). Segment checksums are ``count`` and ``sum`` of those
hashes grouped by key range in one scan: order-free, and nothing but one row per segment leaves
the server. When SQL cannot read a value as the compared kind, the runner switches the table to
row hashes in the client (the same :class:`~proxy.parity.plan.TableSide` logic as the SQLAlchemy
path).

Why psycopg2 and not psycopg 3 or SQLAlchemy: a process that imports psycopg 3 holds about 34 MB
before it does anything (its error tables, every type adapter, asyncio), SQLAlchemy and its
PostgreSQL dialect 49 MB; psycopg2 21 MB. Parity on a million rows must not need more memory
than the tools it replaces.

Every statement is composed with :mod:`psycopg2.sql`: table and column names from the config are
``Identifier`` (quoted by the driver), values ``Literal`` (adapted by the driver, as its
parameters are: psycopg2 always binds in the client). Statements go out without a parameter
list, so a ``%`` in a name, a transform or a ``where`` clause is never read as a placeholder.
``transforms`` and ``where`` are SQL by design (the operator writes them) and go in as written,
in parentheses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg2
from psycopg2 import sql

from proxy.parity import plan as shared
from proxy.parity.errors import ParityDataError, ParityError
from proxy.parity.normalise import FALSE_WORDS, FLOATS, MASK64, TRUE_WORDS
from proxy.parity.plan import ColumnPlan, TablePlan, TableSide

# In the hash queries a real prints 6 significant digits and a double precision 15 (%g): the
# canonical text of :mod:`proxy.parity.normalise`'s float kinds, on every PostgreSQL version.
HASH_SETTINGS = ("SET LOCAL extra_float_digits = 0",)
# the planner cannot know there are few segments, and sorts every row to group them; hashing
# into a few thousand groups is much cheaper
CHECKSUM_SETTINGS = ("SET LOCAL enable_sort = off", *HASH_SETTINGS)
# rows streamed through a server-side cursor, this many per round trip; planned for all of them
# (a cursor is planned for its first 10% by default)
STREAM_ROWS = 5000
STREAM_SETTINGS = ("SET LOCAL cursor_tuple_fraction = 1",)
# float8 -> real refuses what it cannot hold; these are the limits of C's round-to-nearest
_FLOAT4_OVERFLOW = 3.4028235677973366e38  # FLT_MAX + half an ulp: from here on, infinity
_FLOAT4_UNDERFLOW = 2.0**-150  # half the smallest denormal: up to here, zero
_BLANKS = " \t\n\r\x0b\x0c"  # what btrim takes off a boolean's spelling

# pg_type.typname of the base type (domains resolved) -> comparison kind; anything else is text
_KINDS = {
    "bool": "bool", "int2": "int", "int4": "int", "int8": "int", "float4": "float4", "float8": "float8",
    "numeric": "decimal", "timestamp": "timestamp", "timestamptz": "timestamp", "date": "date",
    "json": "json", "jsonb": "json", "bytea": "bytes",
}  # fmt: skip

_REFLECT = sql.SQL(
    """SELECT a.attname, format_type(b.oid, CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END),
       b.typname
  FROM pg_catalog.pg_attribute a
  JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  JOIN pg_catalog.pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
 WHERE c.relname = {table} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND CASE WHEN {schema} IS NULL THEN pg_catalog.pg_table_is_visible(c.oid) ELSE n.nspname = {schema} END
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum"""
)


def connect_args(url: str) -> dict[str, str]:
    """libpq keywords from a SQLAlchemy-style URL (``postgresql+psycopg://user:pw@host:port/db?k=v``):
    user, password, host, port, dbname, and every query parameter as it is (sslmode, a socket
    directory as ``host``...), as SQLAlchemy hands them to its driver."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ParityError(f"cannot use database URL (ValueError: {exc})") from exc
    args: dict[str, str] = {}
    if parts.username:
        args["user"] = unquote(parts.username)
    if parts.password is not None:
        args["password"] = unquote(parts.password)
    if parts.hostname:
        args["host"] = parts.hostname
    if port is not None:
        args["port"] = str(port)
    if parts.path.strip("/"):
        args["dbname"] = unquote(parts.path.lstrip("/"))
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        args[name] = f"{args[name]},{value}" if name in args and name in ("host", "port") else value
    # GSSAPI encryption is tried first by default, which loads Kerberos on every connection (about
    # 0.4 MB each) for a setup almost nobody has: ask for it in the URL (?gssencmode=prefer)
    args.setdefault("gssencmode", "disable")
    return args


class PgDatabase(shared.Database):
    """One side's connection: opened on first use, session settings pinned, read-only unless told,
    every query in its own transaction and paced. One query at a time (the runner reads each side
    from one thread at a time; the lock makes sure)."""

    dialect = "postgresql"
    hashes_in_db = True

    def open(self, url: str) -> None:
        self.args = connect_args(url)
        self.server_version = 0  # major, once connected
        self._conn: Any = None
        self._lock = threading.Lock()

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            conn = psycopg2.connect(**self.args)
            with conn.cursor() as cursor:
                for statement in shared.PG_SESSION + ((shared.PG_READ_ONLY,) if self.read_only else ()):
                    cursor.execute(statement)
            conn.commit()
            version = conn.server_version  # 160002, or 90624 before 10
            self.server_version = version // 10000 if version >= 100000 else version // 100
            self._conn = conn
        return self._conn

    def query(
        self, label: str | None, statement: sql.Composable, settings: Sequence[str] = (), stream: bool = False
    ) -> Iterator[tuple[Any, ...]]:
        """One statement in its own transaction (``settings``, ``SET LOCAL``, apply to it alone).
        ``stream``: through a server-side cursor, STREAM_ROWS at a time, so a long result (row
        hashes of a chunk, whole rows) never sits in memory at once; otherwise the driver reads
        the result whole (a few thousand segment sums at most) and rows are made as they are
        used. ``label`` None: reflection (paced, not counted)."""
        self.pace(label)
        with self._lock:
            conn = self._connection()
            try:
                with conn:  # commit, or roll back on an error
                    with conn.cursor() as cursor:
                        for setting in (*settings, *(STREAM_SETTINGS if stream else ())):
                            cursor.execute(setting)
                        if not stream:  # rows made one at a time from the driver's result, not a list
                            cursor.execute(statement)
                            yield from cursor
                            return
                    with conn.cursor(name="parity") as cursor:
                        cursor.itersize = STREAM_ROWS
                        cursor.execute(statement)
                        yield from cursor
            finally:
                if conn.closed:  # a broken connection is opened again by the next query
                    self._conn = None

    def run(
        self, label: str, statement: sql.Composable, settings: Sequence[str] = (), stream: bool = False
    ) -> Iterator[tuple[Any, ...]]:
        """:meth:`query`, a database error as ours (SQLSTATE class 22, data: ParityDataError)."""
        try:
            yield from self.query(label, statement, settings, stream)
        except psycopg2.Error as exc:
            error = ParityDataError if str(exc.pgcode or "").startswith("22") else ParityError
            raise error(f"{label} failed on the postgresql side: {shared.first_line(exc)}") from exc

    def reflect(self, name: str) -> shared.Reflected:
        schema, _, table = name.rpartition(".")
        statement = _REFLECT.format(table=sql.Literal(table), schema=sql.Literal(schema or None))
        try:
            rows = list(self.query(None, statement))
        except psycopg2.Error as exc:
            raise ParityError(f"cannot read {name!r}: {shared.first_line(exc)}") from exc
        if not rows:
            raise ParityError(f"table {name!r} does not exist in the postgresql database")
        columns = tuple(
            shared.ReflectedColumn(column, _KINDS.get(base, "text"), text) for column, text, base in rows
        )
        return shared.Reflected(name, columns)

    def side(self, plan: TablePlan, side: str, in_db_hash: bool) -> TableSide:
        return PgSide(self, plan, side, in_db_hash)

    def dispose(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _identifier(name: str) -> sql.Identifier:
    """``schema.table`` or ``table``, each part quoted."""
    schema, _, table = name.rpartition(".")
    return sql.Identifier(schema, table) if schema else sql.Identifier(table)


def _join(parts: Iterable[sql.Composable], separator: str = ", ") -> sql.Composed:
    return sql.SQL(separator).join(list(parts))


class PgSide(TableSide):
    """This side's statements, composed with :mod:`psycopg2.sql`."""

    def __init__(self, db: PgDatabase, plan: TablePlan, side: str, in_db_hash: bool) -> None:
        super().__init__(plan, side, in_db_hash)
        self.db = db
        self.table = _identifier((plan.source if side == "source" else plan.target).name)

    def expr(self, column: ColumnPlan) -> sql.Composable:
        name = self.column_name(column)
        if name is None:
            return sql.SQL("({})").format(sql.SQL(column.transform or "NULL"))
        return sql.Identifier(name)

    def _select(self, items: Iterable[sql.Composable], *conditions: sql.Composable) -> sql.Composed:
        where = ([sql.SQL("({})").format(sql.SQL(self.where))] if self.where else []) + list(conditions)
        statement = sql.SQL("SELECT {} FROM {}").format(_join(items), self.table)
        return statement + sql.SQL(" WHERE ") + _join(where, " AND ") if where else statement

    def _in_ranges(self, ranges: Sequence[tuple[int, int]]) -> sql.Composable:
        first = self.expr(self.plan.key[0])
        between = sql.SQL("{} BETWEEN {} AND {}")
        return sql.SQL("({})").format(
            _join((between.format(first, sql.Literal(lo), sql.Literal(hi)) for lo, hi in ranges), " OR ")
        )

    def _aggregate(self, summed: list[ColumnPlan]) -> Sequence[Any]:
        first = self.expr(self.plan.key[0])
        items = [sql.SQL("count(*)"), sql.SQL("min({})").format(first), sql.SQL("max({})").format(first)]
        items += [sql.SQL("sum(CAST({} AS NUMERIC))").format(self.expr(c)) for c in summed]
        return list(self.db.run(f"aggregates of {self.plan.table.name}", self._select(items)))[0]

    # pass 1, in the database
    def _sql_value(self, column: ColumnPlan) -> sql.Composable:
        """The column as it enters the row text: itself when both sides store the same type (its
        text output already agrees), else rendered to the canonical form of its kind."""
        expr = self.expr(column)
        kind, own = column.kind, self.side_kind(column)
        if column.same_type and not (kind == "timestamp" and self.plan.precision < 6) and kind not in FLOATS:
            return expr
        if kind in ("int", "decimal"):
            numeric = sql.SQL("CAST({} AS NUMERIC)").format(expr)
            return sql.SQL("trim_scale({})").format(numeric) if self.db.server_version >= 13 else numeric
        if kind in FLOATS:  # printed at the type's digits (HASH_SETTINGS)
            return _sql_float(expr, own, kind)
        if kind == "bool":
            return _sql_bool(expr, own)
        if kind == "timestamp":
            # the database rounds to timestamptz(p) as it rounds what it stores (half away from
            # zero, counted from 2000-01-01); naive values are UTC (the session's zone)
            precision = sql.SQL(str(int(self.plan.precision)))
            return sql.SQL("CAST({} AS TIMESTAMP({}) WITH TIME ZONE)").format(expr, precision)
        cast = {"json": "JSONB", "date": "DATE", "bytes": None}.get(kind, "TEXT")
        return sql.SQL("CAST({} AS {})").format(expr, sql.SQL(cast)) if cast else expr

    def _sql_hash(self) -> sql.Composable:
        """64-bit hash of the row's text. ``row(...)::text`` quotes values with separators and
        writes NULL as nothing and '' as "", so the text is unambiguous, and it is built in C."""
        text = sql.SQL("CAST(row({}) AS TEXT)").format(
            _join(self._sql_value(c) for c in self.plan.all_columns)
        )
        if 0 < self.db.server_version < 11:  # no hashtextextended
            return sql.SQL("CAST(CAST('x' || substr(md5({}), 1, 16) AS bit(64)) AS BIGINT)").format(text)
        return sql.SQL("hashtextextended({}, 0)").format(text)

    def checksums(self, lo: int | None, hi: int | None, width: int) -> dict[int, int]:
        """``{segment: rows << 64 | sum of row hashes mod 2**64}`` for one chunk, in one scan."""
        first = self.expr(self.plan.key[0])
        conditions: list[sql.Composable] = []
        if lo is None or hi is None:
            segment: sql.Composable = sql.SQL("0")
        else:  # integer division
            segment = sql.SQL("(CAST({} AS BIGINT) - {}) / {}").format(
                first, sql.Literal(lo), sql.Literal(width)
            )
            conditions.append(
                sql.SQL("{} >= {} AND {} <= {}").format(first, sql.Literal(lo), first, sql.Literal(hi))
            )
        items = [segment, sql.SQL("count(*)"), sql.SQL("sum({})").format(self._sql_hash())]
        statement = self._select(items, *conditions) + sql.SQL(" GROUP BY 1")
        rows = self.db.run(f"checksums of {self.plan.table.name}", statement, CHECKSUM_SETTINGS)
        return {int(row[0]): int(row[1]) << 64 | int(row[2]) & MASK64 for row in rows}

    def _hash_rows(self, ranges: Sequence[tuple[int, int]] | None) -> Iterable[Sequence[Any]]:
        keys = [self.expr(c) for c in self.plan.key]
        settings: Sequence[str] = ()
        if self.in_db_hash:
            items, settings = [*keys, self._sql_hash()], HASH_SETTINGS
        else:
            items = [*keys, *(self.expr(c) for c in self.plan.columns)]
        statement = self._select(items, *([self._in_ranges(ranges)] if ranges is not None else []))
        return self.db.run(f"row hashes of {self.plan.table.name}", statement, settings, stream=True)

    # pass 2
    def _fetch_rows(self, raws: list[shared.Raw]) -> Iterable[Sequence[Any]]:
        items = [self.expr(c) for c in self.plan.all_columns]
        if self.updated is not None:
            items.append(sql.Identifier(self.updated))
        keys = [self.expr(c) for c in self.plan.key]
        if len(keys) == 1:  # a tuple is a parenthesised list to psycopg2: (1, 2, 3)
            condition = sql.SQL("{} IN {}").format(keys[0], sql.Literal(tuple(raw[0] for raw in raws)))
        else:
            condition = sql.SQL("({}) IN {}").format(_join(keys), sql.Literal(tuple(raws)))
        return self.db.run(f"rows of {self.plan.table.name}", self._select(items, condition), stream=True)


def _sql_float(expr: sql.Composable, own: str, kind: str) -> sql.Composable:
    """A float in the compared type, plus zero (IEEE: -0 + 0 is 0, anything else is itself). A
    double (or a number) compared as a real is rounded to one as C rounds, never through a cast
    that refuses overflow or underflow. (PostgreSQL sorts NaN above every number.)"""
    if own == kind:
        return sql.SQL("({} + {})").format(expr, sql.SQL("0::real" if kind == "float4" else "0::float8"))
    double = expr if own == "float8" else sql.SQL("CAST({} AS DOUBLE PRECISION)").format(expr)
    if kind == "float8":
        return sql.SQL("({} + 0::float8)").format(double)
    return sql.SQL(
        "CASE WHEN {d} = 'NaN'::float8 THEN 'NaN'::real"
        " WHEN {d} >= {over}::float8 THEN 'Infinity'::real"
        " WHEN {d} <= -{over}::float8 THEN '-Infinity'::real"
        " WHEN abs({d}) <= {under}::float8 THEN 0::real"
        " ELSE CAST({d} AS REAL) + 0::real END"
    ).format(d=double, over=sql.Literal(_FLOAT4_OVERFLOW), under=sql.Literal(_FLOAT4_UNDERFLOW))


def _sql_bool(expr: sql.Composable, own: str) -> sql.Composable:
    """``1``, ``0``, NULL, or ``?<text>`` for a value that spells no boolean: the canonical
    text of :func:`proxy.parity.normalise.canonical`, without a cast that can fail."""
    if own == "bool":
        return sql.SQL("CAST({} AS INTEGER)").format(expr)
    if own in ("int", "decimal", *FLOATS):
        return sql.SQL("CASE WHEN {e} = 0 THEN '0' WHEN {e} IS NOT NULL THEN '1' END").format(e=expr)
    return sql.SQL(
        "CASE WHEN lower(btrim(CAST({e} AS TEXT), {blanks})) IN {true} THEN '1'"
        " WHEN lower(btrim(CAST({e} AS TEXT), {blanks})) IN {false} THEN '0'"
        " ELSE '?' || CAST({e} AS TEXT) END"
    ).format(
        e=expr,
        blanks=sql.Literal(_BLANKS),
        true=sql.Literal(tuple(sorted(TRUE_WORDS))),
        false=sql.Literal(tuple(sorted(FALSE_WORDS))),
    )

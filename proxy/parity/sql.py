"""The SQLAlchemy path: any dialect, or a mixed pair (SQLite has no md5). Rows are streamed,
normalised by :mod:`proxy.parity.normalise` and hashed with blake2b in the client. Correct
everywhere, slower than hashing in the database, which :mod:`proxy.parity.pg` does when both sides
are PostgreSQL (without importing SQLAlchemy at all).

Either way the verdict on a row comes from the Python normalisers; hashes only find candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError

from proxy.parity import plan
from proxy.parity.errors import ParityDataError, ParityError
from proxy.parity.plan import (
    PG_READ_ONLY,
    PG_SESSION,
    UPDATED,
    ColumnPlan,
    Raw,
    Reflected,
    ReflectedColumn,
    TablePlan,
    TableSide,
    first_line,
)


class Database(plan.Database):
    """One side's engine: read-only sessions where the dialect allows, every query paced."""

    hashes_in_db = False

    def open(self, url: str) -> None:
        try:
            self.engine: Engine = (
                sa.create_engine(url, pool_size=4, max_overflow=4)
                if not url.startswith("sqlite")
                else sa.create_engine(url)
            )
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ParityError(f"cannot use database URL ({type(exc).__name__}: {first_line(exc)})") from exc
        self.dialect = self.engine.dialect.name
        if self.dialect == "postgresql":
            event.listen(self.engine, "connect", _pg_session_read_only if self.read_only else _pg_session)

    def reflect(self, name: str) -> Reflected:
        schema, _, table = name.rpartition(".")
        self.pace(None)
        try:
            with self.engine.connect() as conn:
                reflected = sa.Table(table, sa.MetaData(), autoload_with=conn, schema=schema or None)
        except NoSuchTableError as exc:
            raise ParityError(f"table {name!r} does not exist in the {self.dialect} database") from exc
        except SQLAlchemyError as exc:
            raise ParityError(f"cannot read {name!r}: {first_line(exc)}") from exc
        columns = tuple(ReflectedColumn(c.name, kind_of(c.type, self.dialect)) for c in reflected.columns)
        return Reflected(name, columns, reflected)

    def side(self, plan: TablePlan, side: str, in_db_hash: bool) -> TableSide:
        assert not in_db_hash, "rows are hashed in the client on this path"
        return AlchemySide(self, plan, side)

    def run(self, label: str, statement: Any) -> Sequence[Any]:
        """One query, in its own transaction."""
        self.pace(label)
        try:
            with self.engine.connect() as conn:
                return conn.execute(statement).all()
        except SQLAlchemyError as exc:
            data = str(getattr(getattr(exc, "orig", None), "sqlstate", "") or "").startswith("22")
            error = ParityDataError if data else ParityError
            raise error(f"{label} failed on the {self.dialect} side: {first_line(exc)}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _pg_session(dbapi_connection: Any, _record: Any, read_only: bool = False) -> None:
    cursor = dbapi_connection.cursor()
    for statement in PG_SESSION + ((PG_READ_ONLY,) if read_only else ()):
        cursor.execute(statement)
    cursor.close()
    dbapi_connection.commit()


def _pg_session_read_only(dbapi_connection: Any, record: Any) -> None:
    _pg_session(dbapi_connection, record, read_only=True)


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


class AlchemySide(TableSide):
    """Queries as SQLAlchemy Core statements; the rows mean what :class:`TableSide` says."""

    def __init__(self, db: Database, plan: TablePlan, side: str) -> None:
        super().__init__(plan, side)
        self.db = db
        self.table: sa.Table = (plan.source if side == "source" else plan.target).handle

    def expr(self, column: ColumnPlan) -> Any:
        name = self.column_name(column)
        if name is None:
            return sa.literal_column(f"({column.transform})")
        return self.table.c[name]

    def _labelled(self) -> list[Any]:
        """Every compared column, labelled: a column named twice stays two columns."""
        return [self.expr(c).label(f"c{i}") for i, c in enumerate(self.plan.all_columns)]

    def _filtered(self, statement: Any) -> Any:
        statement = statement.select_from(self.table)
        return statement.where(sa.text(f"({self.where})")) if self.where else statement

    def _aggregate(self, summed: list[ColumnPlan]) -> Sequence[Any]:
        first = self.expr(self.plan.key[0])
        items = [sa.func.count(), sa.func.min(first), sa.func.max(first)]
        items += [sa.func.sum(sa.cast(self.expr(c), sa.Numeric)) for c in summed]
        return self.db.run(f"aggregates of {self.plan.table.name}", self._filtered(sa.select(*items)))[0]

    def _hash_rows(self, ranges: Sequence[tuple[int, int]] | None) -> Iterable[Sequence[Any]]:
        statement = self._filtered(sa.select(*self._labelled()))
        if ranges is not None:
            column = self.expr(self.plan.key[0])
            statement = statement.where(sa.or_(*(column.between(a, b) for a, b in ranges)))
        return self.db.run(f"row hashes of {self.plan.table.name}", statement)

    def _fetch_rows(self, raws: list[Raw]) -> Iterable[Sequence[Any]]:
        items = self._labelled()
        if self.updated is not None:
            items.append(self.table.c[self.updated].label(UPDATED))
        key_exprs = [self.expr(c) for c in self.plan.key]
        if len(key_exprs) == 1:
            condition = key_exprs[0].in_([raw[0] for raw in raws])
        else:
            condition = sa.tuple_(*key_exprs).in_(raws)
        return self.db.run(
            f"rows of {self.plan.table.name}", self._filtered(sa.select(*items)).where(condition)
        )

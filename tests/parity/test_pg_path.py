"""The PostgreSQL pair path (proxy/parity/pg.py): the driver alone, without SQLAlchemy or pydantic
(a run must not need more memory than reladiff), and every name from the config quoted, never
run as SQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.parity.errors import ParityError
from proxy.parity.pg import connect_args
from proxy.parity.plan import is_postgres
from tests.parity.conftest import execute, write_config
from tests.parity.test_sql import only, parity, run_json
from tests.parity.test_startup import loaded

HEAVY = ("sqlalchemy", "pydantic", "pydantic_core", "psycopg")  # psycopg 3: 34 MB imported


@pytest.mark.parametrize("target", ["postgresql", "sqlite"])
def test_a_postgresql_pair_runs_on_the_driver_alone(
    target: str, pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    """Both sides PostgreSQL: psycopg2 only. A mixed pair still goes through SQLAlchemy."""
    src, dst = pg_urls
    if target == "sqlite":
        dst = f"sqlite:///{tmp_path / 'b.db'}"
    for url in (src, dst):
        execute(
            url,
            f"CREATE TABLE {table_name} (id int PRIMARY KEY, v text)",
            f"INSERT INTO {table_name} VALUES (1, 'a')",
        )
    config = write_config(tmp_path / "p.yaml", src, dst, [{"source_table": table_name, "key": ["id"]}])
    code, modules = loaded("parity", "sql", "-c", str(config), "--no-store", "--samples", "5", cwd=tmp_path)
    assert code == 0
    if target == "postgresql":
        assert [m for m in modules if m.split(".")[0] in HEAVY] == []
        assert "proxy.parity.pg" in modules and "psycopg2" in modules and "proxy.parity.sql" not in modules
    else:
        assert "proxy.parity.sql" in modules and "proxy.parity.pg" not in modules


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


TABLE = 'odd "t"; DROP TABLE guard; --'
SCHEMA = 'sch"ema; DROP TABLE guard'
KEY, NOTE, SPACED, PERCENT = 'k"1', "v'); DROP TABLE guard; --", "with space", "per%cent %s"
RENAMED = 'new "name" %(x)s'


@pytest.mark.parametrize("in_db", [True, False], ids=["checksums", "client hashes"])
def test_names_from_the_config_are_quoted_never_run(
    pg_urls: tuple[str, str], tmp_path: Path, in_db: bool
) -> None:
    """Quotes, semicolons, spaces and percent signs in table, schema and column names (source and
    target, key and renamed columns): compared as names, and the guard table is still there."""
    src, dst = pg_urls
    table = f"{TABLE} {in_db}"
    # a text column against a float column: SQL cannot read "nan?" as a float, so that table is
    # hashed in the client (the other queries of this path, with the same names)
    bad = "'3'" if in_db else "'nan?'"
    rows = "SELECT g, 'note ' || g, 'spaced ' || g, g * 1.5, {f} FROM generate_series(1, 20) g"
    execute(
        src,
        "CREATE TABLE IF NOT EXISTS guard (id int)",
        f"CREATE TABLE {_q(table)} ({_q(KEY)} int PRIMARY KEY, {_q(NOTE)} text, {_q(SPACED)} text, "
        f"{_q(PERCENT)} numeric, f text)",
        f"INSERT INTO {_q(table)} " + rows.format(f=f"CASE WHEN g = 3 THEN {bad} ELSE g::text END"),
    )
    execute(
        dst,
        "CREATE TABLE IF NOT EXISTS guard (id int)",
        f"CREATE SCHEMA IF NOT EXISTS {_q(SCHEMA)}",
        f"CREATE TABLE {_q(SCHEMA)}.{_q(table)} ({_q(KEY)} int PRIMARY KEY, {_q(NOTE)} text, "
        f"{_q(RENAMED)} text, {_q(PERCENT)} numeric(10, 2), f float8)",
        f"INSERT INTO {_q(SCHEMA)}.{_q(table)} " + rows.format(f="g::float8"),
        f"UPDATE {_q(SCHEMA)}.{_q(table)} SET {_q(PERCENT)} = 0 WHERE {_q(KEY)} = 7",
        f"DELETE FROM {_q(SCHEMA)}.{_q(table)} WHERE {_q(KEY)} = 9",
    )
    tables = [
        {"name": "hostile", "source_table": table, "target_table": f"{SCHEMA}.{table}", "key": [KEY],
         "rename": {SPACED: RENAMED}},
    ]  # fmt: skip
    config = write_config(tmp_path / "p.yaml", src, dst, tables, segment_rows=4, chunk_rows=8)
    code, report = run_json(tmp_path, config)
    result = only(report)
    assert result["mode"].startswith("checksums in the database" if in_db else "row hashes in the client")
    assert code == 1 and result["samples"]["missing"] == [9]
    changed = {c["key"]: c["columns"] for c in result["samples"]["changed"]}
    assert changed[7] == {PERCENT: ["10.5", "0.00"]}
    assert set(changed) == ({7} if in_db else {3, 7})
    for url in (src, dst):
        execute(url, "SELECT count(*) FROM guard")  # still there


def test_urls_become_libpq_keywords() -> None:
    assert (
        is_postgres("postgresql+psycopg://a@b/c")
        and is_postgres("postgres://x")
        and is_postgres("postgresql://")
    )
    assert not is_postgres("sqlite:///postgresql.db") and not is_postgres("mysql://postgresql")
    assert connect_args("postgresql+psycopg://rea%40der:p%2Fw%20d@db.internal:6543/shop?sslmode=require") == {
        "user": "rea@der", "password": "p/w d", "host": "db.internal", "port": "6543", "dbname": "shop",
        "sslmode": "require", "gssencmode": "disable",
    }  # fmt: skip
    socket = connect_args("postgresql://reader@/shop?host=/run/postgresql&gssencmode=prefer")
    assert socket == {"user": "reader", "dbname": "shop", "host": "/run/postgresql", "gssencmode": "prefer"}
    with pytest.raises(ParityError, match="cannot use database URL"):
        connect_args("postgresql://db:notaport/shop")


def test_option_values_are_checked_without_pydantic(tmp_path: Path) -> None:
    code, _, err = parity("sql", "-c", str(tmp_path / "p.yaml"), "--samples", "many")
    assert code == 2
    assert err.splitlines() == [
        "error: Invalid value for '--samples': 'many' is not a number (see: root parity sql -h)"
    ]

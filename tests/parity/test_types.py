"""Parity is exact on every type: floats compared as floats, timestamps rounded as the database
rounds them, booleans against their text spellings. Real PostgreSQL (in-database checksums) and,
where it matters, a PostgreSQL/SQLite pair (row hashes in the client)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.parity.conftest import execute, write_config
from tests.parity.test_sql import only, run_json

BACKENDS = ["postgresql", "mixed"]  # checksums in the database; row hashes in the client


def _urls(backend: str, pg_urls: tuple[str, str], tmp_path: Path) -> tuple[str, str]:
    src, dst = pg_urls
    return (src, dst) if backend == "postgresql" else (src, f"sqlite:///{tmp_path / 'target.db'}")


def _compare(tmp_path: Path, src: str, dst: str, table: str, **options: Any) -> tuple[int, dict[str, Any]]:
    tables = [{"source_table": table, "key": ["id"], **options}]
    config = write_config(tmp_path / "p.yaml", src, dst, tables, segment_rows=4, chunk_rows=16)
    code, report = run_json(tmp_path, config)
    return code, only(report)


def _rows_fetched(src: str, dst: str, table: str, **options: Any) -> list[str]:
    """Queries beyond the checksums: none when the database renders equal values as equal text."""
    from proxy.parity.checkpoint import Checkpoint
    from proxy.parity.config import parse_config
    from proxy.parity.runner import Runner, RunOptions

    tables = [{"source_table": table, "key": ["id"], **options}]
    config = parse_config({"source": src, "target": dst, "tables": tables, "segment_rows": 4})
    queries: list[str] = []
    [result] = Runner(config, Checkpoint(None, "x", False), RunOptions(on_query=queries.append)).run()
    assert result.status == "equal", result
    return [q for q in queries if not q.startswith(("aggregates", "checksums"))]


def _changed(table: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    return {c["key"]: c["columns"] for c in table["samples"]["changed"]}


# --- item 12: a boolean column against its text spellings --------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_boolean_against_text_spellings_is_equal_and_a_flip_is_found(
    backend: str, pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    src, dst = _urls(backend, pg_urls, tmp_path)
    spellings = ["t", "f", "true", "false", "1", "0", "TRUE", " yes ", "off", None]
    truth = [True, False, True, False, True, False, True, True, False, None]
    execute(src, f"CREATE TABLE {table_name} (id int PRIMARY KEY, flag boolean)")
    execute(dst, f"CREATE TABLE {table_name} (id integer PRIMARY KEY, flag text)")
    insert = f"INSERT INTO {table_name} (id, flag) VALUES (:id, :flag)"
    execute(src, insert, params=[{"id": i, "flag": v} for i, v in enumerate(truth)])
    execute(dst, insert, params=[{"id": i, "flag": v} for i, v in enumerate(spellings)])
    code, table = _compare(tmp_path, src, dst, table_name)
    assert (code, table["status"], table["error"]) == (0, "equal", None)
    if backend == "postgresql":
        assert _rows_fetched(src, dst, table_name) == []

    flipped = {0: "f", 3: "t", 9: "f", 4: "maybe"}  # true->'f', false->'t', NULL->'f', not a boolean
    for key, value in flipped.items():
        execute(dst, f"UPDATE {table_name} SET flag = '{value}' WHERE id = {key}")
    code, table = _compare(tmp_path, src, dst, table_name)
    assert code == 1 and table["changed"] == 4
    assert _changed(table) == {
        0: {"flag": [True, "f"]},
        3: {"flag": [False, "t"]},
        9: {"flag": [None, "f"]},
        4: {"flag": [True, "maybe"]},
    }


# --- item 11: timestamp precision rounds as PostgreSQL does, in every era ----------------------

TIES = {
    3: [
        "1985-06-01 00:00:00.0015",  # between 1970 and 2000: PostgreSQL rounds this tie down
        "1965-03-01 12:00:00.0025",  # before 1970: down as well
        "1999-12-31 23:59:59.9995",  # the last tie before PostgreSQL's epoch: down
        "2000-01-01 00:00:00.0005",  # the first after it: up
        "2024-05-01 10:00:00.0015",  # after 2000: up
        "2024-05-01 10:00:00.0014",
        "1985-06-01 00:00:00.0016",
    ],
    0: [
        "1985-06-01 00:00:00.5",
        "1965-03-01 12:00:00.5",
        "1999-12-31 23:59:59.5",
        "2000-01-01 00:00:00.5",
        "2024-05-01 10:00:00.5",
        "2024-05-01 10:00:00.4999",
        "1985-06-01 00:00:00.5001",
    ],
}


@pytest.mark.parametrize("precision", [3, 0])
def test_timestamp_precision_matches_the_databases_rounding_before_and_after_2000(
    precision: int, pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    src, dst = pg_urls
    values = TIES[precision]
    execute(src, f"CREATE TABLE {table_name} (id int PRIMARY KEY, at timestamptz, naive timestamp)")
    execute(
        dst,
        f"CREATE TABLE {table_name} (id int PRIMARY KEY, at timestamptz({precision}), "
        f"naive timestamp({precision}))",
    )
    for url in (src, dst):  # the database rounds the target's copies as it stores them
        execute(
            url,
            f"INSERT INTO {table_name} (id, at, naive) "
            "VALUES (:id, CAST(:v AS timestamptz), CAST(:v AS timestamp))",
            params=[{"id": i, "v": v + "+00"} for i, v in enumerate(values)],
        )
    code, table = _compare(tmp_path, src, dst, table_name, timestamp_precision=precision)
    assert (code, table["status"]) == (0, "equal"), table["samples"]
    assert _rows_fetched(src, dst, table_name, timestamp_precision=precision) == []

    # one unit of the precision off, in each era, is still a difference
    step = "1 millisecond" if precision == 3 else "1 second"
    execute(dst, f"UPDATE {table_name} SET at = at + interval '{step}' WHERE id IN (0, 1, 4)")
    code, table = _compare(tmp_path, src, dst, table_name, timestamp_precision=precision)
    assert code == 1 and sorted(_changed(table)) == [0, 1, 4]


def test_timestamp_rounding_in_the_client_is_the_databases() -> None:
    """The Python normaliser (row hashes in the client, and every final verdict) rounds ties
    away from 2000-01-01, as PostgreSQL does, whichever side of 1970 the instant is."""
    from datetime import UTC, datetime

    from proxy.parity.normalise import canonical

    def at(text: str, precision: int = 3) -> str | None:
        return canonical(datetime.fromisoformat(text).replace(tzinfo=UTC), "timestamp", precision)

    assert at("1985-06-01 00:00:00.001500") == at("1985-06-01 00:00:00.001")
    assert at("1965-03-01 12:00:00.002500") == at("1965-03-01 12:00:00.002")
    assert at("2024-05-01 10:00:00.001500") == at("2024-05-01 10:00:00.002")
    assert at("1985-06-01 00:00:00.500000", 0) == at("1985-06-01 00:00:00", 0)
    assert at("2024-05-01 00:00:00.500000", 0) == at("2024-05-01 00:00:01", 0)


# --- item 10: floats compared as floats ---------------------------------------------------------


def _straddling_pair() -> tuple[float, float]:
    """Two neighbouring doubles that print differently at 15 significant digits."""
    x = 1.000000000000005
    while format(x, ".15g") == format(math.nextafter(x, 2.0), ".15g"):
        x = math.nextafter(x, 2.0)
    return x, math.nextafter(x, 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_floats_compare_as_floats_at_their_types_precision(
    backend: str, pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    src, dst = _urls(backend, pg_urls, tmp_path)
    double = "double precision" if backend == "postgresql" else "real"  # SQLite's REAL is 8 bytes
    execute(
        src,
        f"CREATE TABLE {table_name} (id int PRIMARY KEY, d double precision, r real, "
        "n numeric(12, 2), dn double precision)",
    )
    execute(
        dst,
        f"CREATE TABLE {table_name} (id integer PRIMARY KEY, d {double}, r {double}, n {double}, dn numeric)",
    )
    execute(
        src,
        f"INSERT INTO {table_name} VALUES "
        "(1, 0.1::float8 + 0.2::float8, 1::real / 3::real, 3.50, 0.1::float8 + 0.2::float8), "
        "(2, 1e300, 0.1, 0.30, -2.5e-5), "
        "(3, '-0', '-0', 0, '-0'), "
        "(4, NULL, NULL, NULL, NULL)",
    )
    rows = [
        {"id": 1, "d": 0.3, "r": 0.333333, "n": 3.5, "dn": "0.3"},
        {"id": 2, "d": 1e300, "r": 0.1, "n": 0.3, "dn": "-0.000025"},
        {"id": 3, "d": 0.0, "r": 0.0, "n": 0.0, "dn": "0"},
        {"id": 4, "d": None, "r": None, "n": None, "dn": None},
    ]
    if backend == "postgresql":  # PostgreSQL real stays real on the target too
        execute(dst, f"ALTER TABLE {table_name} ALTER COLUMN r TYPE real")
    execute(dst, f"INSERT INTO {table_name} VALUES (:id, :d, :r, :n, :dn)", params=rows)
    code, table = _compare(tmp_path, src, dst, table_name)
    assert (code, table["status"]) == (0, "equal"), table["samples"]
    if backend == "postgresql":
        assert _rows_fetched(src, dst, table_name) == []

    a, b = _straddling_pair()
    for url, value in ((src, a), (dst, b)):
        execute(url, f"UPDATE {table_name} SET d = {value!r} WHERE id = 2")
    execute(
        dst, f"UPDATE {table_name} SET n = 0.31 WHERE id = 3", f"UPDATE {table_name} SET r = 0.2 WHERE id = 1"
    )
    code, table = _compare(tmp_path, src, dst, table_name)
    assert code == 1 and sorted(_changed(table)) == [1, 2, 3]
    assert list(_changed(table)[2]) == ["d"] and list(_changed(table)[3]) == ["n"]

    # a tolerance widens equality: one ulp apart is equal with `ulps: 1`
    code, table = _compare(tmp_path, src, dst, table_name, float_tolerance={"ulps": 1})
    assert code == 1 and sorted(_changed(table)) == [1, 3]
    code, table = _compare(tmp_path, src, dst, table_name, float_tolerance={"relative": 0.5})
    assert code == 1 and sorted(_changed(table)) == [3]  # 1/3 vs 0.2 is within half; 0 vs 0.31 is not


def test_nan_and_infinities_are_values(pg_urls: tuple[str, str], table_name: str, tmp_path: Path) -> None:
    src, dst = pg_urls
    execute(src, f"CREATE TABLE {table_name} (id int PRIMARY KEY, d double precision, r real)")
    execute(dst, f"CREATE TABLE {table_name} (id int PRIMARY KEY, d double precision, r double precision)")
    values = "(1, 'NaN', 'NaN'), (2, 'Infinity', 'Infinity'), (3, '-Infinity', '-Infinity'), (4, 1, 1)"
    for url in (src, dst):
        execute(url, f"INSERT INTO {table_name} VALUES {values}")
    code, table = _compare(tmp_path, src, dst, table_name)
    assert (code, table["status"]) == (0, "equal"), table["samples"]
    assert _rows_fetched(src, dst, table_name) == []
    execute(
        dst,
        f"UPDATE {table_name} SET d = '-Infinity' WHERE id = 2",
        f"UPDATE {table_name} SET d = NULL WHERE id = 1",
        f"UPDATE {table_name} SET r = 'NaN' WHERE id = 4",
    )
    code, table = _compare(tmp_path, src, dst, table_name, float_tolerance={"relative": 1})
    assert code == 1
    assert _changed(table) == {
        1: {"d": ["NaN", None]},
        2: {"d": ["Infinity", "-Infinity"]},
        4: {"r": [1.0, "NaN"]},
    }


def test_float_normaliser() -> None:
    from proxy.parity.normalise import FloatTolerance, canonical, common_kind, same

    assert canonical(0.1 + 0.2, "float8") == canonical(0.3, "float8") == "0.3"
    assert canonical(0.30000000000001, "float8") != canonical(0.3, "float8")
    assert canonical(1 / 3, "float4") == canonical(0.333333, "float4")
    assert canonical(-0.0, "float8") == canonical(0, "float8") == "0"
    assert canonical(float("nan"), "float8") == canonical("NaN", "float8") == "NaN"
    assert canonical(float("-inf"), "float4") == "-Infinity" != canonical(float("inf"), "float4")
    assert canonical(1e300, "float4") == "Infinity"  # what PostgreSQL's float8 -> real would refuse
    assert common_kind("float8", "decimal") == "float8" and common_kind("float4", "float8") == "float4"
    a, b = _straddling_pair()
    assert not same(a, b, "float8") and same(a, b, "float8", tolerance=FloatTolerance(ulps=1))
    assert same(1.0, 1.0 + 1e-10, "float8", tolerance=FloatTolerance(relative=1e-9))
    assert not same(1.0, 1.0 + 1e-8, "float8", tolerance=FloatTolerance(relative=1e-9))
    assert not same(float("nan"), 1.0, "float8", tolerance=FloatTolerance(relative=10))


# --- the same cause: a value SQL cannot read is a difference, never an error --------------------


def test_text_that_does_not_parse_as_the_other_sides_type_is_a_difference(
    pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    """A text column against numeric, JSON or timestamp: the values that parse compare by meaning;
    one that does not is reported as changed (exit 1), where a cast in SQL used to stop the run."""
    src, dst = pg_urls
    execute(
        src, f"CREATE TABLE {table_name} (id int PRIMARY KEY, n numeric(10, 2), doc jsonb, at timestamptz)"
    )
    execute(dst, f"CREATE TABLE {table_name} (id int PRIMARY KEY, n text, doc text, at text)")
    execute(
        src,
        f"INSERT INTO {table_name} SELECT g, g + 0.5, jsonb_build_object('a', g), "
        "timestamptz '2024-01-01 00:00+00' + g * interval '1 hour' FROM generate_series(1, 40) g",
    )
    execute(
        dst,
        f"INSERT INTO {table_name} SELECT g, (g + 0.5)::text || '0', '{{ \"a\": ' || g || ' }}', "
        "to_char(timestamp '2024-01-01' + g * interval '1 hour', 'YYYY-MM-DD HH24:MI:SS') "
        "FROM generate_series(1, 40) g",
    )
    code, table = _compare(tmp_path, src, dst, table_name)
    assert (code, table["status"]) == (0, "equal"), table["samples"]
    assert table["mode"] == "checksums in the database"

    execute(
        dst,
        f"UPDATE {table_name} SET n = 'n/a' WHERE id = 3",
        f"UPDATE {table_name} SET doc = '{{broken' WHERE id = 17",
        f"UPDATE {table_name} SET at = 'soon' WHERE id = 30",
    )
    code, table = _compare(tmp_path, src, dst, table_name)
    assert (code, table["error"]) == (1, None)
    assert _changed(table) == {
        3: {"n": ["3.50", "n/a"]},
        17: {"doc": ['{"a":17}', "{broken"]},
        30: {"at": ["2024-01-02T06:00:00+00:00", "soon"]},
    }
    assert table["mode"].startswith("row hashes in the client")

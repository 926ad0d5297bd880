"""`strangler parity sql` against a real PostgreSQL server and SQLite files: no mocks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from proxy.cli import app
from proxy.parity.checkpoint import Checkpoint, CheckpointError, fingerprint
from proxy.parity.config import parse_config
from proxy.parity.report import TableResult
from proxy.parity.runner import Runner, RunOptions
from tests.clirun import strangler
from tests.parity.conftest import execute, write_config


def parity(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["parity", *args])
    return result.exit_code, result.stdout, result.stderr


def run_json(tmp_path: Path, config: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = parity(
        "sql", "--config", str(config), "--json", "--no-store", "--samples", "100",
        "--checkpoint", str(tmp_path / "cp.json"), *extra,
    )  # fmt: skip
    assert code in (0, 1), err
    return code, json.loads(out)


def only(report: dict[str, Any]) -> dict[str, Any]:
    assert len(report["tables"]) == 1
    table: dict[str, Any] = report["tables"][0]
    return table


def test_differences_that_only_look_different_do_not_count(
    pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    """Decimal scale, timestamp precision and zone, JSON key order and spacing, bool vs 0/1."""
    src, dst = pg_urls
    execute(
        src,
        f"CREATE TABLE {table_name} (id bigint PRIMARY KEY, amount numeric(12,2), seen timestamptz, "
        "doc jsonb, flag boolean, note text)",
        f"INSERT INTO {table_name} SELECT g, g * 1.5, timestamptz '2024-05-01 12:00:00.123456+02' "
        "+ g * interval '1 minute', jsonb_build_object('b', jsonb_build_array(1, g), 'a', g), mod(g, 2) = 0, "
        "CASE mod(g, 4) WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN '<null>' ELSE 'x' END "
        "FROM generate_series(1, 60) g",
    )
    execute(
        dst,
        f"CREATE TABLE {table_name} (id bigint PRIMARY KEY, amount numeric(14,4), seen timestamp(3), "
        "doc json, flag smallint, note text)",
        f"INSERT INTO {table_name} SELECT g, g * 1.5, timestamp '2024-05-01 10:00:00.123' "
        "+ g * interval '1 minute', ('{ \"a\": ' || g || ',  \"b\": [1, ' || g || '] }')::json, "
        "(mod(g, 2) = 0)::int, "
        "CASE mod(g, 4) WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN '<null>' ELSE 'x' END "
        "FROM generate_series(1, 60) g",
    )
    tables = [{"source_table": table_name, "key": ["id"], "timestamp_precision": 3}]
    config = write_config(tmp_path / "p.yaml", src, dst, tables, segment_rows=8, chunk_rows=20)
    code, report = run_json(tmp_path, config)
    table = only(report)
    assert (code, table["status"], table["source_rows"], table["target_rows"]) == (0, "equal", 60, 60)
    assert table["mode"] == "checksums in the database"

    # one real change in each of those columns is still found
    execute(
        dst,
        f"UPDATE {table_name} SET amount = amount + 0.0001 WHERE id = 5",
        f"UPDATE {table_name} SET seen = seen + interval '1 millisecond' WHERE id = 6",
        f'UPDATE {table_name} SET doc = \'{{"a": 7, "b": [1, 8]}}\' WHERE id = 7',
        f"UPDATE {table_name} SET flag = 1 - flag WHERE id = 8",
        f"UPDATE {table_name} SET note = NULL WHERE id = 9",  # was ''
    )
    code, report = run_json(tmp_path, config)
    table = only(report)
    assert code == 1 and table["changed"] == 5 and table["missing"] == table["extra"] == 0
    changed = {c["key"]: c["columns"] for c in table["samples"]["changed"]}
    assert set(changed) == {5, 6, 7, 8, 9}
    assert list(changed[5]) == ["amount"] and list(changed[6]) == ["seen"] and list(changed[7]) == ["doc"]
    assert list(changed[8]) == ["flag"] and changed[9] == {"note": ["", None]}


def test_renames_and_transforms_find_every_change(
    pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    """reladiff found 4 of 10 changes here, silently; every one must be found and named."""
    src, dst = pg_urls
    execute(
        src,
        f"CREATE TABLE {table_name} (id bigint PRIMARY KEY, owner text, amount numeric(12,2), status text)",
        f"INSERT INTO {table_name} SELECT g, 'owner' || g, g + 0.25, 'open' FROM generate_series(1, 1000) g",
    )
    execute(
        dst,
        f"CREATE TABLE {table_name}_v2 (id bigint PRIMARY KEY, owner_name text, amount_cents bigint, "
        "state text)",
        f"INSERT INTO {table_name}_v2 SELECT g, 'owner' || g, g * 100 + 25, 'open' "
        "FROM generate_series(1, 1000) g",
        f"UPDATE {table_name}_v2 SET owner_name = owner_name || '!' WHERE id IN (10, 200, 300, 999)",
        f"UPDATE {table_name}_v2 SET amount_cents = amount_cents + 1 WHERE id IN (11, 201, 301, 998)",
        f"UPDATE {table_name}_v2 SET state = 'closed' WHERE id IN (12, 500)",
        f"DELETE FROM {table_name}_v2 WHERE id = 700",
        f"INSERT INTO {table_name}_v2 VALUES (1001, 'new', 0, 'open')",
    )
    tables = [
        {
            "name": "orders",
            "source_table": table_name,
            "target_table": f"{table_name}_v2",
            "key": ["id"],
            "rename": {"owner": "owner_name", "status": "state"},
            "transforms": {"amount_cents": "round(amount * 100)"},
        }
    ]
    config = write_config(tmp_path / "p.yaml", src, dst, tables, segment_rows=16, chunk_rows=300)
    code, report = run_json(tmp_path, config)
    table = only(report)
    assert code == 1
    assert (table["missing"], table["extra"], table["changed"]) == (1, 1, 10)
    assert table["samples"]["missing"] == [700] and table["samples"]["extra"] == [1001]
    assert table["changed_columns"] == {"owner_name": 4, "amount_cents": 4, "state": 2}
    changed = {c["key"]: c["columns"] for c in table["samples"]["changed"]}
    assert changed[11] == {"amount_cents": ["1125", 1126]}  # numeric (exact, as text), bigint
    assert changed[500] == {"state": ["open", "closed"]}


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_null_empty_and_the_string_null_are_three_values(
    backend: str, pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    if backend == "sqlite":
        src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    else:
        src, dst = pg_urls
    execute(src, f"CREATE TABLE {table_name} (id integer PRIMARY KEY, note text)")
    execute(dst, f"CREATE TABLE {table_name} (id integer PRIMARY KEY, note text)")
    insert = f"INSERT INTO {table_name} (id, note) VALUES (:id, :note)"
    execute(src, insert, params=[{"id": 1, "note": None}, {"id": 2, "note": ""}, {"id": 3, "note": "<null>"}])
    execute(dst, insert, params=[{"id": 1, "note": ""}, {"id": 2, "note": "<null>"}, {"id": 3, "note": None}])
    config = write_config(tmp_path / "p.yaml", src, dst, [{"source_table": table_name, "key": ["id"]}])
    code, report = run_json(tmp_path, config)
    table = only(report)
    assert code == 1 and table["changed"] == 3
    changed = {c["key"]: c["columns"]["note"] for c in table["samples"]["changed"]}
    assert changed == {1: [None, ""], 2: ["", "<null>"], 3: ["<null>", None]}


def test_composite_keys_across_postgresql_and_sqlite(
    pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    """Mixed dialects hash in the client; numeric scale and JSON text still compare by meaning."""
    src, _ = pg_urls
    dst = f"sqlite:///{tmp_path / 'target.db'}"
    execute(
        src,
        f"CREATE TABLE {table_name} (tenant int, code text, price numeric(10,2), meta jsonb, "
        "PRIMARY KEY (tenant, code))",
        f"INSERT INTO {table_name} SELECT t, 'c' || g, g + 0.5, jsonb_build_object('k', g, 'z', null) "
        "FROM generate_series(1, 3) t, generate_series(1, 20) g",
    )
    execute(
        dst,
        f"CREATE TABLE {table_name} (tenant integer, code text, price real, meta text, "
        "PRIMARY KEY (tenant, code))",
    )
    rows = [
        {"t": t, "c": f"c{g}", "p": g + 0.5, "m": json.dumps({"z": None, "k": g}, indent=1)}
        for t in range(1, 4)
        for g in range(1, 21)
        if (t, g) != (2, 7)  # missing in target
    ]
    rows.append({"t": 9, "c": "c1", "p": 1.0, "m": "{}"})  # extra in target
    for row in rows:
        if (row["t"], row["c"]) == (3, "c3"):
            row["p"] = 4.0  # was 3.5
    execute(dst, f"INSERT INTO {table_name} VALUES (:t, :c, :p, :m)", params=rows)
    tables = [{"source_table": table_name, "key": ["tenant", "code"]}]
    config = write_config(tmp_path / "p.yaml", src, dst, tables, segment_rows=4, chunk_rows=10)
    code, report = run_json(tmp_path, config)
    table = only(report)
    assert code == 1 and table["mode"] == "row hashes in the client"
    assert table["samples"]["missing"] == [[2, "c7"]] and table["samples"]["extra"] == [[9, "c1"]]
    assert table["samples"]["changed"] == [{"key": [3, "c3"], "columns": {"price": ["3.50", 4.0]}}]


def test_a_column_mapped_to_nothing_is_an_error_not_a_silent_pass(
    pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    src, dst = pg_urls
    execute(src, f"CREATE TABLE {table_name} (id int PRIMARY KEY, a text, gone text)")
    execute(dst, f"CREATE TABLE {table_name} (id int PRIMARY KEY, a text, added text)")
    config = write_config(tmp_path / "p.yaml", src, dst, [{"source_table": table_name, "key": ["id"]}])
    code, out, err = parity("sql", "-c", str(config), "--no-store", "--checkpoint", str(tmp_path / "c"))
    assert code == 2
    assert "'added' has no source column" in err and "'gone' maps to nothing" in err
    # ignoring both makes it comparable (and equal: both tables are empty)
    tables = [{"source_table": table_name, "key": ["id"], "ignore": ["gone"], "ignore_target": ["added"]}]
    write_config(config, src, dst, tables)
    assert parity("sql", "-c", str(config), "--no-store", "--checkpoint", str(tmp_path / "c"))[0] == 0


def test_bad_config_and_unreachable_database_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: sqlite://\ntables: []\n")
    code, _, err = parity("sql", "-c", str(bad), "--no-store")
    assert code == 2 and "target" in err and "tables" in err
    config = write_config(
        tmp_path / "p.yaml", "postgresql+psycopg://nobody@127.0.0.1:1/none", "sqlite://",
        [{"source_table": "t", "key": ["id"]}],
    )  # fmt: skip
    code, out, err = parity("sql", "-c", str(config), "--no-store", "--checkpoint", str(tmp_path / "c"))
    assert code == 2 and "error" in err


def _lag_tables(src: str, dst: str, name: str) -> None:
    for url in (src, dst):
        execute(url, f"CREATE TABLE {name} (id int PRIMARY KEY, v text, updated_at timestamptz)")
    old = "timestamptz '2024-01-01 00:00:00+00'"
    execute(src, f"INSERT INTO {name} SELECT g, 'v' || g, {old} FROM generate_series(1, 10) g")
    execute(
        dst,
        f"INSERT INTO {name} SELECT g, 'v' || g, {old} FROM generate_series(1, 10) g",
        f"UPDATE {name} SET v = 'lagging' WHERE id = 3",  # replication catches up during the window
        f"UPDATE {name} SET v = 'wrong' WHERE id = 5",  # a real difference
    )
    execute(src, f"UPDATE {name} SET v = 'fresh', updated_at = now() WHERE id = 7")  # too new to judge


def test_lag_window_rechecks_before_reporting_and_skips_recent_rows(
    pg_urls: tuple[str, str], table_name: str
) -> None:
    src, dst = pg_urls
    _lag_tables(src, dst, table_name)
    waited: list[float] = []

    def replication_catches_up(seconds: float) -> None:
        waited.append(seconds)
        execute(dst, f"UPDATE {table_name} SET v = 'v3' WHERE id = 3")

    config = parse_config(
        {
            "source": src, "target": dst, "lag_seconds": "30s",
            "tables": [{"source_table": table_name, "key": ["id"], "updated": "updated_at"}],
        }
    )  # fmt: skip
    [result] = Runner(config, Checkpoint(None, "x", False), RunOptions(sleep=replication_catches_up)).run()
    assert waited == [30.0]
    assert result.changed == 1 and result.samples["changed"][0]["key"] == 5
    assert result.resolved_after_lag == 1 and result.skipped_recent == 1

    # without a lag window the lagging row counts, and the recent one is judged too
    config.lag_seconds = 0
    execute(dst, f"UPDATE {table_name} SET v = 'lagging' WHERE id = 3")
    [result] = Runner(config, Checkpoint(None, "x", False), RunOptions(sleep=replication_catches_up)).run()
    assert sorted(c["key"] for c in result.samples["changed"]) == [3, 5, 7]


def test_a_stopped_run_resumes_from_its_checkpoint(
    pg_urls: tuple[str, str], table_name: str, tmp_path: Path
) -> None:
    src, dst = pg_urls
    for url in (src, dst):
        execute(
            url,
            f"CREATE TABLE {table_name} (id int PRIMARY KEY, v int)",
            f"INSERT INTO {table_name} SELECT g, g FROM generate_series(1, 100) g",
        )
    execute(dst, f"UPDATE {table_name} SET v = 0 WHERE id IN (10, 95)")
    raw = {
        "source": src, "target": dst, "chunk_rows": 25, "segment_rows": 5,
        "tables": [{"source_table": table_name, "key": ["id"]}],
    }  # fmt: skip
    config = parse_config(raw)
    path = tmp_path / "checkpoint.json"

    class Stop(Exception):
        pass

    def stop_after_two(table: str, index: int) -> None:
        if index == 1:
            raise Stop

    with pytest.raises(Stop):
        first = Checkpoint(path, fingerprint(config), False)
        Runner(config, first, RunOptions(on_chunk=stop_after_two)).run()
    saved = json.loads(path.read_text())
    assert len(saved["tables"][table_name]["chunks"]) == 2

    queries: list[str] = []
    options = RunOptions(on_query=queries.append)
    [result] = Runner(config, Checkpoint(path, fingerprint(config), True), options).run()
    assert queries.count(f"checksums of {table_name}") == 2 * 2  # two chunks left, two sides
    assert result.changed == 2 and [c["key"] for c in result.samples["changed"]] == [10, 95]

    # a finished table is not compared again on resume; another config's checkpoint is refused
    queries.clear()
    [again] = Runner(config, Checkpoint(path, fingerprint(config), True), options).run()
    assert queries == [] and again.changed == 2
    other = parse_config({**raw, "segment_rows": 6})
    with pytest.raises(CheckpointError):
        Checkpoint(path, fingerprint(other), True)


def test_result_is_stored_in_redis_and_alerted(redis_url: str, tmp_path: Path, table_name: str) -> None:
    import redis

    src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for url in (src, dst):
        execute(url, f"CREATE TABLE {table_name} (id integer PRIMARY KEY, v text)")
    execute(src, f"INSERT INTO {table_name} VALUES (1, 'a'), (2, 'b')")
    execute(dst, f"INSERT INTO {table_name} VALUES (1, 'a')")
    config = write_config(tmp_path / "p.yaml", src, dst, [{"source_table": table_name, "key": ["id"]}])
    checkpoint = str(tmp_path / "c")
    code, _, err = parity("sql", "-c", str(config), "--redis-url", redis_url, "--checkpoint", checkpoint)
    assert code == 1, err
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stored = json.loads(client.hget("strangler:parity:last", table_name) or "{}")
    assert stored["status"] == "different" and stored["missing"] == 1 and stored["kind"] == "sql"
    [event] = [json.loads(e)["event"] for e in client.hvals("strangler:canary:alerts")]  # the durable outbox
    assert event["kind"] == "parity_different" and event["group"] == table_name
    code, out, _ = parity("last", "--redis-url", redis_url, "--json")
    assert code == 0 and json.loads(out)[table_name]["missing"] == 1
    status = strangler("status", "--redis-url", redis_url, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["parity"][table_name]["status"] == "different"


def test_exit_codes_of_the_real_command(tmp_path: Path) -> None:
    src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for url in (src, dst):
        execute(url, "CREATE TABLE t (id integer PRIMARY KEY, v text)", "INSERT INTO t VALUES (1, 'a')")
    config = write_config(tmp_path / "p.yaml", src, dst, [{"source_table": "t", "key": ["id"]}])
    markdown = tmp_path / "report.md"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "parity", "sql", "-c", str(config), "--no-store",
             "--markdown", str(markdown)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        )  # fmt: skip

    assert run().returncode == 0
    execute(dst, "UPDATE t SET v = 'b'")
    different = run()
    assert different.returncode == 1 and "different" in different.stdout
    assert 'changed `1`: v: "a" -> "b"' in markdown.read_text()
    execute(dst, "DROP TABLE t")
    broken = run()
    assert broken.returncode == 2 and "does not exist" in broken.stderr


def test_report_round_trip() -> None:
    result = TableResult("t", "different", missing=1, samples={"missing": [1], "extra": [], "changed": []})
    assert TableResult.from_dict({**result.as_dict(), "unknown": 1}) == result


def test_where_limits_both_sides_and_table_picks_one(tmp_path: Path) -> None:
    src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for url in (src, dst):
        execute(
            url,
            "CREATE TABLE a (id integer PRIMARY KEY, v text, archived integer)",
            "CREATE TABLE b (id integer PRIMARY KEY, v text)",
        )
    insert = "INSERT INTO a VALUES (:id, :v, :archived)"
    execute(src, insert, params=[{"id": i, "v": "x", "archived": int(i > 5)} for i in range(1, 11)])
    execute(
        dst,
        insert,
        params=[{"id": i, "v": "x" if i != 8 else "y", "archived": int(i > 5)} for i in range(1, 9)],
    )
    execute(dst, "INSERT INTO b VALUES (1, 'other')")
    tables = [
        {"source_table": "a", "key": ["id"], "where": "archived = 0"},
        {"source_table": "b", "key": ["id"]},
    ]
    config = write_config(tmp_path / "p.yaml", src, dst, tables)
    code, report = run_json(tmp_path, config, "--table", "a")
    table = only(report)
    assert code == 0 and (table["source_rows"], table["target_rows"]) == (5, 5)
    code, report = run_json(tmp_path, config)
    assert code == 1 and [t["status"] for t in report["tables"]] == ["equal", "different"]
    code, _, err = parity("sql", "-c", str(config), "--table", "nope", "--no-store")
    assert code == 2 and "unknown table 'nope'" in err


def test_max_qps_paces_every_query_of_a_run(tmp_path: Path) -> None:
    from proxy.parity.throttle import Throttle

    src, dst = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    for url in (src, dst):
        execute(
            url, "CREATE TABLE t (id integer PRIMARY KEY, v text)", "INSERT INTO t VALUES (1, 'a'), (2, 'b')"
        )
    config = parse_config(
        {"source": src, "target": dst, "max_qps": 4, "tables": [{"source_table": "t", "key": ["id"]}]}
    )
    slept: list[float] = []
    queries: list[str] = []
    throttle = Throttle(config.max_qps, clock=lambda: 0.0, sleep=slept.append)  # time stands still
    options = RunOptions(on_query=queries.append)
    [result] = Runner(config, Checkpoint(None, "x", False), options, throttle).run()
    assert result.status == "equal" and len(queries) == 4  # aggregates and row hashes, both sides
    # one start per 1/4 s across both sides: 2 reflections and 4 queries
    assert sorted(slept) == [0.25, 0.5, 0.75, 1.0, 1.25]

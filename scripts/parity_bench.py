#!/usr/bin/env python3
"""Benchmark `strangler parity sql` (and reladiff beside it, when installed) on two 1M-row
tables, in one run:

    .venv/bin/python scripts/parity_bench.py [--rows 1000000] [--reladiff PATH_TO_reladiff] [--baseline DIR]

It starts a throwaway PostgreSQL (as the tests do; or use --url for an existing server where it
may create the databases ``parity_src`` and ``parity_dst``), builds ``items`` (id bigint pk, owner
text, amount numeric(12,2), created_at timestamptz, tags jsonb) in both, and times two cases:

1. equal tables;
2. 100 rows missing, 100 extra and 100 changed in the target (+0.01, +1 us, one JSON value),
   scattered over the key range; the report must name exactly those 300 keys.

Each tool runs as a child process, started by a small launcher (see LAUNCHER) that measures wall
time around it and takes peak RSS and CPU time (user + system) from its rusage. ``--baseline
/work/main`` also times `strangler parity sql` from another checkout in the same run. Both
databases share one server and the machine's cores with everything else running on it, so
figures move between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import yaml  # noqa: E402

from tests.pgserver import PostgresServer, find_bin_dir  # noqa: E402

DDL = (
    "CREATE TABLE items (id bigint PRIMARY KEY, owner text, amount numeric(12,2), "
    "created_at timestamptz, tags jsonb)"
)
FILL = (
    "INSERT INTO items SELECT g, 'owner' || (g %% 1000), round((g %% 100000) / 7.0, 2), "
    "timestamptz '2024-01-01' + g * interval '1.000123 second', "
    "jsonb_build_object('a', g %% 10, 'b', 'x' || (g %% 7), 'c', jsonb_build_array(1, 2)) "
    "FROM generate_series(1, %(rows)s) g"
)


# Linux keeps a process's peak RSS across exec, counting the memory it was started from: a child
# that subprocess forks from this script (psycopg, the test helpers: about 40 MB) starts with that
# as its "peak". So each tool is started by a small launcher (this code, in a fresh interpreter
# without site packages) that forks and execs it: the floor is the launcher's 10 MB, below any tool.
LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"wall": time.perf_counter() - started, "rss_mb": usage.ru_maxrss / 1024,
               "cpu": usage.ru_utime + usage.ru_stime, "code": os.waitstatus_to_exitcode(status)}, out)
"""


def timed(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run a tool: wall seconds, peak RSS (MB) and CPU seconds of its own process (LAUNCHER)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as figures:
        launch = [sys.executable, "-S", "-c", LAUNCHER, figures.name, *command]
        process = subprocess.run(launch, capture_output=True, env=env, cwd=cwd, check=False)
        result: dict[str, Any] = json.loads(Path(figures.name).read_text())
    result["stdout"] = process.stdout.decode(errors="replace")
    result["stderr"] = process.stderr.decode(errors="replace")
    return result


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def build(url: str, rows: int) -> None:
    with connect(url) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute(DDL)
        conn.execute(FILL, {"rows": rows})
        conn.execute("VACUUM ANALYZE items")


def damage(url: str, rows: int, seed: int = 15) -> dict[str, set[int]]:
    """100 missing, 100 extra, 100 changed (tiny changes), scattered; returns the expected keys."""
    rng = random.Random(seed)
    picked = rng.sample(range(1, rows + 1), 200)
    missing, changed = set(picked[:100]), sorted(picked[100:])
    extra = set(range(rows + 1, rows + 101))
    with connect(url) as conn:
        conn.execute("DELETE FROM items WHERE id = ANY(%s)", (sorted(missing),))
        conn.execute("UPDATE items SET amount = amount + 0.01 WHERE id = ANY(%s)", (changed[0::3],))
        conn.execute(
            "UPDATE items SET created_at = created_at + interval '1 microsecond' WHERE id = ANY(%s)",
            (changed[1::3],),
        )
        conn.execute(
            "UPDATE items SET tags = jsonb_set(tags, '{a}', '99') WHERE id = ANY(%s)", (changed[2::3],)
        )
        conn.execute(
            "INSERT INTO items SELECT g, 'new', 1.00, now(), '{}'::jsonb "
            "FROM generate_series(%s::bigint, %s::bigint) g",
            (rows + 1, rows + 100),
        )
        conn.execute("VACUUM ANALYZE items")
    return {"missing": missing, "extra": extra, "changed": set(changed)}


def warm(*urls: str) -> None:
    for url in urls:
        with connect(url) as conn:
            conn.execute("SELECT count(*), sum(hashtextextended(tags::text, 0)) FROM items").fetchall()


def ours(config: Path, checkout: Path = ROOT) -> dict[str, Any]:
    """`strangler parity sql` from ``checkout`` (this one, or --baseline's: before/after, one run)."""
    command = [
        sys.executable, "-m", "proxy.cli", "parity", "sql", "-c", str(config), "--json", "--no-store",
        "--samples", "1000", "--checkpoint", str(config.parent / "checkpoint.json"),
    ]  # fmt: skip
    result = timed(command, env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(checkout)}, cwd=checkout)
    try:
        report = json.loads(result["stdout"])["tables"][0]
    except (ValueError, KeyError, IndexError):
        raise SystemExit(f"strangler parity failed: {result['stderr'][-2000:]}") from None
    result["found"] = {
        "missing": set(report["samples"]["missing"]),
        "extra": set(report["samples"]["extra"]),
        "changed": {c["key"] for c in report["samples"]["changed"]},
    }
    result["engine"] = (report["seconds"], report["client_cpu_seconds"])
    return result


def reladiff(binary: str, src: str, dst: str) -> dict[str, Any]:
    a = src.replace("postgresql+psycopg://", "postgresql://")
    b = dst.replace("postgresql+psycopg://", "postgresql://")
    columns = ["-c", "owner", "-c", "amount", "-c", "created_at", "-c", "tags"]
    result = timed([binary, a, "items", b, "items", "-k", "id", *columns])
    lines = [line for line in result["stdout"].splitlines() if line[:1] in "+-"]
    result["found_lines"] = len(lines)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--url", help="existing server, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/")
    parser.add_argument("--reladiff", default=shutil.which("reladiff"), help="reladiff executable")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. main) to time beside this one")
    args = parser.parse_args()

    server = None
    if args.url:
        base = args.url.rstrip("/")
        with connect(base + "/postgres") as conn:
            for name in ("parity_src", "parity_dst"):
                conn.execute(f"DROP DATABASE IF EXISTS {name}")
                conn.execute(f"CREATE DATABASE {name}")
        src, dst = base + "/parity_src", base + "/parity_dst"
    else:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise SystemExit("no PostgreSQL binaries (apt-get install postgresql), or pass --url")
        server = PostgresServer(bin_dir).start()
        src, dst = server.create_database("parity_src"), server.create_database("parity_dst")
    try:
        started = time.perf_counter()
        build(src, args.rows)
        build(dst, args.rows)
        with connect(src) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(
            f"built 2 x {args.rows:,} rows in {time.perf_counter() - started:.1f}s (PostgreSQL {version[0]})"
        )
        work = Path(tempfile.mkdtemp(prefix="parity-bench-"))
        config = work / "parity.yaml"
        config.write_text(
            yaml.safe_dump(
                {"source": src, "target": dst, "tables": [{"source_table": "items", "key": ["id"]}]}
            )
        )
        rows: list[tuple[str, str, dict[str, Any], str]] = []

        warm(src, dst)
        for name, checkout in _checkouts(args.baseline):
            result = ours(config, checkout)
            ok = result["code"] == 0 and not any(result["found"].values())
            rows.append(("equal", name, result, "exit 0, equal" if ok else f"WRONG (exit {result['code']})"))
        if args.reladiff:
            rel = reladiff(args.reladiff, src, dst)
            rows.append(
                ("equal", "reladiff (default)", rel, f"exit {rel['code']}, {rel['found_lines']} diff lines")
            )

        expected = damage(dst, args.rows)
        warm(src, dst)
        for name, checkout in _checkouts(args.baseline):
            result = ours(config, checkout)
            exact = result["found"] == expected
            note = f"exit {result['code']}, " + (
                "all 300 exact" if exact else f"WRONG: {_counts(result['found'])}"
            )
            rows.append(("300 differences", name, result, note))
        if args.reladiff:
            rel = reladiff(args.reladiff, src, dst)
            rows.append(
                (
                    "300 differences",
                    "reladiff (default)",
                    rel,
                    f"exit {rel['code']}, {rel['found_lines']} diff lines",
                )
            )

        print(
            f"\n{'case':<16} {'tool':<21} {'wall s':>7} {'peak RSS MB':>12} {'CPU s':>6} "
            f"{'compare s':>10} {'its CPU s':>10}  result"
        )
        for case, tool, r, note in rows:
            wall, cpu = r.get("engine", ("-", "-"))
            print(
                f"{case:<16} {tool:<21} {r['wall']:>7.2f} {r['rss_mb']:>12.1f} {r['cpu']:>6.2f} "
                f"{wall:>10} {cpu:>10}  {note}"
            )
        print(
            "\nwall, peak RSS and CPU are the whole child process (interpreter start and imports included);\n"
            "compare s / its CPU s: the comparison alone, as strangler's JSON report gives them."
        )
        if not args.reladiff:
            print("reladiff not found (pip install 'reladiff[postgresql]', then --reladiff PATH)")
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()


def _checkouts(baseline: Path | None) -> list[tuple[str, Path]]:
    return [("strangler parity", ROOT)] + ([("strangler (baseline)", baseline.resolve())] if baseline else [])


def _counts(found: dict[str, set[int]]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in found.items())


if __name__ == "__main__":
    main()

"""Parity fixtures: one real PostgreSQL server per session (two databases, ``src`` and ``dst``),
SQLite files per test, and helpers to fill them with plain SQL."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from tests.pgserver import PostgresServer, find_bin_dir

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (scripts/test installs the Debian package when root)")
    server = PostgresServer(bin_dir).start()
    server.create_database("src")
    server.create_database("dst")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_urls(postgres: PostgresServer) -> tuple[str, str]:
    return postgres.url("src"), postgres.url("dst")


@pytest.fixture()
def table_name() -> str:
    """A fresh table name per test, so tests share the session databases without interfering."""
    return f"t{next(_names)}"


def execute(url: str, *statements: str, params: list[dict[str, Any]] | None = None) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                if params is not None and statement.lstrip().lower().startswith("insert"):
                    conn.execute(sa.text(statement), params)
                else:
                    conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def write_config(path: Path, source: str, target: str, tables: list[dict[str, Any]], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"source": source, "target": target, "tables": tables, **extra}))
    return path

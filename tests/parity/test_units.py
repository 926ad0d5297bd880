"""Pure parts of parity: pacing, normalisers, config errors (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from proxy.parity.config import ParityConfigError, parse_config, parse_duration
from proxy.parity.normalise import canonical, common_kind, row_hash
from proxy.parity.throttle import Throttle


def test_max_qps_paces_starts_evenly_across_callers() -> None:
    now = [100.0]
    slept: list[float] = []
    throttle = Throttle(10, clock=lambda: now[0], sleep=slept.append)
    for _ in range(3):
        throttle.wait()
    assert slept == pytest.approx([0.1, 0.2])  # the first goes at once
    now[0] = 200.0  # idle for a long time: no burst credit is saved up
    assert throttle.reserve() == 0.0 and throttle.reserve() == pytest.approx(0.1)
    assert Throttle(None).reserve() == 0.0


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [
        ("decimal", Decimal("10.50"), Decimal("10.5")),
        ("decimal", 0.1 + 0.2, Decimal("0.3")),  # floats count to 15 significant digits
        ("decimal", Decimal("0.00"), 0),
        ("bool", True, 1),
        ("bool", "f", 0),
        ("json", '{"b": [1, 2], "a": null}', {"a": None, "b": [1, 2]}),
        ("timestamp", datetime(2024, 1, 1, 12, tzinfo=timezone(timedelta(hours=2))), "2024-01-01 10:00:00"),
        ("date", datetime(2024, 1, 1).date(), "2024-01-01"),
    ],
)
def test_values_that_mean_the_same_are_equal(kind: str, a: object, b: object) -> None:
    assert canonical(a, kind) == canonical(b, kind)


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [
        ("text", None, ""),
        ("text", None, "<null>"),
        ("text", "", "<null>"),
        ("json", None, "null"),
        ("decimal", Decimal("10.50"), Decimal("10.51")),
        ("json", '{"a": 1}', '{"a": 1.5}'),
        ("bool", True, 2 - 2),
    ],
)
def test_values_that_differ_stay_different(kind: str, a: object, b: object) -> None:
    assert canonical(a, kind) != canonical(b, kind)


def test_timestamp_precision_rounds_like_postgresql() -> None:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    assert canonical(base + timedelta(microseconds=123456), "timestamp", 3) == canonical(
        base + timedelta(microseconds=123000), "timestamp", 3
    )
    assert canonical(base + timedelta(microseconds=123500), "timestamp", 3) == canonical(
        base + timedelta(microseconds=124000), "timestamp", 3
    )
    assert canonical(base + timedelta(microseconds=1), "timestamp") != canonical(base, "timestamp")


def test_row_hash_cannot_be_fooled_by_separators_or_nulls() -> None:
    assert row_hash(["a|b", "c"]) != row_hash(["a", "b|c"])
    assert row_hash([None, "x"]) != row_hash(["", "x"]) != row_hash(["N", "x"])
    assert common_kind("int", "decimal") == "decimal" and common_kind("text", "json") == "json"


def test_config_errors_are_one_clear_line() -> None:
    with pytest.raises(ParityConfigError, match=r"tables.0.key"):
        parse_config(
            {"source": "sqlite://", "target": "sqlite://", "tables": [{"source_table": "t", "key": []}]}
        )
    with pytest.raises(ParityConfigError, match="key columns cannot be ignored"):
        parse_config(
            {"source": "a", "target": "b", "tables": [{"source_table": "t", "key": ["id"], "ignore": ["id"]}]}
        )
    with pytest.raises(ParityConfigError, match="unique"):
        parse_config({"source": "a", "target": "b", "tables": [{"source_table": "t", "key": ["i"]}] * 2})
    assert parse_duration("1.5m") == 90 and parse_duration("250ms") == 0.25 and parse_duration(3) == 3
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_the_documented_example_config_is_valid() -> None:
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "parity.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    config = parse_config(yaml.safe_load(block.group(1)))
    [orders] = config.tables
    assert orders.target_key == ["id"] and orders.transforms == {"amount_cents": "round(amount * 100)"}
    assert config.lag_seconds == 30


def test_errors_stored_or_alerted_carry_no_addresses() -> None:
    from proxy.parity.store import redact

    text = (
        'connection failed: connection to server at "10.1.2.3", port 5432 failed; '
        "postgresql+psycopg://reader@db.internal:5432/shop; 192.168.0.7:6379"
    )
    cleaned = redact(text)
    assert cleaned is not None
    for secret in ("10.1.2.3", "5432", "db.internal", "reader@", "192.168.0.7", "6379"):
        assert secret not in cleaned
    assert cleaned.startswith("connection failed: connection to server at <host>")

"""Value normalisers: when do two stored values mean the same thing?

Each compared column gets one *kind*, chosen from the types on both sides (the richer one wins:
a JSON column against a text column compares as JSON, a boolean against an integer as 0/1). A
value is turned into canonical text for its kind, or ``None`` for SQL NULL, so that

* NULL, the empty string and the string ``'<null>'`` stay three different values;
* ``10.5`` equals ``10.50`` (decimal scale), floats count to 15 significant digits;
* timestamps are instants (naive ones are taken as UTC) compared at the column's precision;
* JSON is compared in canonical form (keys sorted, no whitespace), never as raw text;
* ``True`` equals ``1`` and ``'t'``.

Pure (no SQL here: :mod:`proxy.parity.sql` maps column types to kinds). The same canonical text
feeds the client-side row hash (SQLite and mixed dialects), so hashing
and the final comparison agree by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

KINDS = ("int", "decimal", "bool", "timestamp", "date", "json", "text", "bytes")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})
_FALSE = frozenset({"0", "f", "false", "n", "no", "off"})
_RANK = {"json": 7, "timestamp": 6, "date": 5, "bool": 4, "decimal": 3, "int": 2, "bytes": 1, "text": 0}
MASK64 = (1 << 64) - 1


def common_kind(left: str, right: str) -> str:
    """The kind two columns are compared as: the richer of the two (int with decimal: decimal)."""
    if left == right:
        return left
    return left if _RANK[left] >= _RANK[right] else right


def _decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        return str(value)
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _as_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return Decimal(int(value))
    if isinstance(value, float):
        return Decimal(format(value, ".15g"))
    try:
        return Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        return None


def instant(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=UTC)
    if isinstance(value, str):
        try:
            return instant(datetime.fromisoformat(value.strip().replace(" ", "T", 1)))
        except ValueError:
            return None
    return None


def canonical(value: Any, kind: str, precision: int = 6) -> str | None:
    """Canonical text of one value for its column kind; ``None`` only for SQL NULL."""
    if value is None:
        return None
    if kind in ("int", "decimal"):
        number = _as_decimal(value)
        return _decimal_text(number) if number is not None else "?" + str(value)
    if kind == "bool":
        if isinstance(value, bool | int):
            return "1" if value else "0"
        text = str(value).strip().lower()
        if text in _TRUE:
            return "1"
        if text in _FALSE:
            return "0"
        return "?" + str(value)
    if kind == "timestamp":
        when = instant(value)
        if when is None:
            return "?" + str(value)
        micros = (when - _EPOCH) // _MICRO
        step = 10 ** (6 - precision)
        if step > 1:
            micros = (micros + step // 2) // step * step  # round half up, as PostgreSQL does
        return str(micros)
    if kind == "date":
        return value.isoformat() if isinstance(value, date) else str(value)
    if kind == "json":
        return canonical_json(value)
    if kind == "bytes":
        return bytes(value).hex() if isinstance(value, bytes | bytearray | memoryview) else str(value)
    return value if isinstance(value, str) else str(value)


def canonical_json(value: Any) -> str:
    """JSON text with sorted keys and no whitespace; text that is not JSON stays itself, marked."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return "?" + value
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return "?" + repr(value)


def row_text(pieces: Sequence[str | None]) -> str:
    """Length-prefixed pieces: no value can imitate a separator, and NULL (``N``) is not ``0:``."""
    return "".join("N" if piece is None else f"{len(piece)}:{piece}|" for piece in pieces)


def row_hash(pieces: Sequence[str | None]) -> int:
    """64-bit row hash for client-side hashing (summed mod 2**64 per segment: order-free)."""
    digest = hashlib.blake2b(row_text(pieces).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def display(value: Any) -> Any:
    """A value as it appears in a report (JSON-safe, short)."""
    if value is None or isinstance(value, bool | int | str):
        text = value
    elif isinstance(value, float):
        return value
    elif isinstance(value, Decimal):
        text = str(value)
    elif isinstance(value, datetime | date):
        text = value.isoformat()
    elif isinstance(value, dict | list):
        text = canonical_json(value)
    elif isinstance(value, bytes | bytearray | memoryview):
        text = "0x" + bytes(value).hex()
    else:
        text = str(value)
    if isinstance(text, str) and len(text) > 200:
        return text[:200] + "..."
    return text

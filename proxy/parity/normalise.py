"""Value normalisers: when do two stored values mean the same thing?

Each compared column gets one *kind*, chosen from the types on both sides (the richer one wins:
a JSON column against a text column compares as JSON, a boolean against an integer as 0/1). A
value is turned into canonical text for its kind, or ``None`` for SQL NULL, so that

* NULL, the empty string and the string ``'<null>'`` stay three different values;
* ``10.5`` equals ``10.50`` (decimal scale);
* floats are floats (``float4``, ``float8``), compared at their type's precision: the value is
  rounded to the type (a ``real`` against a ``double precision`` compares as ``real``), then to
  its decimal digits (6 for ``real``, 15 for ``double precision``: what every value of the type
  round-trips to), so ``0.1 + 0.2`` equals ``0.3``. ``NaN`` equals ``NaN``, ``-0`` equals ``0``;
  a table's ``float_tolerance`` (ulps or relative) can only widen that equality (:func:`same`);
* timestamps are instants (naive ones are taken as UTC) compared at the column's precision,
  rounded as PostgreSQL rounds them: half away from zero counted from 2000-01-01, its epoch;
* JSON is compared in canonical form (keys sorted, no whitespace), never as raw text;
* ``True`` equals ``1``, ``'t'``, ``'true'``, ``'yes'`` and ``'on'`` (any case, outer blanks).

Pure (no SQL here: :mod:`proxy.parity.pg` and :mod:`proxy.parity.sql` map column types to
kinds). The same canonical text feeds the client-side row hash (SQLite and mixed dialects), so
hashing and the final comparison agree by construction.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

try:  # CPython's own blake2 (hashlib hands out this one too, after loading OpenSSL: about 1 MB)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - another interpreter
    from hashlib import blake2b

KINDS = ("int", "decimal", "float4", "float8", "bool", "timestamp", "date", "json", "text", "bytes")
FLOATS = ("float4", "float8")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL counts (and rounds) timestamps from here
_MICRO = timedelta(microseconds=1)
_EPOCH_GAP = (_PG_EPOCH - _EPOCH) // _MICRO  # canonical text stays microseconds since 1970
TRUE_WORDS = frozenset({"1", "t", "true", "y", "yes", "on"})
FALSE_WORDS = frozenset({"0", "f", "false", "n", "no", "off"})
_RANK = {
    "json": 7, "timestamp": 6, "date": 5, "bool": 4, "float4": 3.5, "float8": 3.5, "decimal": 3, "int": 2,
    "bytes": 1, "text": 0,
}  # fmt: skip
_DIGITS = {"float4": 6, "float8": 15}  # FLT_DIG, DBL_DIG: the decimal digits every value keeps
MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class FloatTolerance:
    """How far apart two floats may be and still be equal, beyond the type's precision: ``ulps``
    units in the last place of the compared type, or ``relative`` to the larger magnitude. Either
    one is enough; NaN and the infinities only ever equal themselves."""

    ulps: int = 0
    relative: float = 0.0


def common_kind(left: str, right: str) -> str:
    """The kind two columns are compared as: the richer of the two (int with decimal: decimal;
    a float with any number: the float; ``real`` with ``double precision``: ``real``)."""
    if left == right:
        return left
    if {left, right} == set(FLOATS):
        return "float4"
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


def as_float(value: Any, kind: str = "float8") -> float | None:
    """A value as a float of the kind's type (``float4``: rounded to single precision, and out of
    its range it is an infinity), or None when it is not a number."""
    if isinstance(value, float):
        number = value
    elif isinstance(value, bool | int | Decimal):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf if value > 0 else -math.inf
    else:
        try:  # PostgreSQL spells them NaN, Infinity, -Infinity; float() reads those too
            number = float(str(value).strip())
        except ValueError:
            return None
    if kind == "float4" and math.isfinite(number):
        try:
            number = struct.unpack("f", struct.pack("f", number))[0]
        except OverflowError:
            number = math.copysign(math.inf, number)
    return number


def _float_text(number: float, kind: str) -> str:
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "Infinity" if number > 0 else "-Infinity"
    if number == 0:
        return "0"  # -0 is 0
    return format(number, f".{_DIGITS[kind]}g")


def _ordered(number: float, kind: str) -> int:
    """The float's place among all floats of its type: neighbours differ by one."""
    if kind == "float4":
        bits, lowest = struct.unpack("<i", struct.pack("<f", number))[0], -(1 << 31)
    else:
        bits, lowest = struct.unpack("<q", struct.pack("<d", number))[0], -(1 << 63)
    return lowest - bits if bits < 0 else bits


def same(
    left: Any, right: Any, kind: str, precision: int = 6, tolerance: FloatTolerance | None = None
) -> bool:
    """Do two values of one column mean the same? Equal canonical text, or (floats only) within
    the tolerance. The tolerance only widens equality, so a row whose hash matches is equal."""
    a, b = canonical(left, kind, precision), canonical(right, kind, precision)
    if a == b:
        return True
    if tolerance is None or kind not in FLOATS or a is None or b is None:
        return False
    x, y = as_float(left, kind), as_float(right, kind)
    if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
        return False
    if tolerance.relative and abs(x - y) <= tolerance.relative * max(abs(x), abs(y)):
        return True
    return bool(tolerance.ulps) and abs(_ordered(x, kind) - _ordered(y, kind)) <= tolerance.ulps


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
    if kind in FLOATS:
        real = as_float(value, kind)
        return _float_text(real, kind) if real is not None else "?" + str(value)
    if kind == "bool":
        if isinstance(value, bool | int | float | Decimal):
            return "1" if value != 0 else "0"
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return "1"
        if text in FALSE_WORDS:
            return "0"
        return "?" + str(value)
    if kind == "timestamp":
        when = instant(value)
        if when is None:
            return "?" + str(value)
        micros = (when - _PG_EPOCH) // _MICRO
        step = 10 ** (6 - precision)
        if step > 1:  # as PostgreSQL stores timestamp(p): half away from zero, counted from 2000
            half = step // 2
            micros = (micros + half) // step * step if micros >= 0 else -((half - micros) // step * step)
        return str(micros + _EPOCH_GAP)
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
            value = json.loads(value)
        except ValueError:
            return "?" + value
    try:  # the standard library's json: the process has it loaded already (orjson: 0.25 MB more)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError):
        return "?" + repr(value)


def row_text(pieces: Sequence[str | None]) -> str:
    """Length-prefixed pieces: no value can imitate a separator, and NULL (``N``) is not ``0:``."""
    return "".join("N" if piece is None else f"{len(piece)}:{piece}|" for piece in pieces)


def row_hash(pieces: Sequence[str | None]) -> int:
    """64-bit row hash for client-side hashing (summed mod 2**64 per segment: order-free)."""
    digest = blake2b(row_text(pieces).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def display(value: Any) -> Any:
    """A value as it appears in a report (JSON-safe, short)."""
    if value is None or isinstance(value, bool | int | str):
        text = value
    elif isinstance(value, float):
        return value if math.isfinite(value) else _float_text(value, "float8")  # JSON has no NaN
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

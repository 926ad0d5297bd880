"""The parity configuration (``parity.yaml``): which tables, how their columns map, how to compare.

Validated once when loaded; every problem becomes one :class:`ParityConfigError` line, so the CLI
exits with code 2 and a clear message instead of comparing something other than what was meant.

Plain dataclasses checked by hand, not pydantic models: importing pydantic and building three
models cost `strangler parity` more of its peak memory than the comparison itself needs.
Messages keep pydantic's shape (``tables.0.key: List should have at least 1 item``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.parity.errors import ParityConfigError

__all__ = ["ParityConfig", "ParityConfigError", "TableMap", "load_config", "parse_config", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``30s``, ``1.5m``, ``250ms`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (e.g. 30s, 2m, 500ms)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class _Invalid(ValueError):
    """One field's problem (the message only; the caller knows where)."""


Loc = tuple[str | int, ...]
Check = Callable[[Any], Any]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("Input should be a valid string")
    return value


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _number(
    kind: type, minimum: float | None = None, maximum: float | None = None, above: bool = False
) -> Check:
    """An int (``kind`` int) or a float (ints welcome) within bounds; booleans are not numbers."""

    def check(value: Any) -> Any:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise _Invalid(f"Input should be a valid {'integer' if kind is int else 'number'}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise _Invalid(f"Input should be greater than {'' if above else 'or equal to '}{minimum}")
        if maximum is not None and value > maximum:
            raise _Invalid(f"Input should be less than or equal to {maximum}")
        return kind(value)

    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("Input should be a valid boolean")
    return value


def _texts(min_length: int = 0) -> Check:
    def check(value: Any) -> list[str]:
        if not isinstance(value, list):
            raise _Invalid("Input should be a valid list")
        if len(value) < min_length:
            raise _Invalid(f"List should have at least {min_length} item after validation, not {len(value)}")
        return [_text(item) for item in value]

    return check


def _text_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid("Input should be a valid dictionary")
    return {_text(k): _text(v) for k, v in value.items()}


def _duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _Invalid(f"Value error, {exc}") from None


_REQUIRED: Any = object()


def _fields(
    raw: Any, loc: Loc, spec: dict[str, tuple[Check, Any]], problems: list[tuple[Loc, str]]
) -> dict[str, Any] | None:
    """Checked values of one mapping: every problem is added to ``problems`` (None if any)."""
    if not isinstance(raw, dict):
        problems.append((loc, "Input should be a valid dictionary"))
        return None
    before = len(problems)
    values: dict[str, Any] = {}
    for name in raw:
        if name not in spec:
            problems.append(((*loc, str(name)), "Extra inputs are not permitted"))
    for name, (check, default) in spec.items():
        if name not in raw:
            if default is _REQUIRED:
                problems.append(((*loc, name), "Field required"))
            else:
                values[name] = default() if callable(default) else default
            continue
        try:
            values[name] = check(raw[name])
        except _Invalid as exc:
            problems.append(((*loc, name), str(exc)))
    return values if len(problems) == before else None


@dataclass(slots=True)
class FloatToleranceMap:
    """``float_tolerance``: floats this close are equal too (either limit is enough)."""

    ulps: int = 0  # units in the last place of the compared type
    relative: float = 0.0  # |a - b| <= relative * max(|a|, |b|)

    @classmethod
    def parse(cls, raw: Any, loc: Loc, problems: list[tuple[Loc, str]]) -> FloatToleranceMap | None:
        spec = {"ulps": (_number(int, 0), 0), "relative": (_number(float, 0), 0.0)}
        values = _fields(raw, loc, spec, problems)
        return None if values is None else cls(**values)


@dataclass(slots=True)
class TableMap:
    """One table pair. Column names in ``key``, ``rename``, ``ignore`` and ``updated`` are the
    source's; ``transforms`` are keyed by the target column they produce."""

    source_table: str
    key: list[str]
    name: str | None = None
    target_table: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    transforms: dict[str, str] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    ignore_target: list[str] = field(default_factory=list)
    where: str | None = None
    target_where: str | None = None
    updated: str | None = None
    timestamp_precision: int = 6
    float_tolerance: FloatToleranceMap | None = None  # default: equal to the type's precision

    @classmethod
    def parse(cls, raw: Any, loc: Loc, problems: list[tuple[Loc, str]]) -> TableMap | None:
        text, maybe = (_text, _REQUIRED), (_optional(_text), None)
        spec: dict[str, tuple[Check, Any]] = {
            "name": maybe, "source_table": text, "target_table": maybe, "key": (_texts(1), _REQUIRED),
            "rename": (_text_map, dict), "transforms": (_text_map, dict), "ignore": (_texts(), list),
            "ignore_target": (_texts(), list), "where": maybe, "target_where": maybe, "updated": maybe,
            "timestamp_precision": (_number(int, 0, 6), 6), "float_tolerance": (lambda v: v, None),
        }  # fmt: skip
        values = _fields(raw, loc, spec, problems)
        if values is None:
            return None
        if values["float_tolerance"] is not None:
            tolerance = FloatToleranceMap.parse(
                values["float_tolerance"], (*loc, "float_tolerance"), problems
            )
            if tolerance is None:
                return None
            values["float_tolerance"] = tolerance
        table = cls(**values)
        try:
            table._defaults()
        except ValueError as exc:
            problems.append((loc, f"Value error, {exc}"))
            return None
        return table

    def _defaults(self) -> None:
        if self.target_table is None:
            self.target_table = self.source_table
        if self.name is None:
            self.name = self.source_table
        if self.target_where is None:
            self.target_where = self.where
        clash = set(self.key) & set(self.ignore)
        if clash:
            raise ValueError(f"key columns cannot be ignored: {sorted(clash)}")
        targets = list(self.rename.values())
        if len(set(targets)) != len(targets):
            raise ValueError("two source columns are renamed to the same target column")

    def target_name(self, source_column: str) -> str:
        return self.rename.get(source_column, source_column)

    @property
    def target_key(self) -> list[str]:
        return [self.target_name(column) for column in self.key]


@dataclass(slots=True)
class ParityConfig:
    """Two databases (SQLAlchemy URLs) and the tables to compare between them."""

    source: str
    target: str
    tables: list[TableMap]
    lag_seconds: float = 0.0
    chunk_rows: int = 250_000
    segment_rows: int = 64
    max_qps: float | None = None
    read_only: bool = True

    def as_dict(self, exclude: Collection[str] = ()) -> dict[str, Any]:
        """Plain data (nested tables too), without the ``exclude`` fields."""
        return {k: v for k, v in asdict(self).items() if k not in exclude}

    @classmethod
    def parse(cls, raw: Any) -> ParityConfig:
        problems: list[tuple[Loc, str]] = []
        spec: dict[str, tuple[Check, Any]] = {
            "source": (_text, _REQUIRED), "target": (_text, _REQUIRED), "tables": (lambda v: v, _REQUIRED),
            "lag_seconds": (_duration, 0.0), "chunk_rows": (_number(int, 1), 250_000),
            "segment_rows": (_number(int, 1), 64), "read_only": (_flag, True),
            "max_qps": (_optional(_number(float, 0, above=True)), None),
        }  # fmt: skip
        values = _fields(raw, (), spec, problems)
        tables: list[TableMap | None] = []
        given = raw.get("tables") if isinstance(raw, dict) else None
        if isinstance(given, list) and given:
            tables = [TableMap.parse(item, ("tables", i), problems) for i, item in enumerate(given)]
        elif isinstance(raw, dict) and "tables" in raw:
            message = (
                "Input should be a valid list"
                if not isinstance(given, list)
                else ("List should have at least 1 item after validation, not 0")
            )
            problems.append((("tables",), message))
        if problems or values is None:
            raise ParityConfigError(_explain(problems))
        config = cls(**{**values, "tables": tables})
        names = [table.name for table in config.tables]
        if len(set(names)) != len(names):
            raise ParityConfigError(
                "config: Value error, table names must be unique (set `name:` when a table appears twice)"
            )
        return config


def _explain(problems: list[tuple[Loc, str]]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in loc) or 'config'}: {message}" for loc, message in problems)


def load_config(path: Path, **overrides: Any) -> ParityConfig:
    """Read and validate ``parity.yaml``; ``${ENV}`` is not expanded (keep passwords in the URL's
    environment, e.g. ``source: postgresql+psycopg://reader@db/app`` with PGPASSWORD set)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ParityConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ParityConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParityConfigError(f"{path}: expected a mapping at the top level")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ParityConfig:
    return ParityConfig.parse(raw)

"""The parity configuration (``parity.yaml``): which tables, how their columns map, how to compare.

Validated once when loaded; every problem becomes one :class:`ParityConfigError` line, so the CLI
exits with code 2 and a clear message instead of comparing something other than what was meant.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


class FloatToleranceMap(BaseModel):
    """``float_tolerance``: floats this close are equal too (either limit is enough)."""

    model_config = ConfigDict(extra="forbid")

    ulps: int = Field(default=0, ge=0)  # units in the last place of the compared type
    relative: float = Field(default=0.0, ge=0)  # |a - b| <= relative * max(|a|, |b|)


class TableMap(BaseModel):
    """One table pair. Column names in ``key``, ``rename``, ``ignore`` and ``updated`` are the
    source's; ``transforms`` are keyed by the target column they produce."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    source_table: str
    target_table: str | None = None
    key: list[str] = Field(min_length=1)
    rename: dict[str, str] = Field(default_factory=dict)
    transforms: dict[str, str] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=list)
    ignore_target: list[str] = Field(default_factory=list)
    where: str | None = None
    target_where: str | None = None
    updated: str | None = None
    timestamp_precision: int = Field(default=6, ge=0, le=6)
    float_tolerance: FloatToleranceMap | None = None  # default: equal to the type's precision

    @model_validator(mode="after")
    def _defaults(self) -> TableMap:
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
        return self

    def target_name(self, source_column: str) -> str:
        return self.rename.get(source_column, source_column)

    @property
    def target_key(self) -> list[str]:
        return [self.target_name(column) for column in self.key]


class ParityConfig(BaseModel):
    """Two databases (SQLAlchemy URLs) and the tables to compare between them."""

    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    tables: list[TableMap] = Field(min_length=1)
    lag_seconds: float = 0.0
    chunk_rows: int = Field(default=250_000, ge=1)
    segment_rows: int = Field(default=64, ge=1)
    max_qps: float | None = Field(default=None, gt=0)
    read_only: bool = True

    @field_validator("lag_seconds", mode="before")
    @classmethod
    def _lag(cls, value: Any) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _unique(self) -> ParityConfig:
        names = [table.name for table in self.tables]
        if len(set(names)) != len(names):
            raise ValueError("table names must be unique (set `name:` when a table appears twice)")
        return self


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "config"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


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
    try:
        return ParityConfig.model_validate(raw)
    except ValidationError as exc:
        raise ParityConfigError(_explain(exc)) from exc

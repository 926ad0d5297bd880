"""What a parity run found, per table, and how it is shown: JSON, a terminal table, Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

EQUAL, DIFFERENT, ERROR = "equal", "different", "error"


@dataclass(slots=True)
class TableResult:
    """One table's verdict. Counts are exact; ``samples`` holds the first few of each class."""

    table: str
    status: str = EQUAL
    source_rows: int | None = None
    target_rows: int | None = None
    missing: int = 0  # in the source, not in the target
    extra: int = 0  # in the target, not in the source
    changed: int = 0
    changed_columns: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[Any]] = field(default_factory=lambda: {"missing": [], "extra": [], "changed": []})
    skipped_recent: int = 0  # rows newer than the lag window, not judged
    resolved_after_lag: int = 0  # differed at first, equal on the re-check
    aggregates: dict[str, Any] = field(default_factory=dict)
    mode: str = ""
    seconds: float = 0.0
    client_cpu_seconds: float = 0.0  # this process, all threads: the comparison's own cost
    finished_at: float = 0.0
    error: str | None = None

    @property
    def differences(self) -> int:
        return self.missing + self.extra + self.changed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def exit_code(results: list[TableResult]) -> int:
    """0 every table equal, 1 differences found, 2 an error (an error outranks differences)."""
    if any(r.status == ERROR for r in results):
        return 2
    return 1 if any(r.status == DIFFERENT for r in results) else 0


def to_json(results: list[TableResult], kind: str) -> str:
    return json.dumps(
        {"kind": kind, "exit_code": exit_code(results), "tables": [r.as_dict() for r in results]},
        indent=2,
        default=str,
    )


def _counts(result: TableResult) -> str:
    if result.status == ERROR:
        return result.error or "error"
    cols = ", ".join(f"{c} {n}" for c, n in sorted(result.changed_columns.items()))
    return f"changed columns: {cols}" if cols else ""


def to_markdown(results: list[TableResult], kind: str) -> str:
    lines = [
        f"# Parity report ({kind})",
        "",
        "| table | status | source rows | target rows | missing | extra | changed | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.table} | {r.status} | {_n(r.source_rows)} | {_n(r.target_rows)} | {r.missing} | {r.extra} "
            f"| {r.changed} | {_counts(r).replace('|', '/')} |"
        )
    for r in results:
        if r.differences:
            lines += ["", f"## {r.table}: samples", ""]
            lines += [f"- {line}" for line in sample_lines(r)]
    return "\n".join(lines) + "\n"


def sample_lines(result: TableResult, limit: int | None = None) -> list[str]:
    """One line per sampled difference: ``missing in target: `7```, ``changed `9`: v: "a" -> "b"``."""
    lines: list[str] = []
    for key in result.samples.get("missing", [])[:limit]:
        lines.append(f"missing in target: `{json.dumps(key, default=str)}`")
    for key in result.samples.get("extra", [])[:limit]:
        lines.append(f"extra in target: `{json.dumps(key, default=str)}`")
    for sample in result.samples.get("changed", [])[:limit]:
        cols = "; ".join(
            f"{c}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"
            for c, (old, new) in sample["columns"].items()
        )
        lines.append(f"changed `{json.dumps(sample['key'], default=str)}`: {cols}")
    return lines


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def rich_table(results: list[TableResult], kind: str) -> Any:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"parity ({kind})")
    for column in ("table", "status", "source rows", "target rows", "missing", "extra", "changed", "notes"):
        table.add_column(column)
    colour = {EQUAL: "green", DIFFERENT: "yellow", ERROR: "red"}
    for r in results:
        table.add_row(
            escape(r.table), f"[{colour[r.status]}]{r.status}[/]", _n(r.source_rows), _n(r.target_rows),
            str(r.missing), str(r.extra), str(r.changed), escape(_counts(r)),
        )  # fmt: skip
    return table

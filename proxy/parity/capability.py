"""Wires parity results into every proxy: the last result per table, read from Redis beside the
request path (the control store's poll), becomes gauges the dashboard shows.

Why the proxies and not the `strangler parity` command: the command runs now and then, from
anywhere; Prometheus scrapes the proxies. Imports only ``control/`` and ``metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from proxy.control.keys import PARITY_LAST
from proxy.control.snapshot import SectionParser
from proxy.metrics import Metrics

SECTION = PARITY_LAST  # the hash `strangler parity` writes (proxy/parity/store.py: parity_key)
MAX_TABLES = 100  # label values come from the operator's parity configs: bounded all the same


class _Summary(BaseModel):
    """The fields of a stored summary the gauges need (``proxy/parity/store.py`` writes more)."""

    status: str
    missing: int | None = None
    extra: int | None = None
    changed: int | None = None

    @property
    def differences(self) -> int:
        return (self.missing or 0) + (self.extra or 0) + (self.changed or 0)


_SUMMARY: TypeAdapter[_Summary] = TypeAdapter(_Summary)


def sections(metrics: Metrics) -> dict[str, SectionParser]:
    """The snapshot section of the last parity results; parsing it updates the gauges."""

    def parse(raw: Mapping[str, str], previous: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """``{table: {"status", "differences"}}``; a malformed entry is skipped, reported once."""
        results: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        for table, text in sorted(raw.items())[:MAX_TABLES]:
            try:
                summary = _SUMMARY.validate_json(text)
            except ValidationError:
                problems.append(f"parity result for {table!r} is not a parity summary")
                continue
            results[table] = {"status": summary.status, "differences": summary.differences}
        if results != (previous or {}):
            metrics.parity_results(results)
        return results, problems

    return {SECTION: parse}

"""Evaluates the gates at each check: every group's, all at once (``evaluate_all``, before the
groups are judged), on one shared httpx client (created on first use, closed with the leader),
each bounded by ``min(timeout_seconds, half the check interval)``, so a slow or blackholed metrics
store delays a check (and a rollback) by at most that, however many groups and gates there are. A
gate with ``interval_seconds`` keeps its last record until that much time has passed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx

from proxy.canary.gates import providers
from proxy.canary.gates.decide import gate_record, well_formed
from proxy.canary.gates.result import GateResult
from proxy.metrics import Metrics
from proxy.settings import CanarySettings, HttpGate, PrometheusGate


class GateRunner:
    def __init__(self, canary: CanarySettings, metrics: Metrics) -> None:
        self._canary = canary
        self._metrics = metrics
        self._client: httpx.AsyncClient | None = None
        self._cap = canary.check_interval_seconds / 2

    def configured(self, group: str) -> bool:
        return bool(self._canary.gates_for(group))

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            # no redirects, no environment proxies or .netrc: the gate's address is the whole story
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self._cap)
        return self._client

    async def evaluate_all(
        self, previous: Mapping[str, dict[str, Any]], now: float
    ) -> dict[str, list[dict[str, Any]]]:
        """Every gated group's records at once (``previous``: each group's last verdict record)."""
        groups = [group for group in previous if self.configured(group)]
        found = await asyncio.gather(*(self.evaluate(g, previous[g].get("gates"), now) for g in groups))
        return dict(zip(groups, found, strict=True))

    async def evaluate(self, group: str, previous: Any, now: float) -> list[dict[str, Any]]:
        """The group's gate records for this check (``previous``: those of the last check)."""
        gates = self._canary.gates_for(group)
        if not gates:
            return []
        # read back from Redis: a list of records, unless someone wrote something else there
        kept = previous if isinstance(previous, list) else []
        before = {r["name"]: r for r in kept if isinstance(r, dict) and isinstance(r.get("name"), str)}
        due = [g for g in gates if not self._fresh(g, before.get(g.name), now)]
        results = await asyncio.gather(*(self._one(g, group) for g in due))
        fresh = {
            g.name: gate_record(g, r, before.get(g.name), now) for g, r in zip(due, results, strict=True)
        }
        for gate in due:
            record = fresh[gate.name]
            self._metrics.gate_checked(group, gate.name, record["status"], record["value"])
        return [fresh.get(g.name) or before[g.name] for g in gates]

    def _fresh(self, gate: PrometheusGate | HttpGate, record: dict[str, Any] | None, now: float) -> bool:
        if gate.interval_seconds is None or not well_formed(record):
            return False
        assert record is not None
        return 0 <= now - float(record["checked_at"]) < gate.interval_seconds

    async def _one(self, gate: PrometheusGate | HttpGate, group: str) -> GateResult:
        timeout = min(gate.timeout_seconds, self._cap)
        try:
            return await providers.evaluate(self._http(), gate, group, self._canary.window_seconds, timeout)
        except Exception as exc:  # noqa: BLE001 - one gate's bug must not stop the checks
            return GateResult("inconclusive", None, f"evaluation failed ({type(exc).__name__})")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

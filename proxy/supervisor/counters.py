"""The parent's counters, in memory shared with every worker (created before the first fork), and
the collector each worker registers in its ``/metrics`` registry: the parent has no HTTP server.
Written by the parent only (one writer, no lock); read at scrape time, nothing per request."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

RESULTS = ("ok", "invalid", "failed")
UPGRADE_RESULTS = ("ok", "failed")
_GENERATION, _RELOADS = 0, 1  # then the reload and upgrade results, then two cells per worker slot
_UPGRADES = _RELOADS + len(RESULTS)
_SLOTS = _UPGRADES + len(UPGRADE_RESULTS)


class Counters:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.cells: Any = multiprocessing.RawArray("d", _SLOTS + 2 * workers)

    def generation(self, number: int) -> None:
        self.cells[_GENERATION] = number

    def reloaded(self, result: str) -> None:
        self.cells[_RELOADS + RESULTS.index(result)] += 1

    def restarted(self, slot: int) -> None:
        self.cells[_SLOTS + 2 * slot] += 1

    def crash_loop(self, slot: int, looping: bool) -> None:
        self.cells[_SLOTS + 2 * slot + 1] = 1.0 if looping else 0.0

    def restarts(self, slot: int) -> int:
        return int(self.cells[_SLOTS + 2 * slot])

    def looping(self, slot: int) -> bool:
        return bool(self.cells[_SLOTS + 2 * slot + 1])

    def reloads(self, result: str) -> int:
        return int(self.cells[_RELOADS + RESULTS.index(result)])

    def upgraded(self, result: str) -> None:
        self.cells[_UPGRADES + UPGRADE_RESULTS.index(result)] += 1

    def upgrades(self, result: str) -> int:
        return int(self.cells[_UPGRADES + UPGRADE_RESULTS.index(result)])

    def export(self) -> dict[str, Any]:
        """The counters an upgrade carries to the new generation (as Envoy's hot restart does)."""
        return {
            "reloads": {result: self.reloads(result) for result in RESULTS},
            "upgrades": {result: self.upgrades(result) for result in UPGRADE_RESULTS},
            "restarts": [self.restarts(slot) for slot in range(self.workers)],
        }

    def carry(self, doc: dict[str, Any]) -> None:
        """Start from the old generation's counts (what ``export`` gave; unknown parts ignored)."""
        for result, count in (doc.get("reloads") or {}).items():
            if result in RESULTS:
                self.cells[_RELOADS + RESULTS.index(result)] += int(count)
        for result, count in (doc.get("upgrades") or {}).items():
            if result in UPGRADE_RESULTS:
                self.cells[_UPGRADES + UPGRADE_RESULTS.index(result)] += int(count)
        for slot, count in enumerate((doc.get("restarts") or [])[: self.workers]):
            self.cells[_SLOTS + 2 * slot] += int(count)


class CountersCollector:
    """prometheus-client collector over ``Counters`` (registered in each worker's registry)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        counters = self.counters
        restarts = CounterMetricFamily(
            "strangler_worker_restarts", "Workers restarted by the parent after an exit it did not ask for.",
            labels=["worker"],
        )  # fmt: skip
        looping = GaugeMetricFamily(
            "strangler_worker_crash_loop", "1 while a worker slot is in a crash loop.", labels=["worker"]
        )
        for slot in range(counters.workers):
            restarts.add_metric([str(slot)], counters.restarts(slot))
            looping.add_metric([str(slot)], 1.0 if counters.looping(slot) else 0.0)
        reloads = CounterMetricFamily(
            "strangler_config_reloads", "Configuration reloads by result (ok, invalid, failed).",
            labels=["result"],
        )  # fmt: skip
        for result in RESULTS:
            reloads.add_metric([result], counters.reloads(result))
        upgrades = CounterMetricFamily(
            "strangler_upgrades", "Upgrades by socket hand-over, by result (ok, failed); carried over.",
            labels=["result"],
        )  # fmt: skip
        for result in UPGRADE_RESULTS:
            upgrades.add_metric([result], counters.upgrades(result))
        generation = GaugeMetricFamily(
            "strangler_generation", "The workers' generation (1 at start, +1 a reload)."
        )
        generation.add_metric([], counters.cells[_GENERATION])
        yield from (restarts, looping, reloads, upgrades, generation)

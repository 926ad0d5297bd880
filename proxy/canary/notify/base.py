"""The notifier interface and its do-nothing default.

A notifier only knows how to make one delivery attempt to one of its targets; queueing, ordering,
retries and backoff live in the durable outbox and its courier, so they survive a leader's death.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from proxy.canary.events import Event

Outcome = Literal["sent", "retry", "rejected"]


class Notifier(Protocol):
    @property
    def targets(self) -> Sequence[str]:
        """Stable names of the targets (the outbox records which ones took an alert)."""
        ...

    def wants(self, target: str, event: Event) -> bool:
        """False when the target filters this event out (severity, kind)."""
        ...

    async def attempt(self, target: str, event: Event) -> Outcome:
        """One bounded delivery attempt; never raises. ``rejected``: retrying cannot help."""
        ...

    def gave_up(self, target: str) -> None:
        """The outbox stopped retrying a (non-critical) alert for this target: count it."""
        ...


class NopNotifier:
    """Used when no target is configured, so callers never check for None."""

    targets: tuple[str, ...] = ()

    def wants(self, target: str, event: Event) -> bool:
        return False

    async def attempt(self, target: str, event: Event) -> Outcome:
        return "sent"

    def gave_up(self, target: str) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

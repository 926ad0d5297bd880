"""The notifier interface (flagger's one-method shape) and its do-nothing default."""

from __future__ import annotations

from typing import Protocol

from proxy.canary.events import Event


class Notifier(Protocol):
    def notify(self, event: Event) -> None:
        """Hand over an event. Never blocks and never raises: delivery happens in the background."""
        ...


class NopNotifier:
    """Used when no target is configured, so callers never check for None."""

    def notify(self, event: Event) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

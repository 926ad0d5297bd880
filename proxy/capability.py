"""What a capability (shadow, canary, deprecation) hands the composition root.

Each capability exposes ``build(deps) -> Capability``; ``app.py`` collects them. This keeps the
capabilities from reaching into each other: they share only the control store and these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio as aioredis

from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.control.snapshot import SectionParser
from proxy.metrics import Metrics
from proxy.settings import Settings
from proxy.traffic.hooks import Deprecations, Mirror, Recorder

if TYPE_CHECKING:
    from proxy.control.store import ControlStore


class Component(Protocol):
    """A background service opened and closed by the lifespan (in reverse order)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass
class Deps:
    """What capabilities may be built from. ``store`` is set before any component starts."""

    settings: Settings
    metrics: Metrics
    redis: aioredis.Redis
    keys: Keys
    control: ControlClient
    store: ControlStore | None = None


@dataclass
class Capability:
    name: str
    sections: dict[str, SectionParser] = field(default_factory=dict)
    mirror: Mirror | None = None
    recorders: list[Recorder] = field(default_factory=list)
    deprecations: Deprecations | None = None
    components: list[Component] = field(default_factory=list)
    # admin routes are built late, from the AdminContext, so they can read the store
    admin_routes: Callable[[Any], list[Any]] | None = None
    # extra services the admin API and status may use, by name (e.g. "shadow_report")
    services: dict[str, Any] = field(default_factory=dict)

"""Endpoint names for the diff report: a bounded, closed-enough set derived from method and path.

A route group's pattern names the endpoint when one matches; otherwise id-like segments (numbers,
UUIDs, long hex) become ``{id}``. The number of distinct names is capped so a crawler walking
``/users/<random words>`` cannot grow the report (and Redis) without bound: overflow is ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.traffic.routing import RouteTable

OTHER = "other"
MAX_NAME = 200

_ID = re.compile(
    r"\A(?:\d+"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{16,})\Z"
)


def templated(path: str) -> str:
    """``/users/42/orders/9f1c...`` -> ``/users/{id}/orders/{id}``."""
    return "/".join("{id}" if segment and _ID.match(segment) else segment for segment in path.split("/"))


class EndpointNamer:
    """Names requests by endpoint; remembers at most ``max_endpoints`` names (then ``other``).

    Used only by the shadow workers (one event loop), so plain sets and dicts need no lock.
    """

    def __init__(self, routes: RouteTable, max_endpoints: int) -> None:
        self._routes = routes
        self._max = max_endpoints
        self._known: set[str] = set()

    def base(self, method: str, path: str) -> str:
        pattern = self._routes.pattern_for(path)
        name = f"{method} {pattern if pattern is not None else templated(path)}"
        return name[:MAX_NAME]

    def name(self, method: str, path: str) -> str:
        name = self.base(method, path)
        if name in self._known:
            return name
        if len(self._known) >= self._max:
            return OTHER
        self._known.add(name)
        return name

    def learn(self, names: Iterable[str]) -> None:
        """Adopt names other replicas already reported, so all replicas fill the same slots."""
        for name in names:
            if len(self._known) >= self._max:
                return
            if name != OTHER:
                self._known.add(name)

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self._known)

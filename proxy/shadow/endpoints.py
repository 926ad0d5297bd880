"""Endpoint names for the diff report: a bounded set won by traffic volume, not by who came first.

A name is, in this order: a configured endpoint pattern (``shadow.endpoint_patterns``, e.g.
``/search/{term}``), a route group pattern, or the path with id-like segments templated (numbers,
UUIDs, hex, short hashes, dates, slugs). Which names get a slot of their own is decided by a
space-saving sketch of ``max_endpoints`` counters: a name seen often keeps its slot whatever a
crawler sends, and a one-off name never displaces it. Everything else is reported as ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from proxy.traffic.routing import RouteTable

OTHER = "other"
MAX_NAME = 200
# names written to the report per reset, at most this many times max_endpoints: even a client that
# repeats every junk path enough to win a slot cannot grow Redis without bound
WRITTEN_FACTOR = 4

_TEMPLATES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("{id}", re.compile(r"\A\d+\Z")),
    ("{id}", re.compile(r"\A[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")),
    # dates: 2024-01-31, 2024-01-31T10:00:00Z, 20240131T1000 ...
    (
        "{date}",
        re.compile(
            r"\A\d{4}-?\d{2}-?\d{2}(?:[T_ ]?\d{2}(?::?\d{2}){0,2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?\Z"
        ),
    ),
    # hex of 16+ digits, or a short hash: 7+ hex digits with at least one digit and one letter
    (
        "{id}",
        re.compile(r"\A(?:[0-9a-fA-F]{16,}|(?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{7,})\Z"),
    ),
    # slugs: three or more lower-case words joined by hyphens (how-to-cook-rice)
    ("{slug}", re.compile(r"\A[a-z0-9]+(?:-[a-z0-9]+){2,}\Z")),
)


def template_segment(segment: str) -> str:
    for name, pattern in _TEMPLATES:
        if pattern.match(segment):
            return name
    return segment


def templated(path: str) -> str:
    """``/users/42/orders/9f1c2ab`` -> ``/users/{id}/orders/{id}``."""
    return "/".join(template_segment(segment) if segment else segment for segment in path.split("/"))


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``/search/{term}`` (``{x}`` or ``*``: one segment; ``**``: the rest) -> anchored regex."""
    if not pattern.startswith("/"):
        raise ValueError(f"endpoint pattern {pattern!r} must start with /")
    parts = []
    for segment in pattern.split("/"):
        if segment == "**":
            parts.append(".*")
        elif segment == "*" or (segment.startswith("{") and segment.endswith("}")):
            parts.append("[^/]+")
        else:
            parts.append(re.escape(segment))
    return re.compile("\\A" + "/".join(parts) + "\\Z")


class EndpointNamer:
    """Names requests by endpoint; slots are held by the ``max_endpoints`` busiest names.

    Space-saving (Metwally et al.): each tracked name has a count and an error (the count it
    inherited from the name it evicted). A name is reported on its own while tracked and either
    exact (error 0: the sketch had a free slot) or seen at least twice since it entered; a name
    that entered by evicting another has to prove itself once, so one-off paths stay ``other``.
    Used only by the shadow workers (one event loop), so plain dicts need no lock.
    """

    def __init__(self, routes: RouteTable, max_endpoints: int, patterns: Iterable[str] = ()) -> None:
        self._routes = routes
        self._max = max_endpoints
        self._patterns = [(p, compile_pattern(p)) for p in patterns]
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._written: set[str] = set()

    def base(self, method: str, path: str) -> str:
        for pattern, regex in self._patterns:
            if regex.match(path):
                return f"{method} {pattern}"[:MAX_NAME]
        pattern_or_none = self._routes.pattern_for(path)
        name = f"{method} {pattern_or_none if pattern_or_none is not None else templated(path)}"
        return name[:MAX_NAME]

    def name(self, method: str, path: str) -> str:
        return self.admit(self.base(method, path))

    def admit(self, name: str) -> str:
        counts = self._counts
        if name in counts:
            counts[name] += 1
        elif len(counts) < self._max:
            counts[name] = 1
            self._errors[name] = 0
        else:
            # O(max_endpoints) to find the minimum: off the request path, and max_endpoints is small
            victim = min(counts, key=counts.__getitem__)
            floor = counts.pop(victim)
            self._errors.pop(victim, None)
            counts[name] = floor + 1
            self._errors[name] = floor
        error = self._errors[name]
        if error and counts[name] - error < 2:
            return OTHER
        if name not in self._written:
            if len(self._written) >= WRITTEN_FACTOR * self._max:
                return OTHER
            self._written.add(name)
        return name

    def reset(self) -> None:
        """The report was cleared: every slot is free again."""
        self._counts.clear()
        self._errors.clear()
        self._written.clear()

    @property
    def known(self) -> frozenset[str]:
        return frozenset(self._counts)

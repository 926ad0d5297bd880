"""Path -> route group. Patterns are compiled once from settings; first match in config order wins."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from proxy.settings import ConfigError, RouteGroup

DEFAULT_GROUP: Final = "default"


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` is one path segment, ``**`` is anything (a trailing ``/**`` also matches the base)."""
    if not pattern.startswith("/"):
        raise ConfigError(f"route pattern {pattern!r} must start with '/'")
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("/**", i) and i + 3 == len(pattern):
            parts.append("(?:/.*)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + r"\Z")


class RouteTable:
    """Maps a (normalised) path to a group name; ``default`` when nothing matches."""

    def __init__(self, groups: Iterable[RouteGroup]) -> None:
        self._rules = [
            (compile_pattern(pattern), group.name, pattern) for group in groups for pattern in group.patterns
        ]
        self.names = [DEFAULT_GROUP, *dict.fromkeys(name for _, name, _ in self._rules)]

    def group_for(self, path: str) -> str:
        for regex, name, _ in self._rules:
            if regex.match(path):
                return name
        return DEFAULT_GROUP

    def pattern_for(self, path: str) -> str | None:
        """The matching pattern itself (shadow reports group endpoints by it)."""
        for regex, _, pattern in self._rules:
            if regex.match(path):
                return pattern
        return None

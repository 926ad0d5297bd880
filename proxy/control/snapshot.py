"""The immutable control snapshot the request path reads, and the parsing that builds it.

Parsing is pure so it can be tested without Redis: raw strings in, a snapshot plus the list of
rejected values out. A rejected value never replaces the last good one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from proxy.settings import Percentage

# A section parser turns one Redis hash (field -> raw string) into a typed value. It receives the
# previous parsed value so it can keep the last good one for fields it rejects, and returns the
# new value plus human-readable problems (one per rejected field).
SectionParser = Callable[[Mapping[str, str], Any], tuple[Any, list[str]]]


@dataclass(frozen=True, slots=True)
class Invalid:
    """A control value that was rejected; ``key`` is a closed-set label (split, shadow, ...)."""

    key: str
    raw: str
    reason: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What every request decision reads. Replaced whole, never mutated, so reads need no lock."""

    global_percentage: float
    group_percentages: Mapping[str, float] = field(default_factory=dict)
    sections: Mapping[str, Any] = field(default_factory=dict)
    redis_ok: bool = False
    loaded_at: float | None = None  # time.monotonic() of the last successful refresh
    generation: int = 0  # successful refreshes so far: a reader can wait for one that began later
    # groups whose last split change was a rollback (``split_state``); "default" covers every
    # group that follows the global split
    rollbacks: frozenset[str] = frozenset()
    # per group, a counter bumped by every rollback, rollout start and 0%/100% write: a session pin
    # carries the one it was issued under and is honoured only under the same
    epochs: Mapping[str, int] = field(default_factory=dict)

    def percentage(self, group: str) -> float:
        """The group's own split if set, else the global one."""
        value = self.group_percentages.get(group)
        return self.global_percentage if value is None else value

    def rolled_back(self, group: str) -> bool:
        """A rollback is in force for the group: its split is 0 because of a rollback (not a
        plain 0% before a ramp). Ends when the split is next set above 0."""
        if not self.rollbacks:
            return False
        if group not in self.group_percentages:
            group = "default"
        return group in self.rollbacks and self.percentage(group) <= 0

    def epoch(self, group: str) -> int:
        if group not in self.group_percentages:
            group = "default"
        return self.epochs.get(group, 0)

    def section(self, name: str, default: Any = None) -> Any:
        return self.sections.get(name, default)


def as_text(value: Any) -> str | None:
    """A Redis reply as text (our clients do not set decode_responses); None stays None."""
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_PERCENTAGE: TypeAdapter[float] = TypeAdapter(Percentage)


def parse_percentage(raw: str | bytes | None) -> float | None:
    """A percentage from Redis: a finite number in [0, 100]; raises ValueError otherwise."""
    text = as_text(raw)
    if text is None:
        return None
    try:
        return _PERCENTAGE.validate_python(text)
    except ValidationError:
        raise ValueError(f"{text!r} is not a percentage in [0, 100]") from None


def build_split(
    raw_global: str | None,
    raw_groups: Mapping[str, str | None],
    previous: Snapshot,
    default_percentage: float,
) -> tuple[float, dict[str, float], list[Invalid]]:
    """Parse the split keys; a bad value keeps the previous good one for that key."""
    problems: list[Invalid] = []
    try:
        parsed = parse_percentage(raw_global)
        global_pct = default_percentage if parsed is None else parsed
    except ValueError:
        global_pct = previous.global_percentage
        problems.append(Invalid("split", str(raw_global), "not a number in [0, 100]"))
    groups: dict[str, float] = {}
    for group, raw in raw_groups.items():
        try:
            value = parse_percentage(raw)
        except ValueError:
            problems.append(Invalid("split", str(raw), f"group {group}: not a number in [0, 100]"))
            kept = previous.group_percentages.get(group)
            if kept is not None:
                groups[group] = kept
            continue
        if value is not None:
            groups[group] = value
    return global_pct, groups, problems


def parse_split_state(raw: Mapping[str, str]) -> tuple[frozenset[str], dict[str, int]]:
    """The ``split_state`` hash: ``rollback:<group>`` (present while a rollback is in force) and
    ``epoch:<group>`` (an integer). Malformed fields are skipped."""
    rollbacks: set[str] = set()
    epochs: dict[str, int] = {}
    for name, value in raw.items():
        kind, _, group = name.partition(":")
        if not group:
            continue
        if kind == "rollback":
            rollbacks.add(group)
        elif kind == "epoch":
            try:
                epochs[group] = int(value)
            except ValueError:
                continue
    return frozenset(rollbacks), epochs

"""Comparing two answers: pure functions, run in a worker thread, never on the event loop.

Status, Content-Type and body are compared. JSON bodies go through deepdiff (a structural diff
reported per field); anything else, or JSON we refuse to walk (unparseable, or nested deeper than
``MAX_DEPTH``, e.g. 100,000 levels of ``[``), is compared by its bytes. Field names are deepdiff
paths with list indexes folded to ``[*]`` so ``root['items'][0]['id']`` and ``[1]`` are one field
(bounded report, and noise learnt on one item applies to all).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from deepdiff import DeepDiff

from proxy.shadow.policy import EndpointRules

MAX_DEPTH = 100  # deepdiff recurses per level; far below Python's recursion limit
MAX_DIFFS = 1000  # a totally different body stops being walked after this many differences
MAX_REPORTED = 50  # differences kept per comparison for samples
VALUE_CHARS = 200

_INDEX = re.compile(r"\[\d+\]")
_KINDS = {
    "values_changed": "changed",
    "type_changes": "type",
    "dictionary_item_added": "added",
    "dictionary_item_removed": "removed",
    "iterable_item_added": "added",
    "iterable_item_removed": "removed",
    "attribute_added": "added",
    "attribute_removed": "removed",
}
# newer deepdiff reports a whole dict as changed when most keys differ; we always want fields
_EXTRA: dict[str, Any] = (
    {"threshold_to_diff_deeper": 0}
    if "threshold_to_diff_deeper" in inspect.signature(DeepDiff.__init__).parameters
    else {}
)


@dataclass(frozen=True, slots=True)
class Answer:
    """One side of a comparison."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Difference:
    field: str  # normalised deepdiff path, or "status", "content-type", "body"
    kind: str  # changed, type, added, removed
    v1: str
    v2: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "kind": self.kind, "v1": self.v1, "v2": self.v2}


@dataclass(slots=True)
class Outcome:
    """``result`` is match, mismatch or noise (every difference is in a noisy field)."""

    result: str
    differences: list[Difference] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # distinct fields
    suppressed: list[str] = field(default_factory=list)  # distinct noisy fields that differed


def normalise_path(path: str) -> str:
    return _INDEX.sub("[*]", path)


def media_type(content_type: str) -> str:
    """``Application/JSON; charset=UTF-8`` -> ``application/json; charset=utf-8`` (spaces dropped)."""
    return ";".join(part.strip() for part in content_type.lower().split(";") if part.strip())


def _short(value: Any) -> str:
    if type(value).__name__ == "NotPresent":
        return "<absent>"
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS] + "..."


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative (a recursive walk would itself overflow on the inputs it guards against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in item)
    return False


def load_json(body: bytes) -> tuple[bool, Any]:
    """(True, value) for JSON we are willing to walk; (False, None) to fall back to bytes."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:  # invalid, or nested past orjson's own limit
        return False, None
    if _depth_exceeds(value, MAX_DEPTH):
        return False, None
    return True, value


def _body_differences(a: Answer, b: Answer, rules: EndpointRules) -> list[Difference]:
    if "json" in a.content_type.lower() and "json" in b.content_type.lower():
        ok_a, left = load_json(a.body)
        ok_b, right = load_json(b.body)
        if ok_a and ok_b:
            try:
                return _json_differences(left, right, rules)
            except RecursionError:
                pass
    if a.body == b.body:
        return []
    return [Difference("body", "changed", f"{len(a.body)} bytes", f"{len(b.body)} bytes")]


def _json_differences(left: Any, right: Any, rules: EndpointRules) -> list[Difference]:
    diff = DeepDiff(
        left,
        right,
        ignore_order=rules.ignore_order,
        exclude_paths=list(rules.exclude_paths) or None,
        exclude_regex_paths=list(rules.exclude_regexes) or None,
        math_epsilon=rules.tolerance or None,
        max_diffs=MAX_DIFFS,
        view="tree",
        log_frequency_in_sec=0,
        **_EXTRA,
    )
    found: list[Difference] = []
    for report_type, levels in diff.tree.items():
        kind = _KINDS.get(report_type, report_type)
        for level in levels:
            path = level.path() or "root"
            found.append(Difference(normalise_path(path), kind, _short(level.t1), _short(level.t2)))
    return found


def differences(a: Answer, b: Answer, rules: EndpointRules) -> list[Difference]:
    """Every difference between two answers (v1 first), rules applied."""
    found: list[Difference] = []
    if a.status != b.status:
        found.append(Difference("status", "changed", str(a.status), str(b.status)))
    if media_type(a.content_type) != media_type(b.content_type):
        found.append(Difference("content-type", "changed", a.content_type, b.content_type))
    found.extend(_body_differences(a, b, rules))
    return found


def is_noisy(path: str, noisy: Iterable[str]) -> bool:
    """A field is noisy if it, or a parent of it, differed between two v1 answers."""
    for known in noisy:
        if path == known or (path.startswith(known) and path[len(known)] in "[."):
            return True
    return False


def classify(found: list[Difference], noisy: frozenset[str] | set[str]) -> Outcome:
    if not found:
        return Outcome("match")
    mismatched: dict[str, None] = {}
    suppressed: dict[str, None] = {}
    for diff in found:
        if noisy and is_noisy(diff.field, noisy):
            suppressed[diff.field] = None
        else:
            mismatched[diff.field] = None
    result = "mismatch" if mismatched else "noise"
    return Outcome(result, found[:MAX_REPORTED], list(mismatched), list(suppressed))


def compare(a: Answer, b: Answer, rules: EndpointRules, noisy: frozenset[str] | set[str]) -> Outcome:
    """v1 answer ``a`` against v2 answer ``b``."""
    return classify(differences(a, b, rules), noisy)


def noise_between(first: Answer, second: Answer, rules: EndpointRules) -> set[str]:
    """Fields that differ between two v1 answers to the same request: noise for that endpoint."""
    return {diff.field for diff in differences(first, second, rules)}

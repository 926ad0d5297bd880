"""Deprecated endpoints: warn with RFC 9745/8594 headers until the sunset, then answer 410 Gone.

Everything that costs anything happens when rules are loaded (from settings, or from the Redis
hash ``strangler:deprecations`` through the control snapshot): patterns are compiled, header bytes
and the 410 body are built, metric children are resolved. ``check`` on the request path is a loop
over compiled rules, one regex match and one float comparison with ``time.time()``.

Live overrides (hash ``strangler:deprecations``, field = rule name):
- a phase word ``auto`` | ``warn`` | ``gone`` | ``off`` changes a configured rule's phase;
- a JSON object changes fields of a configured rule, or defines a whole new rule.
A value that does not parse is rejected and the last good value for that field is kept.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import ValidationError

from proxy.control.snapshot import Snapshot
from proxy.metrics import Metrics
from proxy.settings import DeprecationRule, parse_instant
from proxy.traffic.hooks import DeprecationAction, Headers
from proxy.traffic.routing import compile_pattern

SECTION = "deprecations"
PHASES = ("auto", "warn", "gone", "off")
_INF = float("inf")


class InvalidOverride(ValueError):
    """A live override that cannot be applied; the message says why, in plain words."""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule ready for the request path: regex, method set, timestamps, prebuilt answers."""

    rule: DeprecationRule
    source: str  # "config", "redis" (defined live) or "config+redis" (configured, overridden live)
    regex: Any  # re.Pattern[str]
    methods: frozenset[str] | None  # None = every method
    deprecated_ts: float
    sunset_ts: float  # +inf when no sunset date
    warn: DeprecationAction
    gone: DeprecationAction
    warn_hits: Any  # prometheus Counter child, resolved once
    gone_hits: Any

    def effective_phase(self, now: float | None = None) -> str:
        """``warn``, ``gone`` or ``off`` right now (admin listing; the hot path inlines this)."""
        phase = self.rule.phase
        if phase != "auto":
            return phase
        return "gone" if (time.time() if now is None else now) >= self.sunset_ts else "warn"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The snapshot section: rules in match order, plus the accepted raw overrides (last good)."""

    rules: tuple[CompiledRule, ...]
    active: tuple[CompiledRule, ...]  # rules whose phase is not "off"
    accepted: Mapping[str, str] = field(default_factory=dict)  # hash field -> raw value in force


def headers_for(rule: DeprecationRule, deprecated_ts: float, sunset_ts: float) -> Headers:
    """``Deprecation: @<unix seconds>`` (RFC 9745), ``Sunset: <IMF-fixdate>`` (RFC 8594), ``Link``."""
    headers: Headers = [(b"deprecation", b"@%d" % int(deprecated_ts))]
    if sunset_ts != _INF:
        headers.append((b"sunset", formatdate(sunset_ts, usegmt=True).encode("ascii")))
    if rule.migration_guide:
        headers.append((b"link", b"<" + rule.migration_guide.encode() + b'>; rel="deprecation"'))
    return headers


def gone_body(rule: DeprecationRule) -> bytes:
    message = f"Use {rule.replacement} instead" if rule.replacement else "This endpoint has been removed"
    return orjson.dumps(
        {
            "error": "Endpoint deprecated",
            "message": message,
            "migration_guide": rule.migration_guide,
            "sunset_date": rule.sunset_at,
        }
    )


def parse_override(name: str, raw: str, configured: Mapping[str, DeprecationRule]) -> DeprecationRule:
    """One hash field -> the rule it yields; raises InvalidOverride with a clear reason."""
    text = raw.strip()
    base = configured.get(name)
    if text in PHASES:
        if base is None:
            raise InvalidOverride(
                f"rule {name!r} is not configured: define it with a JSON object, not just a phase"
            )
        return base.model_copy(update={"phase": text})
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InvalidOverride(f"rule {name!r}: expected one of {', '.join(PHASES)} or a JSON object") from exc
    if not isinstance(data, dict):
        raise InvalidOverride(f"rule {name!r}: expected one of {', '.join(PHASES)} or a JSON object")
    if data.setdefault("name", name) != name:
        raise InvalidOverride(f"rule {name!r}: the JSON names another rule ({data['name']!r})")
    merged = {**(base.model_dump() if base is not None else {}), **data}
    try:
        return DeprecationRule.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'rule'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidOverride(f"rule {name!r}: {problems}") from exc


class DeprecationRules:
    """Implements the ``Deprecations`` hook and the snapshot section parser for live overrides."""

    def __init__(self, rules: Iterable[DeprecationRule], metrics: Metrics) -> None:
        self._metrics = metrics
        self.configured: dict[str, DeprecationRule] = {rule.name: rule for rule in rules}
        self._compiled: dict[tuple[str, str], CompiledRule] = {}  # (source, rule json) -> compiled
        self.config_set = self._assemble({}, {})

    # --- hot path -----------------------------------------------------------------------------

    def check(self, method: str, path: str, snapshot: Snapshot) -> DeprecationAction | None:
        ruleset: RuleSet = snapshot.sections.get(SECTION) or self.config_set
        for rule in ruleset.active:
            if rule.methods is not None and method not in rule.methods:
                continue
            if rule.regex.match(path) is None:
                continue
            phase = rule.rule.phase
            if phase == "gone" or (phase == "auto" and time.time() >= rule.sunset_ts):
                rule.gone_hits.inc()
                return rule.gone
            rule.warn_hits.inc()
            return rule.warn
        return None

    # --- control section (beside the path, on every snapshot refresh) --------------------------

    def parse(self, raw: Mapping[str, str], previous: RuleSet | None) -> tuple[RuleSet, list[str]]:
        """Redis hash -> RuleSet. A rejected field keeps its last good value (or none)."""
        problems: list[str] = []
        kept_raw: dict[str, str] = {}
        overrides: dict[str, DeprecationRule] = {}
        last_good = previous.accepted if previous is not None else {}
        for name, value in sorted(raw.items()):
            try:
                overrides[name] = parse_override(name, value, self.configured)
                kept_raw[name] = value
            except InvalidOverride as exc:
                problems.append(str(exc))
                old = last_good.get(name)
                if old is not None:
                    overrides[name] = parse_override(name, old, self.configured)
                    kept_raw[name] = old
        if previous is not None and kept_raw == dict(previous.accepted):
            return previous, problems  # nothing changed: keep the same object
        return self._assemble(overrides, kept_raw), problems

    def _assemble(self, overrides: Mapping[str, DeprecationRule], accepted: Mapping[str, str]) -> RuleSet:
        rules: list[CompiledRule] = []
        for name, rule in self.configured.items():
            if name in overrides:
                rules.append(self._compile(overrides[name], "config+redis"))
            else:
                rules.append(self._compile(rule, "config"))
        for name in sorted(set(overrides) - set(self.configured)):
            rules.append(self._compile(overrides[name], "redis"))
        return RuleSet(
            rules=tuple(rules),
            active=tuple(r for r in rules if r.rule.phase != "off"),
            accepted=dict(accepted),
        )

    def _compile(self, rule: DeprecationRule, source: str) -> CompiledRule:
        cache_key = (source, rule.model_dump_json())
        cached = self._compiled.get(cache_key)
        if cached is not None:
            return cached
        deprecated_ts = parse_instant(rule.deprecated_at)
        sunset_ts = parse_instant(rule.sunset_at) if rule.sunset_at else _INF
        headers = headers_for(rule, deprecated_ts, sunset_ts)
        methods: frozenset[str] | None = None
        if "*" not in rule.methods:
            methods = frozenset(rule.methods) | ({"HEAD"} if "GET" in rule.methods else set())
        compiled = CompiledRule(
            rule=rule,
            source=source,
            regex=compile_pattern(rule.pattern),
            methods=methods,
            deprecated_ts=deprecated_ts,
            sunset_ts=sunset_ts,
            warn=DeprecationAction(rule.name, headers),
            gone=DeprecationAction(rule.name, headers, gone_body(rule)),
            warn_hits=self._metrics.deprecated_requests.labels(rule.name, "warn"),
            gone_hits=self._metrics.deprecated_requests.labels(rule.name, "gone"),
        )
        if len(self._compiled) > 1000:  # a churning Redis rule set must not grow this forever
            self._compiled.clear()
        self._compiled[cache_key] = compiled
        return compiled

    # --- reporting ----------------------------------------------------------------------------

    def describe(self, ruleset: RuleSet | None) -> list[dict[str, Any]]:
        """Rules as the admin API and CLI show them, with this process's hit counts."""
        counts = hit_counts(self._metrics)
        now = time.time()
        out = []
        for compiled in (ruleset or self.config_set).rules:
            rule = compiled.rule
            out.append(
                {
                    **rule.model_dump(),
                    "source": compiled.source,
                    "effective_phase": compiled.effective_phase(now),
                    "hits": counts.get(rule.name, {"warn": 0, "gone": 0}),
                }
            )
        return out


def hit_counts(metrics: Metrics) -> dict[str, dict[str, int]]:
    """strangler_deprecated_requests_total per rule and phase (summed over workers if several)."""
    if metrics.multiprocess:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        families: Iterable[Any] = registry.collect()
    else:
        families = metrics.deprecated_requests.collect()
    counts: dict[str, dict[str, int]] = {}
    for family in families:
        if family.name != "strangler_deprecated_requests":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            per_rule = counts.setdefault(sample.labels["rule"], {"warn": 0, "gone": 0})
            per_rule[sample.labels["phase"]] = per_rule.get(sample.labels["phase"], 0) + int(sample.value)
    return counts

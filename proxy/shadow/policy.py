"""Live shadow settings and ignore rules: Redis hashes parsed into immutable snapshot sections.

Two sections, each one Redis hash read by the control store:

* ``shadow`` (``strangler:shadow``): global fields (``enabled``, ``sample_percentage``, ``methods``,
  ``max_body_bytes``, ``compare_max_bytes``, ``calibration_percentage``) and per-group overrides
  named ``group:<name>:<field>`` (``enabled``, ``sample_percentage``, ``methods``, ``max_body_bytes``).
* ``shadow_rules`` (``strangler:shadow_rules``): ignore rules. The field is the canonical JSON
  ``[kind, endpoint, value]`` so adding the same rule twice is one rule and removing it is one HDEL.

Parsing happens once per refresh, never per request: the hot path reads a prebuilt
:class:`GroupPolicy` per group. A bad value is reported and the last good value for that field kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.control.snapshot import SectionParser, parse_percentage
from proxy.settings import HTTP_METHODS, Settings, ShadowSettings

SECTION = "shadow"
RULES_SECTION = "shadow_rules"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
METHOD_OVERRIDE_HEADERS = frozenset({b"x-http-method-override", b"x-method-override"})
ALL_ENDPOINTS = "*"

GLOBAL_FIELDS = (
    "enabled",
    "sample_percentage",
    "methods",
    "max_body_bytes",
    "compare_max_bytes",
    "calibration_percentage",
)
GROUP_FIELDS = ("enabled", "sample_percentage", "methods", "max_body_bytes")
RULE_KINDS = ("exclude_path", "exclude_regex", "ignore_order", "tolerance")

_TRUE = frozenset({"1", "true", "on", "yes"})
_FALSE = frozenset({"0", "false", "off", "no"})


# --- field values -------------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, on/off, 1/0)")


def parse_pct(text: str) -> float:
    value = parse_percentage(text)  # ValueError: "'x' is not a percentage in [0, 100]"
    assert value is not None
    return value


def parse_methods(text: str) -> frozenset[str]:
    methods = [part.strip().upper() for part in text.split(",") if part.strip()]
    if not methods:
        raise ValueError("methods must not be empty (use enabled=false to stop mirroring)")
    unknown = [m for m in methods if m not in HTTP_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(HTTP_METHODS)}")
    return frozenset(methods)


def parse_size(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a whole number of bytes") from exc
    if value < 0:
        raise ValueError(f"{text!r} must not be negative")
    return value


_PARSERS = {
    "enabled": parse_bool,
    "sample_percentage": parse_pct,
    "methods": parse_methods,
    "max_body_bytes": parse_size,
    "compare_max_bytes": parse_size,
    "calibration_percentage": parse_pct,
}


def parse_field(name: str, text: str, groups: Iterable[str]) -> Any:
    """One field of ``strangler:shadow``; raises ValueError naming what would be accepted."""
    if name.startswith("group:"):
        _, _, rest = name.partition(":")
        group, sep, key = rest.rpartition(":")
        if not sep or key not in GROUP_FIELDS:
            raise ValueError(f"per-group field must be group:<name>:<{'|'.join(GROUP_FIELDS)}>")
        if group not in set(groups):
            raise ValueError(f"unknown route group {group!r}")
        return _PARSERS[key](text)
    if name not in _PARSERS:
        raise ValueError(f"unknown field; known: {', '.join(GLOBAL_FIELDS)} and group:<name>:<field>")
    return _PARSERS[name](text)


def format_value(value: Any) -> str:
    """The canonical text stored in Redis for a parsed value (what our own tools write)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, frozenset | set | list | tuple):
        return ",".join(m for m in HTTP_METHODS if m in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def validate_fields(fields: Mapping[str, Any], groups: Iterable[str]) -> dict[str, str | None]:
    """Check fields before writing them (None deletes = back to the config default)."""
    names = list(groups)
    out: dict[str, str | None] = {}
    for name, raw in fields.items():
        if raw is None:
            out[name] = None
            continue
        text = format_value(raw) if not isinstance(raw, str) else raw
        out[name] = format_value(parse_field(name, text, names))
    return out


def override_method(headers: Iterable[tuple[bytes, bytes]], raw_target: bytes) -> str | None:
    """The method a request claims through ``X-HTTP-Method-Override``, ``X-Method-Override`` or a
    ``_method`` query parameter (upper-cased), or None. Servers that honour these treat a ``GET``
    carrying ``DELETE`` as a delete, so mirroring and calibration must too."""
    for name, value in headers:
        if name.lower() in METHOD_OVERRIDE_HEADERS and value.strip():
            return value.strip().decode("latin-1").upper()
    _, sep, query = raw_target.partition(b"?")
    if sep and b"_method=" in query:
        for part in query.split(b"&"):
            key, _, raw = part.partition(b"=")
            if key == b"_method" and raw:
                return raw.decode("latin-1").strip().upper()
    return None


def is_safe(method: str, headers: Iterable[tuple[bytes, bytes]], raw_target: bytes) -> bool:
    """Safe to send again (calibration): the method and any override are both GET, HEAD or OPTIONS."""
    if method not in SAFE_METHODS:
        return False
    claimed = override_method(headers, raw_target)
    return claimed is None or claimed in SAFE_METHODS


# --- the parsed settings section ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    """Effective shadow policy of one route group; also the ``plan`` object handed to the hot path.

    ``max_body`` is the request-body capture limit given to ``forward.py`` (at least 1 so a chunked
    body over a 0-byte limit is still noticed as too large); ``body_limit`` is the configured value.
    """

    group: str
    enabled: bool
    sample_percentage: float
    methods: frozenset[str]
    body_limit: int
    max_body: int
    max_compare: int
    calibration_percentage: float

    def summary(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "sample_percentage": self.sample_percentage,
            "methods": sorted(self.methods),
            "max_body_bytes": self.body_limit,
            "compare_max_bytes": self.max_compare,
            "calibration_percentage": self.calibration_percentage,
        }


@dataclass(frozen=True, slots=True)
class ShadowPolicy:
    """The ``shadow`` snapshot section: one prebuilt GroupPolicy per known group."""

    default: GroupPolicy
    groups: Mapping[str, GroupPolicy]
    accepted: Mapping[str, Any] = field(default_factory=dict)  # last good live value per field

    def for_group(self, group: str) -> GroupPolicy:
        return self.groups.get(group, self.default)


def resolve_policy(config: ShadowSettings, groups: Iterable[str], live: Mapping[str, Any]) -> ShadowPolicy:
    """Config defaults < config group overrides < live global < live group (the kill switch wins)."""

    def live_or(name: str, default: Any) -> Any:
        return live[name] if name in live else default

    enabled = live_or("enabled", config.enabled)
    sample = live_or("sample_percentage", config.sample_percentage)
    methods = live_or("methods", frozenset(m.upper() for m in config.methods))
    max_body = live_or("max_body_bytes", config.max_body_bytes)
    max_compare = live_or("compare_max_bytes", config.compare_max_bytes)
    calibration = live_or("calibration_percentage", config.calibration_percentage)

    def build(group: str) -> GroupPolicy:
        cfg = config.groups.get(group)
        g_enabled = cfg.enabled if cfg is not None and cfg.enabled is not None else True
        g_sample = cfg.sample_percentage if cfg is not None and cfg.sample_percentage is not None else sample
        g_methods = (
            frozenset(m.upper() for m in cfg.methods)
            if cfg is not None and cfg.methods is not None
            else methods
        )
        prefix = f"group:{group}:"
        g_enabled = live_or(prefix + "enabled", g_enabled)
        g_sample = live_or(prefix + "sample_percentage", g_sample)
        g_methods = live_or(prefix + "methods", g_methods)
        g_body = live_or(prefix + "max_body_bytes", max_body)
        return GroupPolicy(
            group=group,
            enabled=bool(enabled and g_enabled),
            sample_percentage=float(g_sample),
            methods=frozenset(g_methods),
            body_limit=int(g_body),
            max_body=max(1, int(g_body)),
            max_compare=int(max_compare),
            calibration_percentage=float(calibration),
        )

    names = list(dict.fromkeys(["default", *groups]))
    built = {name: build(name) for name in names}
    return ShadowPolicy(default=built["default"], groups=built, accepted=dict(live))


def make_policy_parser(settings: Settings) -> SectionParser:
    """The SectionParser for ``strangler:shadow`` (closes over the config defaults)."""
    groups = settings.group_names
    config = settings.shadow

    def parse(raw: Mapping[str, str], previous: Any) -> tuple[ShadowPolicy, list[str]]:
        problems: list[str] = []
        last_good: Mapping[str, Any] = previous.accepted if isinstance(previous, ShadowPolicy) else {}
        live: dict[str, Any] = {}
        for name, text in raw.items():
            try:
                live[name] = parse_field(name, text, groups)
            except ValueError as exc:
                problems.append(f"{name}={text!r}: {exc}")
                if name in last_good:
                    live[name] = last_good[name]
        return resolve_policy(config, groups, live), problems

    return parse


# --- ignore rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str  # exclude_path | exclude_regex | ignore_order | tolerance
    endpoint: str  # "*" or an endpoint name such as "GET /users/{id}"
    value: str  # a path, a regex, "" (ignore_order) or a number (tolerance)
    source: str = "redis"  # "config" or "redis"

    @property
    def key(self) -> str:
        return rule_key(self.kind, self.endpoint, self.value)

    def applies_to(self, endpoint: str) -> bool:
        return self.endpoint == ALL_ENDPOINTS or self.endpoint == endpoint


def rule_key(kind: str, endpoint: str, value: str) -> str:
    """The Redis hash field naming a rule: canonical JSON, so a rule is stored once."""
    return orjson.dumps([kind, endpoint, value]).decode()


def glob_to_regex(path: str) -> str:
    """``root['data'][*]['updated_at']`` -> an anchored regex where ``[*]`` is any one index or key."""
    return "^" + re.escape(path).replace(re.escape("[*]"), r"\[[^\]]+\]") + "$"


def make_rule(kind: str, endpoint: str | None, value: str | float | None, source: str = "redis") -> Rule:
    """Validate one rule; raises ValueError with the reason."""
    endpoint = (endpoint or ALL_ENDPOINTS).strip() or ALL_ENDPOINTS
    if kind not in RULE_KINDS:
        raise ValueError(f"unknown rule kind {kind!r}; known: {', '.join(RULE_KINDS)}")
    text = "" if value is None else str(value).strip()
    if kind == "exclude_path":
        if not text.startswith("root"):
            raise ValueError(f"path {text!r} must start with root, e.g. root['data'][*]['updated_at']")
    elif kind == "exclude_regex":
        if not text:
            raise ValueError("a regex is required")
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"regex {text!r} does not compile: {exc}") from exc
    elif kind == "ignore_order":
        text = ""
    elif kind == "tolerance":
        try:
            number = float(text)
        except ValueError as exc:
            raise ValueError(f"tolerance {text!r} is not a number") from exc
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"tolerance {text!r} must be a finite number >= 0")
        text = f"{number:g}"
    return Rule(kind, endpoint, text, source)


@dataclass(frozen=True, slots=True)
class EndpointRules:
    """What ``compare`` needs for one endpoint, regexes compiled once."""

    exclude_paths: tuple[str, ...] = ()
    exclude_regexes: tuple[re.Pattern[str], ...] = ()
    ignore_order: bool = False
    tolerance: float = 0.0


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The ``shadow_rules`` snapshot section: config rules plus live ones."""

    rules: tuple[Rule, ...] = ()
    accepted: Mapping[str, Rule] = field(default_factory=dict)
    _cache: dict[str, EndpointRules] = field(default_factory=dict, compare=False, repr=False)

    def for_endpoint(self, endpoint: str) -> EndpointRules:
        """Merged rules for one endpoint; cached (the set is replaced whole on every change)."""
        cached = self._cache.get(endpoint)
        if cached is not None:
            return cached
        paths: list[str] = []
        regexes: list[re.Pattern[str]] = []
        ignore_order = False
        tolerance = 0.0
        for rule in self.rules:
            if not rule.applies_to(endpoint):
                continue
            if rule.kind == "exclude_path":
                if "[*]" in rule.value:
                    regexes.append(re.compile(glob_to_regex(rule.value)))
                else:
                    paths.append(rule.value)
            elif rule.kind == "exclude_regex":
                regexes.append(re.compile(rule.value))
            elif rule.kind == "ignore_order":
                ignore_order = True
            elif rule.kind == "tolerance":
                tolerance = max(tolerance, float(rule.value))
        result = EndpointRules(tuple(paths), tuple(regexes), ignore_order, tolerance)
        if len(self._cache) < 10_000:
            self._cache[endpoint] = result
        return result


def config_rules(config: ShadowSettings) -> list[Rule]:
    rules = [make_rule("exclude_path", None, p, "config") for p in config.exclude_paths]
    rules += [make_rule("exclude_regex", None, r, "config") for r in config.exclude_regex_paths]
    if config.ignore_order:
        rules.append(make_rule("ignore_order", None, None, "config"))
    rules += [make_rule("ignore_order", e, None, "config") for e in config.ignore_order_endpoints]
    if config.numeric_tolerance > 0:
        rules.append(make_rule("tolerance", None, config.numeric_tolerance, "config"))
    return rules


def parse_rule_field(name: str) -> Rule:
    try:
        parts = orjson.loads(name)
    except orjson.JSONDecodeError as exc:
        raise ValueError('a rule field must be JSON ["kind", "endpoint", "value"]') from exc
    if not (isinstance(parts, list) and len(parts) == 3 and all(isinstance(p, str) for p in parts)):
        raise ValueError('a rule field must be JSON ["kind", "endpoint", "value"]')
    return make_rule(parts[0], parts[1], parts[2])


def make_rules_parser(settings: Settings) -> SectionParser:
    """The SectionParser for ``strangler:shadow_rules``; config rules always come first."""
    base = config_rules(settings.shadow)

    def parse(raw: Mapping[str, str], previous: Any) -> tuple[RuleSet, list[str]]:
        problems: list[str] = []
        last_good: Mapping[str, Rule] = previous.accepted if isinstance(previous, RuleSet) else {}
        accepted: dict[str, Rule] = {}
        for name in raw:
            try:
                accepted[name] = parse_rule_field(name)
            except ValueError as exc:
                problems.append(f"rule {name!r}: {exc}")
                if name in last_good:
                    accepted[name] = last_good[name]
        return RuleSet(tuple(base) + tuple(accepted.values()), accepted), problems

    return parse

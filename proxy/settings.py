"""The one typed settings object: defaults < YAML file < STRANGLER_* environment < CLI flags.

Policy (route patterns, step ladders, exclude regexes) is parsed and checked here, once, so a
mistake is one clear ``ConfigError`` at start-up instead of a surprise on the request path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from proxy.gatespec import check_template, parse_condition, parse_json_path, render

HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
KeySource = Literal["header", "cookie", "query", "jwt"]
DEFAULT_KEY_SOURCES: tuple[KeySource, ...] = ("header", "cookie", "query")


class ConfigError(Exception):
    """A configuration problem, raised once at start-up, in one line: where the value came from
    (``source``: the YAML file and line, the environment variable or the flag), the setting
    (``field``, a dotted path such as ``canary.thresholds.max_error_rate`` or ``routes[0].name``)
    and what is wrong. With several problems, the first is told and ``more`` counts the others."""

    def __init__(self, problem: str, source: str | None = None, field: str | None = None, more: int = 0):
        self.problem, self.source, self.field, self.more = problem, source, field, more
        parts = [part for part in (source, field) if part]
        tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(": ".join([*parts, problem]) + tail)


EXTENSION_PREFIX = "x-"


def _drop_extensions(data: Any) -> Any:
    """Keys starting with ``x-`` belong to the user (notes, YAML anchors to reuse, keys for a newer
    version): ignored at every level, like OpenAPI's ``x-`` extensions and Compose's ``x-`` fields.
    Every other unknown key is an error, however deep."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith(EXTENSION_PREFIX))}
    return data


class StrictModel(BaseModel):
    """A section of the settings: unknown keys are refused (a typo must not leave a default in
    force silently), except ``x-`` extensions."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _extensions(cls, data: Any) -> Any:
        return _drop_extensions(data)


SectionT = TypeVar("SectionT", bound=BaseModel)

Percentage = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
"""A v2 share: a finite number in [0, 100] (config, Redis values and the admin API alike)."""

_HTTP_URL: TypeAdapter[HttpUrl] = TypeAdapter(HttpUrl)


def http_url(value: str, problem: str) -> HttpUrl:
    """``value`` parsed as an http(s) URL with a host (pydantic's URL rules: valid host, port in
    range); ``problem`` is the whole error message, so the caller's wording reaches the user."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(problem)
    try:
        return _HTTP_URL.validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"{problem} ({exc.errors()[0]['msg']})") from None


def check_steps(steps: Sequence[float]) -> list[float]:
    """The rollout step ladder rule, the one place it is written (settings and live rollouts):
    finite, strictly increasing, above 0, ending at 100. Raises ValueError saying which."""
    ladder = list(steps)
    if not ladder:
        raise ValueError("rollout steps must not be empty")
    if not all(math.isfinite(step) for step in ladder):
        raise ValueError(f"rollout steps must be finite numbers: {ladder}")
    if any(b <= a for a, b in zip(ladder, ladder[1:], strict=False)):
        raise ValueError(f"rollout steps must increase strictly: {ladder}")
    if ladder[0] <= 0 or ladder[-1] != 100:
        raise ValueError(f"rollout steps must be above 0 and end at 100: {ladder}")
    return ladder


StepLadder = Annotated[list[float], AfterValidator(check_steps)]

APPROVAL_MARK = "!"


def parse_ladder(items: Sequence[object]) -> tuple[list[float], list[float]]:
    """A ladder as written (settings, ``--steps``, the admin API) -> (steps, approval steps).

    Each item is a number, or text: a number optionally followed by one ``!`` (``"25!"``: the
    rollout holds at 25% until approved). The steps then follow ``check_steps``; 100 cannot be an
    approval step (reaching it completes the rollout). Raises ValueError, one line naming the item."""
    steps: list[float] = []
    approvals: list[float] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float | str):
            raise ValueError(f"rollout step {item!r} must be a number, or a number followed by '!'")
        marked = False
        if isinstance(item, str):
            text = item.strip()
            marked = text.endswith(APPROVAL_MARK)
            number = text[: -len(APPROVAL_MARK)].strip() if marked else text
            try:
                if not number or APPROVAL_MARK in number or len(number) > 32:
                    raise ValueError
                value = float(number)
            except ValueError:
                shown = item if len(item) <= 40 else item[:40] + "..."
                raise ValueError(
                    f"rollout step {shown!r} must be a number, or a number followed by one '!' "
                    "(an approval step, e.g. 25!)"
                ) from None
        else:
            value = float(item)
        steps.append(value)
        if marked:
            approvals.append(value)
    check_steps(steps)
    return steps, check_approval_steps(steps, approvals)


def check_approval_steps(steps: Sequence[float], approvals: Sequence[float]) -> list[float]:
    """Approval steps must be on the ladder and below 100. Raises ValueError saying which."""
    for value in approvals:
        if value not in steps:
            raise ValueError(f"approval step {value:g} is not on the ladder {[f'{s:g}' for s in steps]}")
        if value >= 100:
            raise ValueError(
                "100 cannot be an approval step: reaching it completes the rollout; "
                "mark the step before it (e.g. 95!)"
            )
    return sorted(set(approvals))


def format_ladder(steps: Sequence[float], approvals: Sequence[float]) -> str:
    """``1,5,25!,50,100``: the ladder as it is written."""
    return ",".join(f"{s:g}{APPROVAL_MARK if s in approvals else ''}" for s in steps)


class RouteGroup(StrictModel):
    """A named set of path patterns that share one split (and shadow/canary policy)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    patterns: list[str] = Field(min_length=1)

    @field_validator("patterns")
    @classmethod
    def _patterns_are_paths(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.startswith("/"):
                raise ValueError(f"route pattern {pattern!r} must start with '/'")
        return value


class ShadowGroupPolicy(StrictModel):
    """Per-group overrides of the shadow defaults (None keeps the global value)."""

    enabled: bool | None = None
    sample_percentage: float | None = Field(default=None, ge=0, le=100)
    methods: list[str] | None = None


class ShadowSettings(StrictModel):
    """Config defaults for mirroring; Redis values (strangler:shadow) override them live."""

    enabled: bool = False
    sample_percentage: float = Field(default=100.0, ge=0, le=100)
    methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "OPTIONS"])
    max_body_bytes: int = Field(default=1024 * 1024, ge=0)
    compare_max_bytes: int = Field(default=1024 * 1024, ge=0)
    queue_size: int = Field(default=1000, ge=1)
    concurrency: int = Field(default=32, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0)
    calibration_percentage: float = Field(default=1.0, ge=0, le=100)
    exclude_paths: list[str] = Field(default_factory=list)
    exclude_regex_paths: list[str] = Field(default_factory=list)
    ignore_order: bool = False
    ignore_order_endpoints: list[str] = Field(default_factory=list)
    numeric_tolerance: float = Field(default=0.0, ge=0)
    max_endpoints: int = Field(default=200, ge=1)
    max_samples: int = Field(default=20, ge=0)
    sample_body_bytes: int = Field(default=2048, ge=0)
    compare_workers: int = Field(default=1, ge=1)
    # share of the event loop the mirror's own work may use (workers start mirrored requests no
    # closer than their measured average cost / share), and of a core each compare thread may use
    # (it rests elapsed * (1/share - 1) after each compare)
    compare_cpu_share: float = Field(default=0.1, gt=0, le=1)
    # the first N (at least noise_threshold) mirrored safe requests per endpoint are calibrated
    # whatever the percentage; the endpoint's comparisons are pending (not judged) until then
    calibration_warmup: int = Field(default=3, ge=0)
    flush_interval_seconds: float = Field(default=0.5, gt=0)
    groups: dict[str, ShadowGroupPolicy] = Field(default_factory=dict)
    # a field is noise once it varied between two v1 answers in this many calibrations
    noise_threshold: int = Field(default=2, ge=1)
    # request and answer bodies held by the mirror (queued + in flight); past it: dropped, counted
    max_buffered_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # answer headers compared (Location only on 3xx and 201), reported as header:<name>
    compare_headers: list[str] = Field(
        default_factory=lambda: ["location", "content-encoding", "cache-control"]
    )
    # endpoint names tried before route patterns and templating: "/search/{term}", "/files/**"
    endpoint_patterns: list[str] = Field(default_factory=list)
    # unary gRPC answers: messages decoded by field name with this FileDescriptorSet (protoc
    # --descriptor_set_out --include_imports), else with v1's server reflection when
    # grpc_reflection, else compared by field number (wire format); docs/shadow.md
    grpc_descriptor_set: Path | None = None
    grpc_reflection: bool = False

    @field_validator("compare_headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower() for name in value]
        for name in names:
            if not name or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9a-z-]+", name):
                raise ValueError(f"{name!r} is not a header name")
        return names

    @field_validator("grpc_descriptor_set")
    @classmethod
    def _descriptor_file(cls, value: Path | None) -> Path | None:
        # read (and parsed) when the shadow is built; checked here so serve refuses before starting
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)[:200]} is not a file (make one with protoc --descriptor_set_out)")
        return value

    @field_validator("endpoint_patterns")
    @classmethod
    def _endpoint_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern.startswith("/"):
                raise ValueError(f"endpoint pattern {pattern!r} must start with '/'")
        return value

    @field_validator("exclude_paths")
    @classmethod
    def _paths_from_root(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("root"):
                raise ValueError(f"exclude path {path!r} must start with root, e.g. root['data'][*]['id']")
        return value

    @field_validator("exclude_regex_paths")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"exclude regex {pattern!r} does not compile: {exc}") from exc
        return value


class CanaryThresholds(StrictModel):
    """Limits that fail a check; absolute and relative to v1 in the same window."""

    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_p95_seconds: float = Field(default=0.5, gt=0)
    max_error_rate_ratio: float = Field(default=2.0, gt=0)
    max_p95_ratio: float = Field(default=1.5, gt=0)
    error_rate_floor: float = Field(default=0.01, ge=0, le=1)
    p95_floor_seconds: float = Field(default=0.05, ge=0)
    min_requests: int = Field(default=100, ge=1)
    max_shadow_mismatch_rate: float | None = Field(default=None, ge=0, le=1)
    # the statistical judge (docs/canary.md, "The statistical judge"): opt-in per group
    judge: Literal["thresholds", "statistical"] = "thresholds"
    alpha: float = Field(default=0.1, gt=0, lt=1)  # false-rollback bound over a whole judged period
    min_error_ratio: float = Field(default=2.0, gt=1, le=100)  # smallest error-rate rise worth catching
    min_latency_shift: float = Field(default=0.2, gt=0, le=10)  # smallest slowdown worth catching (0.2: +20%)
    power: float = Field(default=0.8, gt=0, lt=1)  # chance of catching those before a check may PASS


# The canary's event kinds (``proxy/canary/events.KINDS``; a test keeps the two equal), which a
# notifier's ``events`` may choose from.
ALERT_KINDS = (
    "started", "step_advanced", "awaiting_approval", "approved", "paused", "resumed", "completed",
    "aborted", "rolled_back", "recovered", "insufficient_data", "overridden", "state_lost",
    "gate_dry_run_failed",
)  # fmt: skip


class NotifierTarget(StrictModel):
    """One alert destination. ``kind`` picks the payload format."""

    kind: Literal["slack", "pagerduty", "webhook"]
    url: str | None = None  # pagerduty defaults to the Events API v2 enqueue endpoint
    routing_key: SecretStr | None = None  # pagerduty integration key
    min_severity: Literal["info", "warning", "critical"] = "info"
    events: list[str] | None = None  # only these event kinds (None: all, above min_severity)

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [kind for kind in value if kind not in ALERT_KINDS]
        if unknown or not value:
            shown = ", ".join(repr(k)[:40] for k in unknown[:3]) or "an empty list"
            raise ValueError(f"notifier events: {shown} not among {', '.join(ALERT_KINDS)}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> NotifierTarget:
        if self.kind == "pagerduty":
            if self.routing_key is None:
                raise ValueError("a pagerduty notifier needs routing_key")
            if self.url is None:
                self.url = "https://events.pagerduty.com/v2/enqueue"
        elif not self.url:
            raise ValueError(f"a {self.kind} notifier needs url")
        http_url(self.url, f"notifier url {self.url!r} must be an http:// or https:// URL")
        return self


GateName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _condition(value: str) -> str:
    parse_condition(value)
    return value


def _json_path(value: str) -> str:
    parse_json_path(value)
    return value


def _gate_url(value: str, what: str) -> str:
    """An http(s) URL once its placeholders are filled (checked with sample values)."""
    check_template(value, what)
    sample = render(value, {"group": "g", "version": "v2", "window": "60s"})
    http_url(sample, f"{what} must be an http:// or https:// URL")
    return value


class GateBase(StrictModel):
    """What every metric gate has: see docs/canary.md, "Metric gates"."""

    name: GateName
    condition: Annotated[str, AfterValidator(_condition)]
    failure_limit: int = Field(default=1, ge=1, le=1000)  # failed evaluations in a row before acting
    dry_run: bool = False  # evaluated, shown and alerted; never holds, advances or rolls back
    timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    interval_seconds: float | None = Field(default=None, gt=0)  # None: at every check
    headers: dict[str, SecretStr] = Field(default_factory=dict, max_length=20)

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name):
                raise ValueError(f"gate header name {name!r} must be letters, digits and '-'")
            if any(c in secret.get_secret_value() for c in "\r\n\0"):
                raise ValueError(f"gate header {name} has a line break in its value")
        return value


class PrometheusGate(GateBase):
    """A PromQL query (instant, ``/api/v1/query``) and a condition on its value(s)."""

    kind: Literal["prometheus"]
    address: str
    query: str = Field(min_length=1, max_length=4000)

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if "{{" in value:
            raise ValueError("prometheus address takes no placeholders")
        return _gate_url(value, f"prometheus address {value.split('@')[-1]!r}")

    @field_validator("query")
    @classmethod
    def _query(cls, value: str) -> str:
        return check_template(value, "prometheus query")


class HttpGate(GateBase):
    """A URL answering JSON, a JSONPath into it and a condition on the number found."""

    kind: Literal["http"]
    url: str
    json_path: Annotated[str, AfterValidator(_json_path)]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _gate_url(value, "http gate url")


Gate = Annotated[PrometheusGate | HttpGate, Field(discriminator="kind")]
GATE_KINDS = ("prometheus", "http")


class ConfirmHook(StrictModel):
    """A URL that must answer 2xx before the leader takes a step (Flagger's confirm-promotion).
    Anything else (another status, a timeout, no answer) holds the step; asked again next check."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # shown in status and logs (the URL is not)
    url: str
    groups: list[str] = Field(default_factory=list)  # empty: every group
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        http_url(value, f"confirm hook url {value!r} must be an http:// or https:// URL")
        return value


class CanarySettings(StrictModel):
    """Health checks, automatic rollback and the rollout ladder."""

    enabled: bool = True
    window_seconds: float = Field(default=60.0, gt=0)
    check_interval_seconds: float = Field(default=10.0, gt=0)
    flush_interval_seconds: float = Field(default=1.0, gt=0)
    consecutive_failures: int = Field(default=3, ge=1)
    count_4xx_as_errors: bool = False
    leader_lock_ttl_seconds: float = Field(default=15.0, gt=0)
    insufficient_data_alert_seconds: float = Field(default=600.0, gt=0)
    steps: StepLadder = Field(default_factory=lambda: [1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 100.0])
    # steps written ``N!`` in ``steps`` (filled from the marks; may also be listed here)
    approval_steps: list[float] = Field(default_factory=list)
    step_interval_seconds: float = Field(default=300.0, gt=0)
    thresholds: CanaryThresholds = Field(default_factory=CanaryThresholds)
    group_thresholds: dict[str, CanaryThresholds] = Field(default_factory=dict)
    parity_tables: list[str] = Field(default_factory=list)
    notifiers: list[NotifierTarget] = Field(default_factory=list)
    confirm_hooks: list[ConfirmHook] = Field(default_factory=list)
    # Slack interactivity: the app's signing secret turns on POST {admin_prefix}/slack/interactions
    # (the approve button of an awaiting_approval alert); unset, that endpoint answers 404
    slack_signing_secret: SecretStr | None = None
    slack_approvers: list[str] = Field(default_factory=list)  # Slack user ids; empty: any user
    notify_queue_size: int = Field(default=1000, ge=1)
    notify_retries: int = Field(default=3, ge=0)
    notify_backoff_seconds: float = Field(default=1.0, gt=0)
    notify_timeout_seconds: float = Field(default=5.0, gt=0)
    # checks kept per group for `strangler canary backtest` (2000 x 10 s = 5.5 h; 0 = none kept)
    history_checks: int = Field(default=2000, ge=0, le=1_000_000)
    # Alertmanager webhook: the label naming the route group to roll back, and the body size cap
    alert_group_label: str = Field(default="strangler_group", min_length=1, max_length=200)
    alert_max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # route group (or "*": every group) -> metric gates checked beside the built-in checks
    gates: dict[str, list[Gate]] = Field(default_factory=dict)

    @field_validator("gates")
    @classmethod
    def _unique_gate_names(cls, value: dict[str, list[Gate]]) -> dict[str, list[Gate]]:
        for group, gates in value.items():
            names = [gate.name for gate in gates] + [gate.name for gate in value.get("*", []) if group != "*"]
            if len(names) != len(set(names)):
                raise ValueError(f"gate names must be unique per group (with '*'): {group}: {names}")
        return value

    def gates_for(self, group: str) -> list[PrometheusGate | HttpGate]:
        """The group's own gates, then those for every group (``"*"``)."""
        return [*self.gates.get(group, []), *self.gates.get("*", [])]

    @model_validator(mode="before")
    @classmethod
    def _approval_marks(cls, data: Any) -> Any:
        """``steps: [1, 5, "25!", 100]``: the marks become ``approval_steps``, the steps numbers."""
        if isinstance(data, dict) and isinstance(data.get("steps"), list | tuple):
            steps, approvals = parse_ladder(data["steps"])
            listed = data.get("approval_steps") or []
            if not isinstance(listed, list | tuple):
                raise ValueError("approval_steps must be a list of steps")
            data = {**data, "steps": steps, "approval_steps": [*approvals, *listed]}
        return data

    @model_validator(mode="after")
    def _approvals_on_ladder(self) -> CanarySettings:
        self.approval_steps = check_approval_steps(self.steps, self.approval_steps)
        return self


class DeprecationRule(StrictModel):
    """An endpoint on its way out: warned with headers until the sunset, then 410 Gone.

    Dates are ISO 8601 (``2026-06-01`` means midnight UTC; a datetime without offset is UTC).
    ``phase``: ``auto`` (warn, then gone from ``sunset_at`` on), ``warn``/``gone`` (forced), ``off``
    (rule disabled, useful as a live override). Redis (``strangler:deprecations``) may override it.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    methods: list[str] = Field(default_factory=lambda: ["*"])
    pattern: str
    deprecated_at: str  # ISO 8601 date or datetime; sent as ``Deprecation: @<unix seconds>``
    sunset_at: str | None = None  # ``Sunset`` header; from this instant on the endpoint is gone
    migration_guide: str | None = None  # ``Link: <...>; rel="deprecation"``
    replacement: str | None = None  # named in the 410 body ("Use <replacement> instead")
    phase: Literal["auto", "warn", "gone", "off"] = "auto"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        upper = [method.upper() for method in value]
        unknown = [m for m in upper if m != "*" and m not in HTTP_METHODS]
        if not upper or unknown:
            raise ValueError(f"methods must be '*' or among {', '.join(HTTP_METHODS)}; got {value}")
        return upper

    @field_validator("pattern")
    @classmethod
    def _pattern_is_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"deprecation pattern {value!r} must start with '/'")
        return value

    @field_validator("deprecated_at", "sunset_at")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        if value is not None:
            parse_instant(value)
        return value

    @field_validator("migration_guide")
    @classmethod
    def _guide_is_uri(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in '<>" \r\n')):
            raise ValueError(f"migration_guide {value!r} must be a URI (no spaces, quotes or <>)")
        return value


def parse_instant(text: str) -> float:
    """ISO 8601 date or datetime -> unix seconds; a bare date is midnight UTC, no offset means UTC."""
    from datetime import UTC, datetime

    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 date or datetime (e.g. 2026-06-01)") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class LimitSettings(StrictModel):
    """Request limits, in line with nginx/Envoy defaults; see docs/security.md "Security and limits".

    Enforced in the HTTP parser (proxy/edge/server.py) before a request reaches the proxy logic;
    a refusal is answered with ``Connection: close`` and counted in
    ``strangler_rejected_requests_total{reason}``.
    """

    # 413 (body_too_large); 0 = unlimited: bodies are streamed, never buffered whole
    max_body_bytes: int = Field(default=0, ge=0)
    # 414 (request_line_too_long); nginx large_client_header_buffers: 8k
    max_request_line_bytes: int = Field(default=8192, ge=256)
    # 431 (headers_too_large), names + values; Envoy max_request_headers_kb: 60
    max_header_bytes: int = Field(default=65536, ge=1024)
    # 431 (too_many_headers); Envoy max_headers_count: 100
    max_headers: int = Field(default=100, ge=1)
    # 502 (kind protocol), nothing relayed, upstream connection closed: a backend's answer head
    # (status line and headers) larger than this. nginx: proxy_buffer_size (4-8k) then 502
    max_response_head_bytes: int = Field(default=65536, ge=1024)
    # 408 then close (header_timeout): from connection (or first byte of a request) to the end of
    # its headers; stops slowloris. nginx client_header_timeout is 60 s, Envoy suggests 10 s
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    # 408 then close (body_timeout): longest silence between two reads of a request body while we
    # are reading; a stalled upload would otherwise hold an upstream connection forever.
    # nginx client_body_timeout: 60 s
    body_timeout_seconds: float = Field(default=60.0, gt=0)
    # idle keep-alive connections are closed after this
    keepalive_timeout_seconds: float = Field(default=5.0, gt=0)
    # request bodies up to this size are read whole before an upstream connection is taken, so a
    # slow uploader holds no backend connection; larger ones are streamed
    body_buffer_bytes: int = Field(default=65536, ge=0)
    # 408 (body_too_slow) then close: a streamed body must average at least this rate once it has
    # run for body_rate_grace_seconds (0 = no minimum)
    min_body_rate_bytes_per_second: int = Field(default=1024, ge=0)
    body_rate_grace_seconds: float = Field(default=10.0, gt=0)
    # client connections held at once; over it, idle connections are closed first, then new ones
    # refused. Also capped below the process's open-file limit (raised to the hard limit at start)
    max_connections: int = Field(default=4096, ge=1)
    # requests a client may send ahead of their answers on one connection (pipelining); over it,
    # those already received are answered, then the connection closes (too_many_pipelined)
    max_pipelined_requests: int = Field(default=64, ge=1)
    # a client that leaves an answer unread this long (our write buffer toward it stays full) is
    # cut (client_send_timeout), releasing the backend connection behind it; nginx send_timeout: 60 s
    send_timeout_seconds: float = Field(default=60.0, gt=0)
    # on a graceful stop, a connection idle at the signal may send one more request within this
    # (answered with Connection: close) before it is closed
    drain_idle_grace_seconds: float = Field(default=1.0, ge=0)
    # a bug in the edge raises instead of costing one connection with one log line: an impossible
    # state change of a client or upstream connection, a request finished twice (the tests' proxies)
    strict_states: bool = False


class MatchRule(StrictModel):
    """A request carrying this header, cookie or query value goes to ``version`` (testers, beta
    users), whatever the percentage; checked before the sticky split, after the force header."""

    group: str = "*"  # a route group name, "default", or "*" for every group
    header: str | None = None
    cookie: str | None = None
    query: str | None = None
    value: str = "*"  # exact match (query values percent-decoded); "*": present with any value
    version: Literal["v1", "v2"]
    # a rollback (``strangler rollback``, the admin API's, the automatic one) sends everyone to v1,
    # testers a v2 rule matches included; true: this rule still applies during a rollback
    survives_rollback: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> MatchRule:
        given = [name for name in (self.header, self.cookie, self.query) if name]
        if len(given) != 1:
            raise ValueError("a match rule names exactly one of header, cookie or query")
        return self


MIN_PIN_SECRET = 16
WEAK_SECRETS = frozenset({"strangler", "changeme", "change-me", "secret", "default"})


class PinningSettings(StrictModel):
    """Session pinning ("new sessions only"): a client keeps the version it was first given while
    the split moves between 0 and 100, so a ramp moves only new sessions. Pins are honoured only
    while 0 < percentage < 100 and only when issued since the group's last rollback, rollout start
    or completion (its epoch); each is bound to its user key (or a random session id) and its issue
    time, signed with ``secret``."""

    groups: list[str] = Field(default_factory=list)  # route groups pinned ("default", "*" = all)
    cookie_prefix: str = Field(default="strangler_pin", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    max_age_seconds: int = Field(default=86400, ge=1)
    # the key pins are signed with; None: generated at first start and kept in ``secret_file``
    secret: SecretStr | None = None
    secret_file: Path = Path(".strangler/pin-secret")

    @field_validator("secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            text = value.get_secret_value()
            if len(text) < MIN_PIN_SECRET or text.lower() in WEAK_SECRETS:
                raise ValueError(
                    f"session_pinning.secret must be at least {MIN_PIN_SECRET} characters and not a shipped "
                    "default (leave it unset: one is generated at first start)"
                )
        return value


class WebSocketSettings(StrictModel):
    """WebSocket relay: the version is chosen at upgrade time and kept for the connection."""

    # false: upgrade requests are refused with 400 (websocket_disabled)
    enabled: bool = True
    # a message (all its fragments) over this is refused with close code 1009 by the proxy
    max_message_bytes: int = Field(default=1024 * 1024, ge=1)
    # a connection with no message either way for this long is closed with 1001 (0 = never)
    idle_timeout_seconds: float = Field(default=300.0, ge=0)
    # the upstream must answer the upgrade within this (else 504 to the client)
    handshake_timeout_seconds: float = Field(default=10.0, gt=0)
    # how long a closing handshake may take before the connection is dropped
    close_timeout_seconds: float = Field(default=5.0, gt=0)
    # when a group's split drops, v2 connections it moves to v1 are closed with 1012 after this;
    # on a graceful stop every WebSocket gets 1001 after this, bounded by drain_timeout_seconds
    # minus close_timeout_seconds so the closing handshake fits in the drain
    drain_grace_seconds: float = Field(default=30.0, ge=0)
    # the same on rollback (split at 0): at once by default
    rollback_grace_seconds: float = Field(default=0.0, ge=0)


# the gRPC status codes by number (grpc/doc/statuscodes.md); names are what settings and metrics use
GRPC_STATUS_CODES: tuple[str, ...] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip
DEFAULT_GRPC_ERRORS: tuple[str, ...] = (
    "UNAVAILABLE",
    "INTERNAL",
    "UNKNOWN",
    "DEADLINE_EXCEEDED",
    "DATA_LOSS",
)


class GrpcSettings(StrictModel):
    """gRPC calls (content-type application/grpc*) through the split: what counts as a version's error."""

    # grpc-status codes (names or numbers) counted as an error of the version that answered, for the
    # canary and http_errors (recorded as a 5xx: see docs/operations.md "gRPC"); others are successes
    error_codes: list[str] = Field(default_factory=lambda: list(DEFAULT_GRPC_ERRORS))
    # distinct grpc_method label values per process; further methods are counted as "other"
    max_method_labels: int = Field(default=200, ge=1)

    @field_validator("error_codes", mode="before")
    @classmethod
    def _known_codes(cls, value: Any) -> list[str]:
        """Each a code name (any case) or number 1..16, stored as the name; OK cannot be an error."""
        if not isinstance(value, list):
            raise ValueError("grpc error codes must be a list of gRPC status names or numbers")
        names: list[str] = []
        for code in value:
            if isinstance(code, int) and not isinstance(code, bool) and 0 <= code < len(GRPC_STATUS_CODES):
                name = GRPC_STATUS_CODES[code]
            elif isinstance(code, str) and code.strip().upper() in GRPC_STATUS_CODES:
                name = code.strip().upper()
            elif isinstance(code, str) and code.strip().isdigit() and int(code) < len(GRPC_STATUS_CODES):
                name = GRPC_STATUS_CODES[int(code)]
            else:
                raise ValueError(f"grpc error code {code!r} is not a gRPC status name or number (1-16)")
            if name == "OK":
                raise ValueError("grpc error codes cannot include OK (0)")
            if name not in names:
                names.append(name)
        return names


class Http2Settings(StrictModel):
    """HTTP/2 on the listener (proxy/edge/h2server.py): h2c by prior knowledge on the main port,
    ``h2`` offered by ALPN when TLS is configured, optionally a port of its own. Every limit below
    is refused cheaply and counted in ``strangler_rejected_requests_total{reason="h2_..."}``
    (docs/security.md "HTTP/2")."""

    # false: the listener speaks HTTP/1.1 only (the preface is refused as malformed, no ALPN h2)
    enabled: bool = True
    # an extra plain listener that speaks only h2c (prior knowledge); None: none
    port: int | None = Field(default=None, ge=0, le=65535)
    # streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); more: REFUSED_STREAM
    max_concurrent_streams: int = Field(default=100, ge=1, le=2**31 - 1)
    # per stream, what we advertise (SETTINGS_INITIAL_WINDOW_SIZE): request bytes buffered per stream
    initial_window_size: int = Field(default=65535 * 16, ge=65535, le=2**31 - 1)
    # largest frame we accept (SETTINGS_MAX_FRAME_SIZE)
    max_frame_size: int = Field(default=16384, ge=16384, le=2**24 - 1)
    # HPACK dynamic table we keep for the client's headers (SETTINGS_HEADER_TABLE_SIZE)
    header_table_size: int = Field(default=4096, ge=0, le=2**31 - 1)
    # decoded header list (RFC 9113 6.5.2 size: names + values + 32 each); over it: 431 / h2_headers_too_large
    max_header_list_size: int = Field(default=16384, ge=1024)
    # RST_STREAMs a client may send (or provoke) per second (CVE-2023-44487 rapid reset); over it:
    # GOAWAY ENHANCE_YOUR_CALM (h2_rapid_reset)
    max_resets_per_second: int = Field(default=100, ge=1)
    # SETTINGS, PING, PRIORITY, empty DATA and unneeded WINDOW_UPDATE frames per second; over it:
    # GOAWAY ENHANCE_YOUR_CALM (h2_control_flood)
    max_control_frames_per_second: int = Field(default=200, ge=1)
    # CONTINUATION frames after one HEADERS (CVE-2024-27316 class); over it: GOAWAY (h2_continuation_flood)
    max_continuation_frames: int = Field(default=16, ge=1)
    # a connection with no stream open for this long is closed with GOAWAY (NO_ERROR)
    idle_timeout_seconds: float = Field(default=60.0, gt=0)
    # a stream whose answer waits this long on a flow-control window the client keeps shut is
    # reset (h2_stall), freeing the upstream connection behind it
    stall_timeout_seconds: float = Field(default=30.0, gt=0)


class Settings(BaseSettings):
    """Everything the proxy needs, validated once. Runtime objects receive it; nothing else reads env."""

    model_config = SettingsConfigDict(
        env_prefix="STRANGLER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    # where to listen and forward
    v1_url: str = "http://127.0.0.1:8001"
    v2_url: str = "http://127.0.0.1:8002"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    preserve_host: bool = True
    # request headers whose name has "_" are dropped (nginx underscores_in_headers off): WSGI/CGI
    # backends read X_Forwarded_Proto as X-Forwarded-Proto. True passes them, except look-alikes of
    # framing, hop-by-hop, proxy-set and decision headers (never forwarded)
    allow_underscore_headers: bool = False
    drain_timeout_seconds: float = Field(default=10.0, gt=0)

    # control state
    redis_url: str | None = None
    embedded_redis_dir: Path = Path(".strangler/redis")
    embedded_redis_port: int = Field(default=6390, ge=0, le=65535)
    # the parent's control socket (`strangler reload`, status): a Unix socket, mode 0600
    control_socket: Path = Path(".strangler/control.sock")
    split_key: str = "feature:v2_traffic_percentage"
    key_prefix: str = "strangler:"
    default_percentage: Percentage = 0.0
    redis_down_policy: Literal["keep_last", "all_v1"] = "keep_last"
    poll_interval_seconds: float = Field(default=0.5, gt=0, le=1.0)
    redis_timeout_seconds: float = Field(default=0.5, gt=0)

    # split
    routes: list[RouteGroup] = Field(default_factory=list)
    user_key_header: str = "X-User-ID"
    user_key_cookie: str | None = "user_id"
    user_key_fallback: Literal["random", "client_ip", "affinity_cookie"] = "random"
    affinity_cookie_name: str = "strangler_uid"
    # lifetime of the affinity cookie (Max-Age), so a browser restart keeps the version; 0: a
    # session cookie. It is Secure when the client connection is TLS
    affinity_cookie_max_age_seconds: int = Field(default=365 * 86400, ge=0)
    # query parameter read for the sticky key after the header and cookie (browsers cannot set
    # headers on a WebSocket); None: not read
    user_key_query: str | None = None
    # where the sticky key comes from, in this order: header, cookie, query, jwt (then the fallback)
    user_key_sources: list[KeySource] = Field(default_factory=lambda: list(DEFAULT_KEY_SOURCES))
    # the claim of the bearer token (read without verifying: it only picks a bucket)
    user_key_jwt_claim: str = "sub"
    match_rules: list[MatchRule] = Field(default_factory=list)
    session_pinning: PinningSettings = Field(default_factory=PinningSettings)
    hash_salt: str = "strangler"
    # false (default): one bucket per user for every group, so a user on v2 in one group at 30% is
    # on v2 in every group at 30% or more; true: each group hashes (salt, group, key) on its own
    split_hash_per_group: bool = False
    force_header: str = "X-Strangler-Version"
    force_header_enabled: bool = True

    # upstream
    # requests without a body taken synchronously on a warm pooled connection (no task); the same
    # lifecycle either way: off only to rule the fast path out while diagnosing
    fast_path: bool = True
    fallback_to_v1: bool = True
    connect_timeout_seconds: float = Field(default=2.0, gt=0)
    read_timeout_seconds: float = Field(default=30.0, gt=0)
    upstream_pool_size: int = Field(default=256, ge=1)
    # 503 (pool_timeout) when no connection to the backend is free for this long
    pool_timeout_seconds: float = Field(default=3.0, gt=0)
    # CA bundle that https backends are verified against (default: the system store)
    upstream_ca_file: Path | None = None
    # client certificate (and key) presented to https backends that ask for one
    upstream_client_cert_file: Path | None = None
    upstream_client_key_file: Path | None = None
    # how each backend is spoken to: http1 (default), or h2 (HTTP/2: prior knowledge on an http://
    # URL, ALPN "h2" on an https:// one; gRPC backends need it)
    v1_protocol: Literal["http1", "h2"] = "http1"
    v2_protocol: Literal["http1", "h2"] = "http1"
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)

    # TLS termination on the listener (both set: https; reloaded on SIGHUP without a restart)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # admin
    admin_prefix: str = "/_strangler"
    admin_token: SecretStr | None = None
    admin_reads_require_token: bool = False
    admin_port: int | None = Field(default=None, ge=0, le=65535)  # own port; then not on the main one
    # with no admin_token, one is generated at first start and kept here (mode 0600) for the local CLI
    admin_token_file: Path = Path(".strangler/admin-token")

    # capabilities
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)
    deprecations: list[DeprecationRule] = Field(default_factory=list)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    websocket: WebSocketSettings = Field(default_factory=WebSocketSettings)
    http2: Http2Settings = Field(default_factory=Http2Settings)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("v1_url", "v2_url")
    @classmethod
    def _upstream_is_http(cls, value: str) -> str:
        """A base URL only: the request's own path and query are appended to it."""
        problem = f"upstream URL {value!r} must look like http://host:port[/base]"
        if not re.match(r"^https?://[^?#\s]+$", value):
            raise ValueError(problem)
        http_url(value, problem)  # and a valid host, a port in range
        return value.rstrip("/")

    @field_validator("redis_url")
    @classmethod
    def _redis_url_shape(cls, value: str | None) -> str | None:
        """Sentinel and Cluster URLs are checked here so a typo is a config error, not a crash."""
        if value:
            from proxy.redis_url import check  # a leaf module: imports nothing of ours

            check(value)
        return value

    @field_validator("admin_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if not re.match(r"^/[A-Za-z0-9_.-]+$", value):
            raise ValueError(f"admin_prefix {value!r} must be one path segment like /_strangler")
        return value

    @model_validator(mode="before")
    @classmethod
    def _extensions(cls, data: Any) -> Any:
        return _drop_extensions(data)

    @field_validator("deprecations")
    @classmethod
    def _unique_rules(cls, value: list[DeprecationRule]) -> list[DeprecationRule]:
        names = [rule.name for rule in value]
        if len(names) != len(set(names)):
            raise ValueError(f"deprecation rule names must be unique: {names}")
        return value

    @field_validator("routes")
    @classmethod
    def _unique_groups(cls, value: list[RouteGroup]) -> list[RouteGroup]:
        names = [group.name for group in value]
        if len(names) != len(set(names)):
            raise ValueError(f"route group names must be unique: {names}")
        if "default" in names:
            raise ValueError("'default' is reserved for requests no group matches")
        return value

    @model_validator(mode="after")
    def _admin_port(self) -> Settings:
        if self.admin_port is not None and self.workers > 1:
            raise ValueError("admin_port needs workers: 1 (with several workers, use the main port)")
        return self

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.upstream_client_key_file is not None and self.upstream_client_cert_file is None:
            raise ValueError("upstream_client_key_file needs upstream_client_cert_file")
        return self

    @model_validator(mode="after")
    def _rule_groups_exist(self) -> Settings:
        known = {"*", "default", *(group.name for group in self.routes)}
        named = [rule.group for rule in self.match_rules] + list(self.session_pinning.groups)
        unknown = sorted(set(named) - known)
        if unknown:
            raise ValueError(f"match rules or session pinning name unknown route groups: {unknown}")
        unknown_gated = sorted(set(self.canary.gates) - known)
        if unknown_gated:
            raise ValueError(f"canary.gates names unknown route groups: {unknown_gated}")
        if len(set(self.user_key_sources)) != len(self.user_key_sources):
            raise ValueError(f"user_key_sources lists a source twice: {self.user_key_sources}")
        pinning = self.session_pinning
        if (
            pinning.groups
            and pinning.secret is not None
            and pinning.secret.get_secret_value() == self.hash_salt
        ):
            raise ValueError("session_pinning.secret must not be the hash_salt (the salt is not a secret)")
        return self

    @property
    def group_names(self) -> list[str]:
        return ["default", *(group.name for group in self.routes)]

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        from_file = _FILE_DATA.get()
        if from_file is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=from_file))
        return tuple(sources)


# the YAML file's mapping while load_settings builds a Settings (read and checked by load_settings)
_FILE_DATA: ContextVar[dict[str, Any] | None] = ContextVar("strangler_config_file_data", default=None)


def read_admin_token(path: Path = Path(".strangler/admin-token")) -> str | None:
    """The token in an ``admin_token_file`` (``strangler serve`` writes it), or None. Here, beside the
    setting, because the server and the local CLI both read it and neither may import the other."""
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


@contextmanager
def _file_source(data: dict[str, Any] | None) -> Iterator[None]:
    token = _FILE_DATA.set(data)
    try:
        yield
    finally:
        _FILE_DATA.reset(token)


def load_settings(
    config_file: str | Path | None = None,
    override_sources: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings from all sources; ``overrides`` are CLI flags (None means "not given"), and
    ``override_sources`` names where each came from (``{"v1_url": "--v1"}``) for the error line.

    Any problem raises one ``ConfigError`` naming the source (the file with line and column, the
    environment variable, the flag), the field and what is wrong; never a traceback."""
    path = Path(config_file) if config_file else None
    from_file, tree = _read_yaml(path) if path is not None else (None, None)
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        with _file_source(from_file):
            return Settings(**given)
    except SettingsError as exc:  # a complex value in the environment is not JSON
        name = re.search(r'field "([^"]+)"', str(exc))
        field = name.group(1) if name else None
        env = _env_name((field,)) if field else None
        raise ConfigError(
            "not valid JSON (lists and sections are given as JSON in the environment)", env, field
        ) from None
    except ValidationError as exc:
        # the first problem told: an unknown key before the rest (a misspelt key often explains a
        # missing one), then in the file's order
        located = [
            (_source_of(_untag(tuple(e["loc"])), given, override_sources or {}, path, from_file, tree), e)
            for e in exc.errors(include_url=False)
        ]
        located.sort(key=lambda pair: (pair[1]["type"] != "extra_forbidden", _line(pair[0], path)))
        source, first = located[0]
        loc = tuple(first["loc"])
        raise ConfigError(_problem(first), source, _dotted(_untag(loc)) or None, len(located) - 1) from None


def load_section_file(path: str | Path, model: type[SectionT], section: tuple[str, ...] = ()) -> SectionT:
    """A YAML file holding one part of the settings, validated by that part's model (the candidate
    checks of ``strangler canary backtest --gates FILE``: ``section`` ``("canary",)``). Problems
    are one ``ConfigError`` as for the settings file: file:line:column, the key, what is wrong."""
    path = Path(path)
    data, tree = _read_yaml(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        loc = tuple(first["loc"])
        where = _position(path, tree, loc) if tree is not None else str(path)
        problem = _problem({**first, "loc": (*section, *loc)})  # typo hints from the settings' keys
        raise ConfigError(problem, where, _dotted(loc) or None, len(errors) - 1) from None


# --- turning a problem into one line ----------------------------------------------------------------


def _read_yaml(path: Path) -> tuple[dict[str, Any], Any]:
    """The file's top-level mapping and its YAML node tree (for line numbers), or ConfigError."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file does not exist", str(path)) from None
    except IsADirectoryError:
        raise ConfigError("config file is a directory, not a file", str(path)) from None
    except OSError as exc:
        raise ConfigError(f"config file not readable: {exc.strerror or exc}", str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file is not UTF-8 text ({exc.reason} at byte {exc.start})", str(path)
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        tree = loader.get_single_node()
        data = loader.construct_document(tree) if tree is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = ""
        if exc.context and exc.problem:
            begun = exc.context_mark
            at = ""
            if begun is not None and (mark is None or (begun.line, begun.column) != (mark.line, mark.column)):
                at = f" started at line {begun.line + 1}, column {begun.column + 1}"
            context = f" ({exc.context}{at})"
        raise ConfigError(f"not valid YAML: {exc.problem or exc.context}{context}", where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {' '.join(str(exc).split())}", str(path)) from None
    finally:
        loader.dispose()
    if data is None:  # an empty file (or only comments): the defaults
        return {}, None
    _refuse_duplicate_keys(path, tree, ())
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of settings (key: value), not {_kind(data)}", str(path)
        )
    return data, tree


def _refuse_duplicate_keys(path: Path, node: Any, loc: tuple[Any, ...]) -> None:
    """A key given twice in one mapping: YAML keeps the last silently (a second ``shadow:`` section
    would drop the first); here it is an error at the second one."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[str, Any] = {}
        for key, value in node.value:
            name = str(key.value)
            if name in seen and name != "<<":
                first = seen[name].start_mark.line + 1
                where = f"{path}:{key.start_mark.line + 1}:{key.start_mark.column + 1}"
                raise ConfigError(
                    f"duplicate key (first given at line {first})", where, _dotted((*loc, name))
                )
            seen[name] = key
            _refuse_duplicate_keys(path, value, (*loc, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(path, item, (*loc, index))


def _kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _depth(data: Any, loc: tuple[Any, ...]) -> int:
    """How many leading parts of ``loc`` lead somewhere in ``data`` (nested dicts and lists)."""
    depth = 0
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            break
        depth += 1
    return depth


def _env_name(loc: tuple[Any, ...]) -> str | None:
    """The ``STRANGLER_*`` variable that set the value at ``loc`` (nested with ``__``), if one did."""
    import os

    present = {name.upper(): name for name in os.environ}
    for k in range(len(loc), 0, -1):
        name = "STRANGLER_" + "__".join(str(part) for part in loc[:k]).upper()
        if name in present:
            return present[name]
    return None


def _source_of(
    loc: tuple[Any, ...],
    given: dict[str, Any],
    names: Mapping[str, str],
    path: Path | None,
    from_file: dict[str, Any] | None,
    tree: Any,
) -> str | None:
    """Where the value at ``loc`` came from: the source holding the deepest part of its path, the
    higher-priority one on a tie (flags, then the environment, then the file). None: no source
    known (a Python caller's arguments, or a rule across fields without a file to name)."""
    env = _env_name(loc)
    flag_depth, file_depth = _depth(given, loc), _depth(from_file, loc)
    env_depth = len(env.removeprefix("STRANGLER_").split("__")) if env else 0
    deepest = max(flag_depth, env_depth, file_depth)
    if deepest and flag_depth == deepest:
        return names.get(str(loc[0]))
    if deepest and env_depth == deepest:
        return env
    return _position(path, tree, loc) if path is not None else None


def _line(source: str | None, path: Path | None) -> int:
    """The line number in a ``file:line:column`` source of ``path`` (0 for other sources)."""
    if source is None or path is None or not source.startswith(f"{path}:"):
        return 0
    return int(source[len(str(path)) + 1 :].split(":")[0])


def _position(path: Path, tree: Any, loc: tuple[Any, ...]) -> str:
    """``file:line:column`` of the deepest key (or list item) of ``loc`` present in the YAML tree."""
    import yaml

    mark = None
    node = tree
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((pair for pair in node.value if str(pair[0].value) == str(part)), None)
            if found is None:
                break
            mark, node = found[0].start_mark, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _dotted(loc: tuple[Any, ...]) -> str:
    """``('routes', 0, 'name')`` -> ``routes[0].name``; a dict key that is not a name in quotes."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.fullmatch(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def _problem(error: Any) -> str:
    """What is wrong, in the words of our validators (or pydantic's), with a hint for a typo."""
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        import difflib

        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else " (a key of your own: start it with x-)"
        return f"unknown key{hint}"
    if kind == "missing":
        return "required, not given"
    message = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind != "value_error" and isinstance(value, str | int | float) and not _is_secret(loc):
        shown = repr(value)  # a huge value is cut: the line must stay readable
        message += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
    return message


def _untag(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """pydantic puts the member of a discriminated union in an error's location
    (``canary.gates.default[0].http.url``): drop it, so the path is the one the user wrote."""
    if loc[:2] == ("canary", "gates") and len(loc) > 4 and isinstance(loc[3], int) and loc[4] in GATE_KINDS:
        return loc[:4] + loc[5:]
    return loc


def _tag_member(annotation: Any, part: Any) -> Any:
    """The member of a discriminated union (``Gate``) that a tag in an error location names."""
    import types
    from typing import Annotated, Union, get_args, get_origin

    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    for member in get_args(annotation):
        kind = getattr(member, "model_fields", {}).get("kind")
        if kind is not None and part in get_args(kind.annotation):
            return member
    return None


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The settings model whose fields are the keys at ``loc`` (``shadow.groups.beta``:
    ShadowGroupPolicy), or None when ``loc`` leads to something else."""
    from typing import get_args, get_origin

    def unwrap(annotation: Any) -> Any:  # X | None -> X
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 and get_origin(annotation) not in (list, dict) else annotation

    annotation: Any = Settings
    for part in loc:
        annotation = unwrap(annotation)
        member = _tag_member(annotation, part)
        if member is not None:
            annotation = member
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            # cast: where pydantic is not installed (mypyc's build stage) BaseModel is Any and
            # issubclass narrows to bare ``type``
            field = cast("type[BaseModel]", annotation).model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            return None
    annotation = unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model is not None else []


def _is_secret(loc: tuple[Any, ...]) -> bool:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model is not None and loc else None
    return field is None or "SecretStr" in str(field.annotation)

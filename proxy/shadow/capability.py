"""Wires shadow traffic into the proxy: its snapshot sections, the mirror and its workers, the
report, and the live-settings control its admin routes (``proxy/admin/shadow.py``) use."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.control.client import ControlClient
from proxy.control.snapshot import SectionParser
from proxy.control.store import ControlStore
from proxy.metrics import Metrics
from proxy.settings import ConfigError, Settings
from proxy.shadow.control import ShadowControl
from proxy.shadow.mirror import ShadowMirror
from proxy.shadow.policy import RULES_SECTION, SECTION, make_policy_parser, make_rules_parser
from proxy.shadow.report import ReportStore
from proxy.traffic.routing import RouteTable


def sections(settings: Settings) -> dict[str, SectionParser]:
    """The snapshot sections shadow reads (``strangler:shadow``, ``strangler:shadow_rules``);
    built before the control store, which parses them."""
    try:
        return {SECTION: make_policy_parser(settings), RULES_SECTION: make_rules_parser(settings)}
    except ValueError as exc:
        raise ConfigError(f"invalid shadow configuration: {exc}") from exc


@dataclass
class Shadow:
    """The shadow parts: ``mirror`` is the request-path hook and a lifespan component; ``report``
    is also what the canary's mismatch gate reads (``report.group_totals``)."""

    report: ReportStore
    control: ShadowControl
    mirror: ShadowMirror


def build(settings: Settings, metrics: Metrics, control: ControlClient, store: ControlStore) -> Shadow:
    """``control`` brings the Redis client and key names; ``store`` the snapshot the workers read."""
    shadow = settings.shadow
    report = ReportStore(control.redis, control.keys, shadow.max_samples, shadow.noise_threshold)
    mirror = ShadowMirror(settings, metrics, store, RouteTable(settings.routes), report)
    return Shadow(report, ShadowControl(control, settings), mirror)

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
from proxy.shadow.protobuf import DECODED, PROBLEMS, Decoding, WireOnly
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
    grpc: Decoding  # how mirrored unary gRPC answers are decoded (proxy/shadow/protobuf.py)


def grpc_decoding(settings: Settings, metrics: Metrics) -> Decoding:
    """The gRPC decoders from the shadow settings; a descriptor set that cannot be read (or
    protobuf/grpcio not installed) is a ConfigError at start-up, not a surprise per answer."""
    shadow = settings.shadow
    children = {name: metrics.shadow_grpc_decoding.labels(name) for name in (*DECODED, *PROBLEMS)}

    def count(outcome: str) -> None:
        children[outcome].inc()

    if shadow.grpc_descriptor_set is None and not shadow.grpc_reflection:
        return WireOnly(count)
    try:
        from proxy.shadow.descriptors import build_decoding
    except ImportError as exc:
        raise ConfigError(
            f"shadow.grpc_descriptor_set and shadow.grpc_reflection need the protobuf package "
            f"(and grpcio, grpcio-reflection for reflection; pip install 'strangler[grpc]'): {exc}"
        ) from exc
    try:
        return build_decoding(
            shadow.grpc_descriptor_set,
            shadow.grpc_reflection,
            [settings.v1_url, settings.v2_url],
            settings.upstream_ca_file,
            shadow.timeout_seconds,
            count,
        )
    except (ValueError, OSError) as exc:
        raise ConfigError(f"shadow.grpc_descriptor_set: {exc}") from exc


def build(settings: Settings, metrics: Metrics, control: ControlClient, store: ControlStore) -> Shadow:
    """``control`` brings the Redis client and key names; ``store`` the snapshot the workers read."""
    shadow = settings.shadow
    report = ReportStore(control.redis, control.keys, shadow.max_samples, shadow.noise_threshold)
    decoding = grpc_decoding(settings, metrics)
    mirror = ShadowMirror(settings, metrics, store, RouteTable(settings.routes), report, decoding)
    return Shadow(report, ShadowControl(control, settings), mirror, decoding)

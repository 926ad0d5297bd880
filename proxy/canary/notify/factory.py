"""Builds the notifier from settings: nothing configured gives the no-op, an unknown kind is an error."""

from __future__ import annotations

from proxy.canary.notify.base import NopNotifier
from proxy.canary.notify.dispatch import Dispatcher, make_target
from proxy.metrics import Metrics
from proxy.settings import CanarySettings, ConfigError

KNOWN = frozenset({"slack", "pagerduty", "webhook"})


def build_notifier(settings: CanarySettings, metrics: Metrics) -> Dispatcher | NopNotifier:
    if not settings.notifiers:
        return NopNotifier()
    unknown = [spec.kind for spec in settings.notifiers if spec.kind not in KNOWN]
    if unknown:
        raise ConfigError(f"unknown notifier kind(s) {unknown}; use one of {sorted(KNOWN)}")
    return Dispatcher([make_target(spec) for spec in settings.notifiers], settings, metrics)

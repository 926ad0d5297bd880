"""Builds the notifier from settings: nothing configured gives the no-op.

An unknown kind never gets here: ``NotifierTarget.kind`` is a closed set that settings loading
checks (a ``ConfigError`` naming the accepted kinds).
"""

from __future__ import annotations

from proxy.canary.notify.base import NopNotifier
from proxy.canary.notify.dispatch import Dispatcher, make_target
from proxy.metrics import Metrics
from proxy.settings import CanarySettings


def build_notifier(settings: CanarySettings, metrics: Metrics) -> Dispatcher | NopNotifier:
    if not settings.notifiers:
        return NopNotifier()
    return Dispatcher([make_target(spec) for spec in settings.notifiers], settings, metrics)

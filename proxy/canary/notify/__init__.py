"""Alerts: one tiny ``Notifier`` interface, a do-nothing default, a factory from settings."""

from proxy.canary.notify.base import NopNotifier, Notifier
from proxy.canary.notify.factory import build_notifier

__all__ = ["Notifier", "NopNotifier", "build_notifier"]

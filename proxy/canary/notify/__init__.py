"""Alerts: a tiny ``Notifier`` interface, a do-nothing default, a factory from settings, and the
courier that delivers the durable outbox."""

from proxy.canary.notify.base import NopNotifier, Notifier
from proxy.canary.notify.factory import build_notifier

__all__ = ["Notifier", "NopNotifier", "build_notifier"]

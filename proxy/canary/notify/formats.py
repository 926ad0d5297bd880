"""Payloads in each target's documented format. Pure: an event in, a JSON body (or None) out.

- Slack incoming webhook: ``{"text": ..., "attachments": [{"color", "title", "fields": [...]}]}``
  (https://api.slack.com/messaging/webhooks; Mattermost and Rocket.Chat accept the same shape).
- PagerDuty Events API v2: ``{"routing_key", "event_action": "trigger"|"resolve", "dedup_key",
  "payload": {"summary", "source", "severity", ...}}`` (https://developer.pagerduty.com/docs/events-api-v2/).
  Only rollbacks trigger and recoveries resolve; other events are not incidents and are skipped.
- Generic webhook: the event itself, flat and stable (documented in docs/canary.md).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from proxy.canary.events import Event

COLORS = {"info": "#2eb886", "warning": "#daa038", "critical": "#a30200"}
PD_SEVERITY = {"info": "info", "warning": "warning", "critical": "critical"}


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def slack(event: Event) -> dict[str, Any]:
    fields = [
        {"title": "group", "value": event.group, "short": True},
        {"title": "event", "value": event.kind, "short": True},
        {"title": "by", "value": event.by, "short": True},
        {"title": "id", "value": event.id, "short": True},
    ]
    fields += [{"title": name, "value": _flat(value), "short": False} for name, value in event.fields.items()]
    return {
        "text": f"[strangler] {event.message}",
        "attachments": [
            {
                "color": COLORS.get(event.severity, COLORS["info"]),
                "title": f"{event.kind} ({event.severity})",
                "fields": fields,
                "ts": int(event.at),
            }
        ],
    }


def dedup_key(event: Event) -> str:
    return f"strangler-rollback-{event.group}"


def pagerduty(event: Event, routing_key: str, source: str) -> dict[str, Any] | None:
    if event.kind == "rolled_back":
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": dedup_key(event),
            "payload": {
                "summary": f"strangler: {event.message}"[:1024],
                "source": source,
                "severity": PD_SEVERITY.get(event.severity, "error"),
                "timestamp": iso(event.at),
                "component": event.group,
                "group": "strangler",
                "class": event.fields.get("failed_check") or event.kind,
                "custom_details": event.fields,
            },
        }
    if event.kind == "recovered":
        return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key(event)}
    return None


def webhook(event: Event) -> dict[str, Any]:
    return {
        "source": "strangler",
        "id": event.id,  # the dedup key: delivery is at least once
        "event": event.kind,
        "group": event.group,
        "severity": event.severity,
        "message": event.message,
        "by": event.by,
        "at": iso(event.at),
        "fields": event.fields,
    }

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
from proxy.canary.slack import ACTION_ID, button_value

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
    body: dict[str, Any] = {
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
    if event.kind == "awaiting_approval" and isinstance(event.fields.get("hold_id"), int):
        body["blocks"] = approve_blocks(event)
    return body


def approve_blocks(event: Event) -> list[dict[str, Any]]:
    """The message and its approve button (Block Kit). A click reaches the admin API's
    ``/slack/interactions`` (the Slack app's interactivity URL) with the group and this hold."""
    value = button_value(event.group, int(event.fields["hold_id"]))
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"[strangler] {event.message}"}},
        {
            "type": "actions",
            "block_id": f"strangler-approve-{event.id}",
            "elements": [
                {
                    "type": "button",
                    "action_id": ACTION_ID,
                    "style": "primary",
                    "text": {"type": "plain_text", "text": "Approve"},
                    "value": value,
                    "confirm": {
                        "title": {"type": "plain_text", "text": "Approve this step?"},
                        "text": {"type": "plain_text", "text": event.message[:300]},
                        "confirm": {"type": "plain_text", "text": "Approve"},
                        "deny": {"type": "plain_text", "text": "Cancel"},
                    },
                }
            ],
        },
    ]


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

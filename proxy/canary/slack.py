"""Slack interactivity for approvals: verify a request really comes from Slack, and read which
hold the approve button names. Pure functions: bytes and headers in, a verdict out; the admin
route (``proxy/admin/canary.py``) does the I/O and the approval itself.

Slack signs ``v0:{X-Slack-Request-Timestamp}:{raw body}`` with the app's signing secret
(HMAC-SHA256, hex, prefixed ``v0=``) in ``X-Slack-Signature``
(https://api.slack.com/authentication/verifying-requests-from-slack). A timestamp more than five
minutes away from now is refused, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs

ACTION_ID = "strangler_approve"
MAX_AGE_SECONDS = 300.0
MAX_BODY_BYTES = 256 * 1024
_VALUE = re.compile(r"approve:([A-Za-z0-9_.-]{1,64}):([0-9]{1,18})")


class SlackRefused(Exception):
    """Not a request we act on; ``status`` is the HTTP answer, ``str()`` the one-line reason."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ApproveClick:
    group: str
    hold_id: int
    user_id: str
    user_name: str


def button_value(group: str, hold_id: int) -> str:
    """What the approve button carries back: the group and the hold it was raised for."""
    return f"approve:{group}:{hold_id}"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    base = b"v0:" + timestamp.encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def verify(secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float) -> None:
    """Raises ``SlackRefused`` (401) unless the signature matches and the timestamp is recent."""
    if not timestamp or not signature:
        raise SlackRefused("missing X-Slack-Request-Timestamp or X-Slack-Signature", 401)
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise SlackRefused("X-Slack-Request-Timestamp is not a unix time", 401)
    if abs(now - int(timestamp)) > MAX_AGE_SECONDS:
        raise SlackRefused("Slack request timestamp is more than 5 minutes away from now (replay?)", 401)
    if not hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.encode("utf-8", "replace")):
        raise SlackRefused("Slack signature does not match", 401)


def parse_click(body: bytes) -> ApproveClick:
    """The form body's ``payload`` JSON -> the approve click it holds; ``SlackRefused`` (400) with
    one line saying what is missing otherwise."""
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=20)
        payload = json.loads(form["payload"][0])
    except (UnicodeDecodeError, ValueError, KeyError):
        raise SlackRefused("body must be a form with a 'payload' field holding JSON", 400) from None
    if not isinstance(payload, dict):
        raise SlackRefused("payload must be a JSON object", 400)
    user = payload.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str) or not user["id"]:
        raise SlackRefused("payload has no user id", 400)
    actions = payload.get("actions")
    if not isinstance(actions, list):
        raise SlackRefused("payload has no actions", 400)
    for action in actions[:20]:
        if isinstance(action, dict) and action.get("action_id") == ACTION_ID:
            value = action.get("value")
            match = _VALUE.fullmatch(value) if isinstance(value, str) else None
            if match is None:
                raise SlackRefused("the approve action's value does not name a group and a hold", 400)
            name = user.get("username") or user.get("name") or user["id"]
            return ApproveClick(match[1], int(match[2]), user["id"][:64], str(name)[:64])
    raise SlackRefused(f"payload has no {ACTION_ID} action", 400)

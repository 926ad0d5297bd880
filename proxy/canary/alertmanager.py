"""Alertmanager's webhook payload (version 4) -> which route groups to roll back. Pure: no I/O.

A firing alert carrying the group label (``canary.alert_group_label``, default ``strangler_group``)
asks for that group's rollback; a resolved one changes nothing (rolling forward again is a person's
decision). Many alerts for one group make one rollback, named after the first. An alert for a group
no proxy serves is ignored and reported. Each alert is validated on its own: a malformed one is
reported (one line) and the others still act, because a rollback is the safe direction.

Nothing from the alert other than its name, fingerprint and start time is kept or echoed: labels
and annotations often hold internal addresses (``instance``) and URLs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_ALERTS = 10_000
MAX_TEXT = 200  # a name or fingerprint kept or echoed is cut to this
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class Alert(BaseModel):
    """One alert of the payload; the fields we read, others ignored (Alertmanager sends more)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str = ""  # noqa: N815 - Alertmanager's name
    fingerprint: str = ""


def clean(text: str) -> str:
    """Printable ASCII only, cut to ``MAX_TEXT``: safe in logs, decisions and answers."""
    return _UNPRINTABLE.sub("?", text)[:MAX_TEXT]


@dataclass(frozen=True, slots=True)
class Firing:
    """The alert a group's rollback is named after."""

    group: str
    name: str
    fingerprint: str
    starts_at: str
    count: int  # firing alerts for this group in the payload

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fingerprint": self.fingerprint, "starts_at": self.starts_at,
                "alerts": self.count}  # fmt: skip


@dataclass
class Plan:
    rollback: dict[str, Firing] = field(default_factory=dict)  # group -> first firing alert
    firing: int = 0
    resolved: int = 0
    without_label: int = 0  # firing or resolved alerts that name no group: not ours
    unknown: dict[str, int] = field(default_factory=dict)  # group no proxy serves -> alerts
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"index", "error"}, first 20
    invalid_count: int = 0


class BadPayload(ValueError):
    """The payload as a whole is not Alertmanager's (one line)."""


def plan(payload: Any, label: str, groups: list[str]) -> Plan:
    """What to do for ``payload`` (parsed JSON); ``groups`` are those the proxies serve."""
    if not isinstance(payload, dict):
        raise BadPayload("body must be a JSON object (Alertmanager's webhook payload)")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise BadPayload("alerts must be a list (Alertmanager's webhook payload, version 4)")
    if len(alerts) > MAX_ALERTS:
        raise BadPayload(f"{len(alerts)} alerts in one payload, more than {MAX_ALERTS}")
    out = Plan()
    known = set(groups)
    for index, raw in enumerate(alerts):
        try:
            alert = Alert.model_validate(raw)
        except ValidationError as exc:
            out.invalid_count += 1
            if len(out.invalid) < 20:
                err = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in err["loc"]) or "alert"
                out.invalid.append({"index": index, "error": clean(f"{where}: {err['msg']}")})
            continue
        if alert.status == "resolved":
            out.resolved += 1
            continue
        out.firing += 1
        group = alert.labels.get(label)
        if group is None:
            out.without_label += 1
            continue
        if group not in known:
            name = clean(group)
            if name in out.unknown or len(out.unknown) < 20:
                out.unknown[name] = out.unknown.get(name, 0) + 1
            continue
        first = out.rollback.get(group)
        if first is None:
            out.rollback[group] = Firing(
                group,
                clean(alert.labels.get("alertname", "")),
                clean(alert.fingerprint),
                clean(alert.startsAt),
                1,
            )
        else:
            out.rollback[group] = Firing(
                group, first.name, first.fingerprint, first.starts_at, first.count + 1
            )
    return out

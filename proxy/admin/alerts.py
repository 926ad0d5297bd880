"""``POST /alerts/alertmanager``: Alertmanager's webhook rolls route groups back (token required).

The body is read up to ``canary.alert_max_body_bytes`` (413 beyond, without reading the rest);
``proxy.canary.alertmanager.plan`` (pure) says which groups; each is rolled back through the same
transaction as the leader's rollback (``Rollouts.rollback_for_alert``: split 0, rollout rolled
back, decision naming the alert, critical alert queued), which publishes the change, so every
proxy serves v2 at 0% within its refresh. The write-token guard comes from admin/app.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.bodies import BodyTooLarge, capped_body
from proxy.canary import events
from proxy.canary.alertmanager import BadPayload, Firing, plan
from proxy.canary.capability import CanaryService
from proxy.metrics import Metrics

log = logging.getLogger("strangler.admin")

BY = "alertmanager"


def routes(service: CanaryService, metrics: Metrics) -> list[Route]:
    settings = service.settings
    canary = settings.canary

    async def inherited(group: str) -> float:
        """The share ``group`` serves while its own key is unset: the global split, or the default."""
        if group != "default":
            raw = await service.redis.get(service.keys.split(None))
            try:
                value = float(raw) if raw is not None else None
            except ValueError:
                value = None
            if value is not None and 0 <= value <= 100:
                return value
        return settings.default_percentage

    async def roll_back(firing: Firing) -> float | None:
        reason = f"alert {firing.name or '(no alertname)'} firing"
        decision = {
            "at": service.rollouts.wall(), "group": firing.group, "action": "rollback", "by": BY,
            "failed_check": "alert", "reason": reason, "alert": firing.as_dict(),
        }  # fmt: skip

        def event_for(share: float) -> events.Event:
            message = f"{firing.group} rolled back from {share:g}% to 0%: {reason}"
            return events.make(
                "rolled_back", firing.group, message, BY,
                failed_check="alert", alert=firing.as_dict(), from_percentage=share,
            )  # fmt: skip

        return await service.rollouts.rollback_for_alert(
            firing.group, await inherited(firing.group), decision, event_for, BY
        )

    async def alertmanager(request: Request) -> Response:
        """Alertmanager webhook (version 4): a firing alert labelled with a route group rolls that
        group back to 0% v2; a resolved one changes nothing."""
        import orjson

        try:
            raw = await capped_body(request, canary.alert_max_body_bytes)
        except BodyTooLarge:
            detail = f"body above {canary.alert_max_body_bytes} bytes (canary.alert_max_body_bytes)"
            return JSONResponse({"error": "body too large", "detail": detail}, status_code=413)
        try:
            payload = orjson.loads(raw)
        except ValueError:
            return JSONResponse(
                {"error": "body must be JSON", "detail": "it does not parse"}, status_code=400
            )
        try:
            todo = plan(payload, canary.alert_group_label, settings.group_names)
        except BadPayload as exc:
            return JSONResponse({"error": "not an Alertmanager payload", "detail": str(exc)}, status_code=422)
        rolled_back: list[dict[str, Any]] = []
        already: list[str] = []
        for group, firing in todo.rollback.items():
            share = await roll_back(firing)
            if share is None:
                already.append(group)
                continue
            rolled_back.append({"group": group, "from_percentage": share, "alert": firing.as_dict()})
            metrics.rolled_back(group, "alert")
            log.warning("rolled back %s from %g%% to 0%%: alert %s firing", group, share, firing.name)
        return JSONResponse(
            {
                "rolled_back": rolled_back,
                "already_at_zero": already,
                "firing": todo.firing,
                "resolved": todo.resolved,
                "without_group_label": todo.without_label,
                "unknown_groups": todo.unknown,
                "invalid": todo.invalid,
                "invalid_count": todo.invalid_count,
                "label": canary.alert_group_label,
            }
        )

    return [Route("/alerts/alertmanager", alertmanager, methods=["POST"])]

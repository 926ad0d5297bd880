"""The canary's admin routes: ``GET /canary/status``, ``GET /rollout`` and ``POST /rollout/<action>``
(start, pause, resume, abort, promote, approve), and ``POST /slack/interactions`` (Slack's approve
button, verified by Slack's signature instead of the token). The prefix and the write-token guard
come from admin/app."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.app import error, unknown_group
from proxy.admin.bodies import BodyTooLarge, capped_body
from proxy.canary import slack
from proxy.canary.capability import CanaryService
from proxy.canary.rollout import RolloutError, parse_duration, parse_steps

log = logging.getLogger("strangler.admin")

MAX_LADDER = 1000  # a ladder longer than this in a request body is refused before parsing


def routes(service: CanaryService) -> list[Route]:
    settings = service.settings

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        import orjson

        try:
            data = orjson.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise RolloutError("body must be a JSON object")
        return data

    def group_of(data: dict[str, Any], request: Request) -> str:
        group = data.get("group") or request.query_params.get("group") or "default"
        if group not in settings.group_names:
            raise LookupError(group)
        return str(group)

    def handler(action: str) -> Any:
        async def handle(request: Request) -> Response:
            try:
                data = await body_of(request)
                group = group_of(data, request)
                who = f"admin api ({request.client.host if request.client else '?'})"
                if action == "start":
                    raw_steps = data.get("steps")
                    if raw_steps:
                        if not isinstance(raw_steps, str | list) or len(raw_steps) > MAX_LADDER:
                            raise RolloutError(
                                f"steps must be a list or a comma list of at most {MAX_LADDER}"
                            )
                        steps, approvals = parse_steps(raw_steps)
                    else:
                        steps, approvals = list(settings.canary.steps), list(settings.canary.approval_steps)
                    raw_interval = data.get("interval", settings.canary.step_interval_seconds)
                    interval = parse_duration(str(raw_interval))
                    state = await service.rollouts.start(group, steps, interval, who, approvals)
                elif action == "approve":
                    hold = data.get("hold_id")
                    if hold is not None and (isinstance(hold, bool) or not isinstance(hold, int)):
                        raise RolloutError("hold_id must be an integer (the hold shown in the status)")
                    by = data.get("by")
                    if by is not None and (not isinstance(by, str) or not 0 < len(by) <= 100):
                        raise RolloutError("by must be a name of 1 to 100 characters")
                    name = f"{by} via {who}" if by else who
                    state = await service.rollouts.approve(group, name, hold)
                elif action == "pause":
                    state = await service.rollouts.pause(group, who)
                elif action == "resume":
                    state = await service.rollouts.resume(group, who)
                elif action == "abort":
                    state = await service.rollouts.abort(group, who)  # the leader counts it
                elif action == "promote":
                    state = await service.rollouts.promote(group, who, full=bool(data.get("full")))
                else:
                    found = await service.rollouts.get(group)
                    if found is None:
                        return JSONResponse({"error": "no rollout", "group": group}, status_code=404)
                    state = found
            except LookupError as exc:
                return unknown_group(str(exc), settings.group_names)
            except (RolloutError, ValueError, TypeError) as exc:
                return JSONResponse({"error": "rejected", "detail": str(exc)}, status_code=409)
            return JSONResponse(state.as_dict())

        return handle

    async def status(request: Request) -> Response:
        return JSONResponse(await service.status())

    secret = settings.canary.slack_signing_secret
    approvers = set(settings.canary.slack_approvers)

    async def slack_interaction(request: Request) -> Response:
        """Approve a hold from Slack's approve button (signed by Slack, not by the admin token)."""
        if secret is None:
            return error(404, "not found", detail="Slack approvals are off (canary.slack_signing_secret)")
        try:
            try:
                body = await capped_body(request, slack.MAX_BODY_BYTES)
            except BodyTooLarge:
                raise slack.SlackRefused(f"body larger than {slack.MAX_BODY_BYTES} bytes", 413) from None
            slack.verify(
                secret.get_secret_value(),
                request.headers.get("x-slack-request-timestamp"),
                request.headers.get("x-slack-signature"),
                body,
                time.time(),
            )
            click = slack.parse_click(body)
            if approvers and click.user_id not in approvers:
                raise slack.SlackRefused(f"Slack user {click.user_id} may not approve rollouts", 403)
            if click.group not in settings.group_names:
                raise slack.SlackRefused(f"unknown group {click.group!r}", 404)
            by = f"slack {click.user_name} ({click.user_id})"
            state = await service.rollouts.approve(click.group, by, click.hold_id)
        except slack.SlackRefused as exc:
            log.warning("Slack interaction refused: %s", exc)
            return error(exc.status, "refused", detail=str(exc))
        except RolloutError as exc:
            return error(409, "rejected", detail=str(exc))
        return JSONResponse(
            {
                "text": f"approved: {state.group} leaves {state.percentage:g}% once its checks pass",
                **state.as_dict(),
            }
        )

    slack_interaction.signed = True  # type: ignore[attr-defined]  # no token: Slack's signature

    return [
        Route("/canary/status", status, methods=["GET"]),
        Route("/rollout", handler("get"), methods=["GET"]),
        *(Route(f"/rollout/{action}", handler(action), methods=["POST"])
          for action in ("start", "pause", "resume", "abort", "promote", "approve")),
        Route("/slack/interactions", slack_interaction, methods=["POST"]),
    ]  # fmt: skip

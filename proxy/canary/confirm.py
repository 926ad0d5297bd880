"""Confirm hooks: URLs that must answer 2xx before the leader takes a step (Flagger's
confirm-rollout / confirm-promotion; ``canary.confirm_hooks``).

Asked by the leader only, only when a step is otherwise due (checks passed for the hold, approval
given where one is needed), all hooks of the group at once, each bounded by its timeout. Anything
but a 2xx answer holds the step and is asked again at the next check. The reason names the hook,
never its URL (which may be an internal address or carry a token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from proxy.settings import ConfirmHook


class Confirm(Protocol):
    async def ask(self, group: str, body: dict[str, Any]) -> str | None:
        """None when every hook of ``group`` answered 2xx; otherwise why the step holds."""
        ...


class ConfirmHooks:
    """The real ``Confirm``: one POST per hook of the group, in parallel."""

    def __init__(self, hooks: Sequence[ConfirmHook]) -> None:
        self._hooks = list(hooks)

    def for_group(self, group: str) -> list[ConfirmHook]:
        return [hook for hook in self._hooks if not hook.groups or group in hook.groups]

    async def ask(self, group: str, body: dict[str, Any]) -> str | None:
        hooks = self.for_group(group)
        if not hooks:
            return None
        payload = {"source": "strangler", "kind": "confirm", "group": group, **body}
        async with httpx.AsyncClient(follow_redirects=False) as client:
            answers = await asyncio.gather(*(_one(client, hook, payload) for hook in hooks))
        refusals = [answer for answer in answers if answer is not None]
        return "; ".join(refusals) if refusals else None


async def _one(client: httpx.AsyncClient, hook: ConfirmHook, payload: dict[str, Any]) -> str | None:
    try:
        response = await asyncio.wait_for(
            client.post(hook.url, json=payload, timeout=hook.timeout_seconds), hook.timeout_seconds * 2
        )
    except (TimeoutError, httpx.TimeoutException):
        return f"confirm hook {hook.name!r} did not answer within {hook.timeout_seconds:g}s"
    except httpx.HTTPError as exc:
        return f"confirm hook {hook.name!r} unreachable ({type(exc).__name__})"
    if 200 <= response.status_code < 300:
        return None
    return f"confirm hook {hook.name!r} answered HTTP {response.status_code}"

"""Confirm hooks: URLs that must answer 2xx before the leader takes a step (Flagger's
confirm-rollout / confirm-promotion; ``canary.confirm_hooks``).

Asked by the leader only, only when a step is otherwise due (checks passed for the hold, approval
given where one is needed), all hooks of the group at once, each bounded by its timeout. Anything
but a 2xx answer holds the step and is asked again at the next check. The reason names the hook,
never its URL (which may be an internal address or carry a token).

A round runs as its own task and the check waits for it a short while only (``wait_seconds``): a
slow hook holds its own group's step, never the checks (and rollbacks) of the other groups. A
round still running is picked up by the next check, for the same hold only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Protocol

import httpx

from proxy.settings import ConfirmHook


class Confirm(Protocol):
    async def ask(self, group: str, body: dict[str, Any]) -> str | None:
        """None when every hook of ``group`` answered 2xx; otherwise why the step holds."""
        ...

    def cancel(self) -> None:
        """Drop the rounds still running (the leader stops)."""
        ...


WAITING = "waiting for the confirm hooks to answer"


class ConfirmHooks:
    """The real ``Confirm``: one POST per hook of the group, in parallel, in a task of its own."""

    def __init__(self, hooks: Sequence[ConfirmHook], wait_seconds: float = 1.0) -> None:
        self._hooks = list(hooks)
        self._wait = wait_seconds
        self._rounds: dict[str, tuple[str, asyncio.Task[str | None]]] = {}

    def for_group(self, group: str) -> list[ConfirmHook]:
        return [hook for hook in self._hooks if not hook.groups or group in hook.groups]

    async def ask(self, group: str, body: dict[str, Any]) -> str | None:
        hooks = self.for_group(group)
        if not hooks:
            return None
        key = json.dumps(body, sort_keys=True)
        running = self._rounds.get(group)
        if running is None or running[0] != key:  # none yet, or one for another hold: ask afresh
            if running is not None:
                running[1].cancel()
            payload = {"source": "strangler", "kind": "confirm", "group": group, **body}
            running = (key, asyncio.create_task(_round(hooks, payload), name=f"strangler-confirm-{group}"))
            self._rounds[group] = running
        task = running[1]
        if not task.done():
            await asyncio.wait({task}, timeout=self._wait)
        if not task.done():
            return WAITING
        del self._rounds[group]  # this answer is used once: the next check asks again
        try:
            return task.result()
        except Exception as exc:  # noqa: BLE001 - a bug in a round holds the step, it never stops the check
            return f"confirm hooks failed ({type(exc).__name__})"

    def cancel(self) -> None:
        for _, task in self._rounds.values():
            task.cancel()
        self._rounds.clear()


async def _round(hooks: list[ConfirmHook], payload: dict[str, Any]) -> str | None:
    async with httpx.AsyncClient(follow_redirects=False) as client:
        answers = await asyncio.gather(*(_one(client, hook, payload) for hook in hooks))
    refusals = [answer for answer in answers if answer is not None]
    return "; ".join(refusals) if refusals else None


async def _one(client: httpx.AsyncClient, hook: ConfirmHook, payload: dict[str, Any]) -> str | None:
    """Only the status counts: the answer's body is never read (a hook answering a huge or endless
    body costs nothing)."""

    async def status() -> int:
        async with client.stream("POST", hook.url, json=payload, timeout=hook.timeout_seconds) as answer:
            return answer.status_code

    try:
        code = await asyncio.wait_for(status(), hook.timeout_seconds * 2)
    except (TimeoutError, httpx.TimeoutException):
        return f"confirm hook {hook.name!r} did not answer within {hook.timeout_seconds:g}s"
    except httpx.HTTPError as exc:
        return f"confirm hook {hook.name!r} unreachable ({type(exc).__name__})"
    if 200 <= code < 300:
        return None
    return f"confirm hook {hook.name!r} answered HTTP {code}"

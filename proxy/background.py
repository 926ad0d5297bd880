"""Background loops and tasks beside the request path (uvicorn's main_loop/on_tick shape).

``run()`` is only ``while not stopping: await tick(); await sleep(interval)``, so tests drive a
loop with ``tick()`` step by step; ``stop()`` cancels and waits, then gives the subclass a last
word (a final flush, a lock hand-over) through ``on_stop()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

log = logging.getLogger("strangler")


class Component(Protocol):
    """A background service the lifespan opens and closes (in reverse order)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float = 5.0) -> None:
    """Cancel tasks and wait until each has ended (their own errors were already handled or
    logged), for at most ``timeout``: a task that ignores its cancellation must not hold a
    shutdown forever. Such a task is named in the log."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout)
    for task in pending:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning
    for task in stuck:
        log.warning("background task %s did not stop within %ss after cancel", task.get_name(), timeout)


class BackgroundLoop:
    """Subclasses set ``interval`` and ``name`` and implement ``tick()``."""

    interval: float = 1.0
    name: str = "strangler-loop"

    def __init__(self) -> None:
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> Any:
        raise NotImplementedError

    async def run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - one failed tick must not end the loop
                log.exception("%s: tick failed", self.name)
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self.run(), name=self.name)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        await self.on_stop()

    async def on_stop(self) -> None:
        """Last work after the loop has ended (best effort, bounded by the subclass)."""

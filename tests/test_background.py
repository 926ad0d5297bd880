"""A shutdown never waits forever on a background task that ignores its cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.background import cancel_and_wait


async def _stubborn(release: asyncio.Event) -> None:
    """Swallows its cancellation and keeps waiting (what a close stuck on a dead connection does)."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue


async def _well_behaved() -> None:
    await asyncio.sleep(3600)


def test_cancel_and_wait_gives_up_on_a_task_that_ignores_cancel_and_names_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> tuple[bool, bool]:
        release = asyncio.Event()
        stubborn = asyncio.create_task(_stubborn(release), name="stubborn")
        polite = asyncio.create_task(_well_behaved(), name="polite")
        await asyncio.sleep(0)
        await cancel_and_wait([stubborn, polite], timeout=0.2)
        states = stubborn.done(), polite.cancelled()
        release.set()
        await stubborn
        return states

    with caplog.at_level(logging.WARNING, logger="strangler"):
        stubborn_done, polite_cancelled = asyncio.run(main())
    assert (stubborn_done, polite_cancelled) == (False, True)
    assert [r.getMessage() for r in caplog.records] == [
        "background task stubborn did not stop within 0.2s after cancel"
    ]

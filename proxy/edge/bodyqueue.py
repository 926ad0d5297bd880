"""Body chunks between the connection that reads them and the task that consumes them.

One shape for request bodies (our server) and answers (our upstream client): the reading side
``feed``s chunks and ``wake``s the consumer; past ``high_water`` buffered bytes it is asked to pause,
and once the consumer has taken the buffer under a quarter of that it is asked to resume. So a slow
consumer holds at most about ``high_water`` bytes, whatever the size of the body.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol


class Reader(Protocol):
    """The reading side's flow control (our server connection, or an upstream answer)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class BodyQueue:
    __slots__ = ("_chunks", "_buffered", "_waiter", "_high", "_reader")

    def __init__(self, high_water: int, reader: Reader) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._high = high_water
        self._reader = reader  # an object, not two bound methods: no allocations per body

    def __bool__(self) -> bool:
        """Whether a chunk is waiting."""
        return bool(self._chunks)

    # --- the reading side ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > self._high:
            self._reader.pause_reading()
        self.wake()

    def wake(self) -> None:
        """The consumer waiting in ``wait`` goes on (a chunk, the end, an error, a disconnect)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the consumer ----------------------------------------------------------------------------

    def pop(self) -> bytes | None:
        """The next chunk, or None when none is waiting."""
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= self._high // 4:
            self._reader.resume_reading()
        return chunk

    async def wait(self) -> None:
        """Until the reading side wakes us."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def clear(self) -> None:
        self._chunks.clear()
        self._buffered = 0

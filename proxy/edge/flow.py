"""Flow control for one transport, both directions: the one helper the server protocol, the
upstream client and the WebSocket relay share.

Why one helper: the same four rules were written three times and drifted apart (a drain waiter
that was never woken on close, a pause that was never undone). Here:

- writing: the transport says ``pause_writing``/``resume_writing`` (its buffer crossed the
  high-water mark); ``drain()`` waits until it is resumed, raises ``ConnectionResetError`` once the
  connection is lost, and ``TimeoutError`` when it stays paused longer than ``send_timeout`` (a
  peer that never reads must not hold us, or a backend connection behind us, for ever);
- reading: ``pause_reading``/``resume_reading`` are idempotent and never touch a closing transport;
- ``lost()`` wakes every waiter, so nothing waits on a connection that is gone.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    """Pause state of one transport and the one coroutine that may wait for its write buffer."""

    __slots__ = ("transport", "write_paused", "read_paused", "gone", "_drain")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.read_paused = False
        self.gone = False
        self._drain: asyncio.Future[None] | None = None

    def attach(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio subclass

    # --- writing ---------------------------------------------------------------------------------

    def writing_paused(self) -> None:
        """The transport's ``pause_writing``: our buffer toward the peer is over its high-water mark."""
        self.write_paused = True

    def writing_resumed(self) -> None:
        """The transport's ``resume_writing``: the peer read enough; a waiting writer goes on."""
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drain(self, send_timeout: float | None = None) -> None:
        """Wait while the write buffer is over its high-water mark. ``ConnectionResetError`` once
        the connection is lost; ``TimeoutError`` after ``send_timeout`` seconds without progress."""
        if self.gone:
            raise ConnectionResetError()
        if not self.write_paused:
            return
        loop = asyncio.get_running_loop()
        drain = self._drain = loop.create_future()
        try:
            if send_timeout is None or send_timeout <= 0:
                await drain
            else:
                async with asyncio.timeout(send_timeout):
                    await drain
        finally:
            self._drain = None
        if self.gone:
            raise ConnectionResetError()

    # --- reading ---------------------------------------------------------------------------------

    def pause_reading(self) -> None:
        transport = self.transport
        if not self.read_paused and transport is not None and not self.gone and not transport.is_closing():
            self.read_paused = True
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if self.read_paused and transport is not None and not self.gone and not transport.is_closing():
            self.read_paused = False
            transport.resume_reading()

    # --- the end -------------------------------------------------------------------------------------

    def lost(self) -> None:
        """The connection is gone: a writer waiting for the buffer wakes (and raises)."""
        self.gone = True
        self.write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

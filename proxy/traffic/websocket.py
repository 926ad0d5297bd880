"""The WebSocket relay: frames both ways between a client and the version chosen at upgrade time,
and the registry that closes v2 connections a rollback or a lower split moved back to v1.

The client side is either our native server (frames as they came, ping/pong included) or the ASGI
adapter (whole messages); the upstream side is always our own connection to the configured
origin (``proxy/edge/websocket.py``). Both look like ``WsSide`` here.

Close semantics: a close frame from either side is passed on with its code and reason; an
upstream that vanishes without a close frame becomes 1011 to the client; a client that vanishes
becomes 1001 to the upstream; a message over the size limit is refused with 1009 by the side
that received it (the client also gets 1009 when the upstream sent it; other upstream protocol
errors are 1011).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Callable
from typing import Protocol

from websockets.frames import Close, Frame, Opcode

from proxy.control.snapshot import Snapshot
from proxy.metrics import Metrics
from proxy.traffic import split
from proxy.traffic.decision import NO_BUCKET, PINNED
from proxy.traffic.exchange import ClientGone

DATA_OPS = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)
INTERNAL_ERROR = 1011
GOING_AWAY = 1001
SERVICE_RESTART = 1012
MESSAGE_TOO_BIG = 1009


class WsSide(Protocol):
    """One side of a relayed connection."""

    async def recv(self) -> Frame | None:
        """The next frame (a close frame included); None once the side is gone or failed."""
        ...

    async def send(self, frame: Frame) -> None:
        """Pass a data or control frame on; waits while the peer reads slowly."""
        ...

    async def close(self, code: int | None, reason: str = "") -> None: ...

    def failed_code(self) -> int | None:
        """The code this side was closed with by the proxy itself (1009, 1002...), if any."""
        ...

    def abort(self) -> None: ...


class WsPolicy:
    """The WebSocket settings, resolved once."""

    __slots__ = ("idle_timeout", "close_timeout", "drain_grace", "rollback_grace", "check_interval")

    def __init__(self, idle_timeout: float, close_timeout: float, drain_grace: float, rollback_grace: float,
                 check_interval: float = 0.25) -> None:  # fmt: skip
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.drain_grace = drain_grace
        self.rollback_grace = rollback_grace
        self.check_interval = check_interval


class Session:
    """One relayed connection, as the registry sees it."""

    __slots__ = ("group", "version", "bucket", "drain", "deadline", "drain_reason")

    def __init__(self, group: str, version: str, bucket: int) -> None:
        self.group = group
        self.version = version
        # the split bucket it was placed by (random when it had no key); NO_BUCKET: the force
        # header or a match rule placed it (they win at any percentage, so it is never drained);
        # PINNED: a session pin (only a rollback moves it)
        self.bucket = bucket
        self.drain = asyncio.Event()
        self.deadline: float | None = None
        self.drain_reason = ""


class Registry:
    """Open v2 connections, re-judged against each new snapshot (off the request path: one task
    that runs only while such connections exist)."""

    def __init__(self, snapshot: Callable[[], Snapshot], percentage: Callable[[Snapshot, str], float],
                 policy: WsPolicy, metrics: Metrics) -> None:  # fmt: skip
        self._snapshot = snapshot
        self._percentage = percentage
        self._policy = policy
        self._metrics = metrics
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def add(self, session: Session) -> int:
        key = next(self._ids)
        if session.version == "v2" and session.bucket != NO_BUCKET:
            self._sessions[key] = session
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._watch(), name="strangler-ws-drain")
        return key

    def remove(self, key: int) -> None:
        self._sessions.pop(key, None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._sessions:
            self.tick(loop.time())
            await asyncio.sleep(self._policy.check_interval)

    def tick(self, now: float) -> None:
        """Mark v2 connections the current split no longer gives v2; close them at their deadline."""
        snapshot = self._snapshot()
        for session in list(self._sessions.values()):
            if session.drain.is_set():
                continue
            if session.bucket == NO_BUCKET:
                continue
            percentage = self._percentage(snapshot, session.group)
            rollback = percentage <= 0
            keep = not rollback and (
                session.bucket == PINNED or session.bucket < percentage * (split.BUCKETS / 100)
            )
            if keep:
                session.deadline = None  # the split went back up within the grace: it stays
                continue
            if session.deadline is None:
                grace = self._policy.rollback_grace if rollback else self._policy.drain_grace
                session.deadline = now + grace
                session.drain_reason = "rollback" if rollback else "split_lowered"
            if now >= session.deadline:
                self._metrics.ws_drained(session.group, session.drain_reason)
                session.drain.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def bucket_for(salt: bytes, group: str, user_key: bytes | None) -> int:
    return split.bucket(salt, group, user_key) if user_key is not None else random.randrange(split.BUCKETS)


async def relay(
    client: WsSide, upstream: WsSide, session: Session, policy: WsPolicy, metrics: Metrics
) -> int:
    """Frames both ways until one side closes; returns the close code the client was given (or
    sent). Per-connection counters are bumped per message, never logged."""
    version = session.version
    to_upstream, to_client = metrics.ws_message_counters(version)
    loop = asyncio.get_running_loop()
    last = [loop.time()]

    async def pump(src: WsSide, dst: WsSide, count: Callable[[], None]) -> Frame | None:
        try:
            while True:
                frame = await src.recv()
                if frame is None or frame.opcode is Opcode.CLOSE:
                    return frame
                last[0] = loop.time()
                await dst.send(frame)
                if frame.fin and frame.opcode in DATA_OPS:
                    count()
        except (OSError, RuntimeError, ClientGone):  # a side that broke mid-send ends the relay
            return None

    up = loop.create_task(pump(client, upstream, to_upstream.inc))
    down = loop.create_task(pump(upstream, client, to_client.inc))
    drain = loop.create_task(session.drain.wait())
    code = GOING_AWAY
    try:
        while True:
            timeout = policy.idle_timeout - (loop.time() - last[0]) if policy.idle_timeout else None
            done, _ = await asyncio.wait(
                {up, down, drain}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                if policy.idle_timeout and loop.time() - last[0] >= policy.idle_timeout:
                    code = GOING_AWAY
                    await _close_both(client, upstream, GOING_AWAY, "idle timeout", GOING_AWAY)
                    await _settle(up, down, policy.close_timeout)
                    return code
                continue
            break
        if drain in done:
            code = SERVICE_RESTART
            await _close_both(client, upstream, SERVICE_RESTART, "service restart", GOING_AWAY)
        elif up in done:
            frame = up.result()
            if frame is not None:  # the client closed: its code and reason go upstream
                close = Close.parse(frame.data)
                code = close.code
                await upstream.close(close.code, close.reason)
            else:  # the client vanished, or broke the protocol (the proxy closed it with 1002/1009...)
                failed = client.failed_code()
                code = failed if failed is not None else GOING_AWAY
                await upstream.close(GOING_AWAY, "client gone")
        else:
            frame = down.result()
            if frame is not None:
                close = Close.parse(frame.data)
                code = close.code
                await client.close(close.code, close.reason)
            else:
                # the upstream vanished or broke the protocol: the client is told it was the
                # server's fault (1011), or that a message was too big (1009)
                failed = upstream.failed_code()
                code = MESSAGE_TOO_BIG if failed == MESSAGE_TOO_BIG else INTERNAL_ERROR
                await client.close(code, "upstream connection lost" if failed is None else "upstream error")
                metrics.upstream_error(version, "ws_lost" if failed is None else "ws_protocol")
        await _settle(up, down, policy.close_timeout)
        return code
    finally:
        # counted once whatever ended it (a cancelled relay at shutdown counts as 1001)
        metrics.ws_closed(version, code)
        for task in (up, down, drain):
            task.cancel()
        for task in (up, down, drain):
            with contextlib.suppress(BaseException):
                await task
        client.abort()
        upstream.abort()


async def _close_both(client: WsSide, upstream: WsSide, code: int, reason: str, upstream_code: int) -> None:
    await client.close(code, reason)
    await upstream.close(upstream_code, reason)


async def _settle(up: asyncio.Task[Frame | None], down: asyncio.Task[Frame | None], timeout: float) -> None:
    """Let the closing handshakes finish (bounded), then the caller aborts what is left."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(up, down, return_exceptions=True)

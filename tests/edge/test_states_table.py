"""The client connection's transition table (proxy/edge/server.py ``State``, ``TRANSITIONS``):
every change goes through ``ServerProtocol._to``; one the table does not allow raises under
``strict_states`` and otherwise aborts that connection with one log line."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.edge.server import TRANSITIONS, ServerLimits, ServerProtocol, State, StateError


async def _noop(_: object) -> None:
    return None


def _protocol(strict: bool) -> ServerProtocol:
    return ServerProtocol(_noop, ServerLimits(strict_states=strict))


def test_every_state_is_in_the_table_and_closed_is_final() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.CLOSED] == frozenset()
    for state, targets in TRANSITIONS.items():
        assert state is State.CLOSED or State.CLOSED in targets  # a peer may always leave


def test_an_impossible_change_raises_when_strict() -> None:
    async def main() -> None:
        conn = _protocol(strict=True)
        assert conn.state is State.IDLE
        with pytest.raises(StateError, match="idle -> websocket"):
            conn._to(State.WEBSOCKET)
        assert conn.state is State.IDLE
        assert conn._to(State.READING_HEAD) and conn._to(State.ACTIVE) and conn._to(State.IDLE)
        conn._to(State.MUST_CLOSE)
        with pytest.raises(StateError):
            conn._to(State.ACTIVE)  # a connection that must close starts no new request

    asyncio.run(main())


def test_an_impossible_change_aborts_the_connection_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        conn = _protocol(strict=False)
        with caplog.at_level(logging.ERROR, logger="strangler"):
            assert conn._to(State.WEBSOCKET) is False
        assert conn.state is State.MUST_CLOSE

    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "client connection aborted: impossible state change idle -> websocket"
    ]

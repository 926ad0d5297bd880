"""The states of an upstream connection (``proxy/edge/client.py`` ``_Connection``) and the one
table every change is checked against.

A module of its own, and not compiled: mypyc cannot compile a class that inherits from ``int``
(``IntEnum``); the compiled client reads these as plain objects.
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.IntEnum):
    """The state of one side of an upstream connection (h11's ``_state.py``, cut to a client's
    needs). Ours is the request: ``IDLE -> SEND_BODY -> DONE`` (``IDLE -> DONE`` when the head and
    any buffered body go in one write). Theirs is the answer: ``IDLE -> SEND_RESPONSE`` (a request
    is out; 1xx interim answers keep it there) ``-> SEND_BODY -> DONE``, or ``MUST_CLOSE`` when the
    answer says the connection ends with it. Both become ``CLOSED`` together."""

    IDLE = 0
    SEND_BODY = 1
    SEND_RESPONSE = 2
    DONE = 3
    MUST_CLOSE = 4
    CLOSED = 5


IDLE: Final = State.IDLE
SEND_BODY: Final = State.SEND_BODY
SEND_RESPONSE: Final = State.SEND_RESPONSE
DONE: Final = State.DONE
MUST_CLOSE: Final = State.MUST_CLOSE
CLOSED: Final = State.CLOSED
SIDES: Final = 6  # a pair (ours, theirs) is the number ours * SIDES + theirs


def _transitions() -> tuple[int, ...]:
    """For each pair (ours, theirs), a bit mask of the pairs it may become: the one table every
    change is checked against (``_Connection._to``)."""
    ours_next = {IDLE: (SEND_BODY, DONE), SEND_BODY: (DONE,), DONE: (), MUST_CLOSE: ()}
    theirs_next = {SEND_RESPONSE: (SEND_BODY,), SEND_BODY: (DONE, MUST_CLOSE)}
    allowed: dict[tuple[State, State], set[tuple[State, State]]] = {}

    def allow(old: tuple[State, State], new: tuple[State, State]) -> None:
        allowed.setdefault(old, set()).add(new)

    allow((IDLE, IDLE), (SEND_BODY, SEND_RESPONSE))  # a request begins: its head is written,
    allow((IDLE, IDLE), (DONE, SEND_RESPONSE))  # with its whole body or without one
    allow((DONE, DONE), (IDLE, IDLE))  # reuse: both messages complete, keep-alive
    for ours in (SEND_BODY, DONE):
        for theirs in (SEND_RESPONSE, SEND_BODY):
            for after in ours_next[ours]:
                allow((ours, theirs), (after, theirs))  # the request goes on under the answer
            for after in theirs_next[theirs]:
                allow((ours, theirs), (ours, after))  # the answer goes on under the request
    for ours in State:
        for theirs in State:
            if ours is not CLOSED and theirs is not CLOSED:
                allow((ours, theirs), (CLOSED, CLOSED))  # either side may close at any time
    table = [0] * (SIDES * SIDES)
    for (ours, theirs), targets in allowed.items():
        for new_ours, new_theirs in targets:
            table[ours * SIDES + theirs] |= 1 << (new_ours * SIDES + new_theirs)
    return tuple(table)


NEXT: Final = _transitions()


class ImpossibleTransition(RuntimeError):
    """A connection was asked to change state in a way its table does not allow: a bug."""

"""A greedy shrinker for a failing session, for writing a finding down as a regression test.

Hypothesis's own shrinking replays a timing-dependent failure hundreds of times (the suite turns
it off unless DIFFERENTIAL_SHRINK=1); this one tries the obvious simplifications (drop a request,
reset a field to its default, halve a size), each kept only if the failure still shows in
``tries`` runs out of ``tries``:

    from tests.differential.shrink import shrink
    smaller = shrink(harness, session, "body of 0 bytes differs")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from tests.differential.harness import Harness
from tests.differential.spec import Answer, Request, Session


def _fails(harness: Harness, session: Session, needle: str, tries: int) -> bool:
    for _ in range(tries):
        _, problems = harness.run(session)
        if not any(needle in p for p in problems):
            return False
    return True


def _simpler(obj: object) -> Iterator[object]:
    """Each field of a dataclass set to its default, or a size halved."""
    default = type(obj)()  # type: ignore[call-arg]
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.name == "answer":
            for smaller in _simpler(value):
                yield dataclasses.replace(obj, answer=smaller)  # type: ignore[type-var]
            continue
        if value != getattr(default, f.name):
            yield dataclasses.replace(obj, **{f.name: getattr(default, f.name)})  # type: ignore[type-var]
        if f.name in ("size", "pause_at") and isinstance(value, int) and value > 1:
            yield dataclasses.replace(obj, **{f.name: value // 2})  # type: ignore[type-var]


def _candidates(session: Session) -> Iterator[Session]:
    reqs = session.requests
    for i in range(len(reqs)):
        if len(reqs) > 1:
            rest = reqs[:i] + reqs[i + 1 :]
            yield dataclasses.replace(session, requests=rest, read_pause=None, disconnect=None)
            yield dataclasses.replace(session, requests=rest)
    for field in ("pipelined", "read_size", "read_pause", "disconnect", "close_last"):
        default = getattr(Session(requests=()), field)
        if getattr(session, field) != default:
            yield dataclasses.replace(session, **{field: default})
    for i, request in enumerate(reqs):
        for smaller in _simpler(request):
            assert isinstance(smaller, Request)
            yield dataclasses.replace(session, requests=reqs[:i] + (smaller,) + reqs[i + 1 :])


def shrink(harness: Harness, session: Session, needle: str, tries: int = 2, rounds: int = 20) -> Session:
    """The smallest session found that still fails with a difference containing ``needle``."""
    for _ in range(rounds):
        for candidate in _candidates(session):
            if _valid(candidate) and _fails(harness, candidate, needle, tries):
                session = candidate
                break
        else:
            return session
    return session


def _valid(session: Session) -> bool:
    n = len(session.requests)
    if session.read_pause and session.read_pause[0] >= n:
        return False
    if session.disconnect and session.disconnect[1] >= n:
        return False
    return all(not r.answer.early or r.size or r.chunked for r in session.requests) and n > 0


__all__ = ["Answer", "Request", "Session", "shrink"]

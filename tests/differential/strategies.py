"""Hypothesis strategies for differential sessions. Sizes are drawn by class (empty, tiny, around
the proxy's 64 KiB buffering bound, large) so the interesting edges come up often and shrink to
small numbers."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.differential.spec import MAX_ANSWER, Answer, Request, Session

EDGES = (1, 65535, 65536, 65537, 131072, 262144)
NAMES_CLIENT = ("x-c-a", "x-c-b", "accept", "user-agent", "cookie", "authorization", "x-c-a")
NAMES_BACKEND = ("x-b-a", "x-b-b", "set-cookie", "cache-control", "etag", "vary", "set-cookie")
VALUE = st.from_regex(r"([A-Za-z0-9][A-Za-z0-9 ,;=/.:-]{0,30}[A-Za-z0-9])?", fullmatch=True)


@st.composite
def sizes(draw: st.DrawFn, largest: int) -> int:
    kind = draw(st.integers(0, 99))
    if kind < 20:
        return 0
    if kind < 55:
        return draw(st.integers(1, 1000))
    if kind < 72:
        return draw(st.integers(1001, 70_000))
    if kind < 84:
        return draw(st.sampled_from(EDGES))
    if kind < 96 or largest <= 1_000_000:
        return draw(st.integers(70_001, min(largest, 1_000_000)))
    return draw(st.integers(1_000_001, largest))


def chunk_size(draw: st.DrawFn, size: int) -> int:
    """Chunks of 1 byte and up, but at most 2,000 of them (a million 1-byte chunks only measure
    how slowly Python parses them, here and in the proxy)."""
    return max(draw(st.sampled_from((1, 7, 100, 4096, 65536, 1 << 20))), -(-size // 2000))


def headers(names: tuple[str, ...]) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    return st.lists(st.tuples(st.sampled_from(names), VALUE), max_size=3).map(tuple)


@st.composite
def answers(draw: st.DrawFn, has_body: bool) -> Answer:
    status = draw(st.sampled_from((200, 200, 200, 201, 204, 304, 404, 500)))
    size = 0 if status in (204, 304) else draw(sizes(MAX_ANSWER))
    framing = draw(st.sampled_from(("length", "length", "chunked", "close")))
    pause_ms = draw(st.sampled_from((0, 0, 0, 0, 1, 20)))
    return Answer(
        status=status,
        size=size,
        framing=framing,
        chunk=chunk_size(draw, size) if framing == "chunked" else 65536,
        close=draw(st.booleans()) if framing != "close" and draw(st.integers(0, 4)) == 0 else False,
        interim=tuple(draw(st.lists(st.sampled_from((100, 103)), max_size=2))),
        early=has_body and draw(st.integers(0, 3)) == 0,
        drop=draw(st.integers(0, 19)) == 0,
        pause_at=draw(st.integers(0, size)) if pause_ms else None,
        pause_ms=pause_ms,
        hop=draw(st.integers(0, 3)) == 0,
        extra=draw(headers(NAMES_BACKEND)),
    )


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method = draw(st.sampled_from(("GET", "GET", "HEAD", "POST", "POST", "PUT", "DELETE")))
    with_body = method in ("POST", "PUT") or (method == "DELETE" and draw(st.booleans()))
    size = draw(sizes(1_000_000)) if with_body else 0
    chunked = with_body and draw(st.integers(0, 2)) == 0
    pause_ms = draw(st.sampled_from((0, 0, 0, 0, 1, 20)))
    answer = draw(answers(with_body and (size > 0 or chunked)))
    return Request(
        method=method,
        size=size,
        chunked=chunked,
        chunk=chunk_size(draw, size) if chunked else 65536,
        length_zero=not with_body and draw(st.booleans()),
        expect=with_body and draw(st.integers(0, 4)) == 0,
        hop=draw(st.integers(0, 3)) == 0,
        forwarded=draw(st.integers(0, 3)) == 0,
        extra=draw(headers(NAMES_CLIENT)),
        pause_at=draw(st.integers(0, size + 200)) if pause_ms else None,
        pause_ms=pause_ms,
        version=draw(st.sampled_from(("v1", "v2"))),
        answer=answer,
    )


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    reqs = tuple(draw(st.lists(requests(), min_size=1, max_size=6)))
    disconnect = None
    if draw(st.integers(0, 5)) == 0:
        disconnect = (
            draw(st.sampled_from(("send", "recv"))),
            draw(st.integers(0, len(reqs) - 1)),
            draw(st.sampled_from((0.0, 0.1, 0.5, 0.9, 0.99))),
            draw(st.booleans()),
        )
    read_pause = None
    if draw(st.integers(0, 4)) == 0:
        read_pause = (draw(st.integers(0, len(reqs) - 1)), draw(st.integers(0, 200_000)),
                      draw(st.sampled_from((10, 50, 200))))  # fmt: skip
    return Session(
        requests=reqs,
        pipelined=draw(st.integers(0, 3)) == 0,
        read_size=draw(st.sampled_from((65536, 65536, 4096, 1 << 20))),
        read_pause=read_pause,
        disconnect=disconnect,
        close_last=draw(st.integers(0, 4)) == 0,
    )

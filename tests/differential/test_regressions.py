"""What the differential test found, each written down as a plain session (shrunk by hand or with
tests/differential/shrink.py) and run through the same harness: the fast path and the task path.

Every finding here failed on the main of its day and passes since its fix. Each
session runs a few times (``TIMES``): these failures depend on timing, so one pass proves little.
"""

from __future__ import annotations

import pytest

from tests.differential.harness import Harness
from tests.differential.spec import Answer, Request, Session

BOTH = ("fast", "task")


def check(harness: Harness, session: Session, times: int) -> None:
    for _ in range(times):
        harness.check(session)


def test_a_pipelined_request_keeps_its_body(request: pytest.FixtureRequest, harness: Harness) -> None:
    """GET, then a POST of 5 bytes sent right behind it (pipelined): by the POST's turn its whole
    body has been read, and the fast path takes it as a request without a body: the backend gets
    the POST with no Content-Length and no body; the 5 bytes are dropped (found on the first runs;
    9 of 10 sessions once the pool is warm)."""
    session = Session((Request("GET"), Request("POST", 5)), pipelined=True)
    check(harness, session, times=4)


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_pipelined_request_keeps_its_body_whatever_its_framing(
    request: pytest.FixtureRequest, harness: Harness, chunked: bool
) -> None:
    session = Session((Request("GET"), Request("PUT", 2587, chunked=chunked), Request("DELETE", 327)),
                      pipelined=True)  # fmt: skip
    check(harness, session, times=3)


def test_an_early_answer_does_not_splice_the_next_request(
    request: pytest.FixtureRequest, harness: Harness
) -> None:
    """The early answer, as first reported: a POST of 200,000 bytes, 100,000 sent, a pause, the
    rest; the backend answers on the head and drains the body. The proxy pools the backend
    connection while the body is still being written: the next request (here the same client's
    GET) is written into that body (h11 sees body bytes as a request line), a later request gets
    502 "closed without an answer", and the backend is left waiting for the rest of the body."""
    session = Session((Request("POST", 200_000, pause_at=100_000, pause_ms=500,
                               answer=Answer(200, 100, early=True)), Request("GET")))  # fmt: skip
    check(harness, session, times=2)


def test_a_streamed_early_answer_is_not_followed_by_a_silent_close(
    request: pytest.FixtureRequest, harness: Harness
) -> None:
    """The early answer, a second face: it is large (streamed, so its head goes out
    before the proxy knows the upload is unfinished). The proxy then closes the client connection
    without having said ``Connection: close``: the client's next request is lost."""
    session = Session((Request("POST", 200_000, pause_at=100_000, pause_ms=500,
                               answer=Answer(200, 100_000, early=True)), Request("GET")))  # fmt: skip
    check(harness, session, times=2)


def test_a_post_is_never_sent_twice(request: pytest.FixtureRequest, harness: Harness) -> None:
    """A POST sent twice: the backend reads a POST and closes without answering. The proxy sends it
    again on its idle pooled connection (the GET before left one): the backend applies it twice."""
    session = Session((Request("GET"), Request("POST", 100, answer=Answer(drop=True))))
    check(harness, session, times=2)


def test_an_idempotent_request_is_retried_at_most_once(harness: Harness) -> None:
    """The rule item 3 keeps: a GET the backend dropped may go again once, on a new connection,
    then the client gets a clean 502."""
    session = Session((Request("GET"), Request("GET", answer=Answer(drop=True))))
    check(harness, session, times=2)


def test_a_large_answer_after_a_streamed_one_is_not_cut(
    request: pytest.FixtureRequest, harness: Harness
) -> None:
    """A large answer after a streamed one, shrunk from a generated session (compiled build, task
    path): on one client connection a streamed answer (close-delimited, even empty), then a 6.7 MB
    answer with its Content-Length. The client gets 4-6 MB of it and a closed connection (3-4 runs
    in 5, pure and compiled, both paths)."""
    session = Session((Request("GET", answer=Answer(200, 0, framing="close")),
                       Request("GET", answer=Answer(200, 6_764_671))))  # fmt: skip
    check(harness, session, times=8)


def test_pipelined_uploads_with_early_answers_keep_every_answer_whole(harness: Harness) -> None:
    """Found by the deep profile (compiled, fast path, session 2,120): pipelined uploads whose
    answers come early (before the backend has the body). The second POST's early chunked answer
    was cut after 1,500 bytes and the connection closed without notice."""
    session = Session(
        (
            Request("POST", 154, chunked=True, chunk=4096,
                    answer=Answer(200, 40721, framing="chunked", chunk=100, interim=(103, 103), early=True)),
            Request("POST", 1_000_000, chunked=True, chunk=500, version="v2",
                    answer=Answer(200, 4677, framing="chunked", chunk=100, early=True)),
            Request("PUT", 56, answer=Answer(500, 0, framing="close", pause_at=0, pause_ms=1)),
            Request("POST", 79683, pause_at=1338, pause_ms=1, answer=Answer(304, 0, pause_at=0, pause_ms=20)),
            Request("PUT", 1002, chunked=True, chunk=7, pause_at=167, pause_ms=1,
                    answer=Answer(200, 65535, framing="close", interim=(103,), early=True)),
        ),
        pipelined=True,
        read_size=1_048_576,
    )  # fmt: skip
    check(harness, session, times=3)


def test_an_early_answer_to_a_chunked_upload_is_not_reset_away(harness: Harness) -> None:
    """The same, shrunk: a chunked upload of 1 MB answered early with a small chunked answer. The
    proxy relayed the whole answer, then closed the connection with the client still sending: the
    kernel answers unread input with a reset, which destroyed the answer's last KB in flight. The
    proxy now half-closes and discards the rest (lingering close)."""
    answer = Answer(200, 4677, framing="chunked", chunk=100, early=True)
    session = Session((Request("POST", 1_000_000, chunked=True, chunk=500, answer=answer),))
    check(harness, session, times=3)


def test_early_answers_to_large_uploads_on_a_kept_alive_connection(harness: Harness) -> None:
    """Deep profile, fast path, session 7,340 (before the lingering close): an early 64 KB answer to
    a 345 KB DELETE on a connection that had served three requests was cut after 65,319 bytes."""
    session = Session((
        Request("POST", 65, version="v2", answer=Answer(200, 296, interim=(100,), pause_at=276, pause_ms=1)),
        Request("GET", length_zero=True, answer=Answer(500, 0, framing="close", interim=(100, 103))),
        Request("POST", 97, chunked=True, chunk=1_048_576, pause_at=1, pause_ms=20,
                answer=Answer(304, 0, interim=(103, 103), early=True)),
        Request("DELETE", 345_831, pause_at=27_646, pause_ms=1, version="v2",
                answer=Answer(200, 65_535, interim=(103,), early=True, hop=True)),
        Request("POST", 97, chunked=True, chunk=1_048_576, pause_at=0, pause_ms=20,
                answer=Answer(304, 0, interim=(103, 103), early=True)),
    ))  # fmt: skip
    check(harness, session, times=2)


def test_an_early_256_kb_answer_to_a_1_mb_chunked_upload(harness: Harness) -> None:
    """Deep profile, task path, session 5,736 (before the lingering close): an early 256 KB 404 to a
    1 MB chunked DELETE was cut after 128,000 bytes."""
    session = Session((
        Request("DELETE", 999_999, chunked=True, chunk=1_048_576,
                answer=Answer(404, 262_144, interim=(103,), early=True)),
        Request("GET", answer=Answer(404, 996, framing="close")),
    ), read_size=1_048_576)  # fmt: skip
    check(harness, session, times=2)

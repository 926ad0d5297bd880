"""The guard's counters, frame headers fed in any split, with an injected clock (no server)."""

from __future__ import annotations

from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from proxy.edge.h2guard import (
    CONTINUATION_FLOOD,
    CONTROL_FLOOD,
    HEADERS_TOO_LARGE,
    PREFACE,
    RAPID_RESET,
    H2Guard,
)


def guard(**limits: int) -> H2Guard:
    values = {"resets": 10, "control": 10, "continuation": 4, "header_list": 1000, **limits}
    return H2Guard(values["resets"], values["control"], values["continuation"], values["header_list"])


def feed_bytewise(g: H2Guard, data: bytes, now: float) -> str | None:
    for i in range(len(data)):
        reason = g.feed(data[i : i + 1], now)
        if reason is not None:
            return reason
    return None


def test_the_preface_and_ordinary_frames_pass_in_any_split() -> None:
    data = PREFACE + HeadersFrame(1, data=b"x" * 50, flags=["END_HEADERS"]).serialize()
    data += DataFrame(1, data=b"y" * 3000, flags=["END_STREAM"]).serialize()
    assert guard().feed(data, 1.0) is None
    assert feed_bytewise(guard(), data, 1.0) is None


def test_resets_over_the_rate_are_rapid_reset_and_the_bucket_refills() -> None:
    g = guard(resets=10)
    frames = b"".join(RstStreamFrame(i * 2 + 1).serialize() for i in range(10))
    assert g.feed(PREFACE + frames, 100.0) is None
    assert g.feed(RstStreamFrame(99).serialize(), 100.0) == RAPID_RESET
    g = guard(resets=10)
    assert g.feed(PREFACE + frames, 100.0) is None
    assert g.feed(RstStreamFrame(99).serialize(), 101.0) is None  # a second later: refilled


def test_control_frames_over_the_rate() -> None:
    g = guard(control=5)
    assert g.feed(PREFACE + PingFrame(0, opaque_data=b"12345678").serialize() * 5, 1.0) is None
    assert g.feed(PingFrame(0, opaque_data=b"12345678").serialize(), 1.0) == CONTROL_FLOOD
    g = guard(control=5)
    assert g.feed(PREFACE + DataFrame(1).serialize() * 6, 1.0) == CONTROL_FLOOD  # empty DATA
    assert guard(control=5).feed(PREFACE + DataFrame(1, flags=["END_STREAM"]).serialize() * 6, 1.0) is None


def test_window_updates_after_our_data_are_free() -> None:
    g = guard(control=2)
    g.data_sent(10)
    updates = WindowUpdateFrame(1, window_increment=100).serialize() * 20
    assert g.feed(PREFACE + updates, 1.0) is None
    assert g.feed(updates[:13] * 3, 1.0) == CONTROL_FLOOD  # unneeded ones count


def test_continuation_count_and_block_size() -> None:
    head = HeadersFrame(1, data=b"x").serialize()
    more = ContinuationFrame(1, data=b"y").serialize()
    assert guard(continuation=4).feed(PREFACE + head + more * 4, 1.0) is None
    assert guard(continuation=4).feed(PREFACE + head + more * 5, 1.0) == CONTINUATION_FLOOD
    big = ContinuationFrame(1, data=b"z" * 3000).serialize()
    assert guard(header_list=1000).feed(PREFACE + head + big * 2, 1.0) == HEADERS_TOO_LARGE
    done = ContinuationFrame(1, data=b"y", flags=["END_HEADERS"]).serialize()
    g = guard(continuation=4)
    assert g.feed(PREFACE + (head + more * 3 + done) * 5, 1.0) is None  # counted per header block

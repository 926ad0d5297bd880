"""Abuse accounting for one HTTP/2 client connection: counters over the raw frame headers.

Why here and not in the ``h2`` library: the known HTTP/2 attacks cost the server before any
event comes out of a state machine (a CONTINUATION flood is buffered until END_HEADERS, a
SETTINGS or PING flood is answered frame by frame, rapid resets start a request each). So the
guard reads the 9-byte header of every frame as the bytes arrive, before ``h2`` parses them,
and says which limit a connection broke; the server then sends GOAWAY and closes. Nothing here
does I/O or reads a clock: the caller passes ``now``.

Rates are token buckets (capacity = the per-second limit, refilled continuously), i.e. a sliding
second: a burst of ``limit`` frames is allowed, and ``limit`` per second sustained.
"""

from __future__ import annotations

from typing import Final

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types (RFC 9113 6)
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PING: Final = 0x6
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9
# flags
END_STREAM: Final = 0x1
ACK: Final = 0x1
END_HEADERS: Final = 0x4

# refusal reasons (``strangler_rejected_requests_total{reason}``)
RAPID_RESET: Final = "h2_rapid_reset"
CONTROL_FLOOD: Final = "h2_control_flood"
CONTINUATION_FLOOD: Final = "h2_continuation_flood"
HEADERS_TOO_LARGE: Final = "h2_headers_too_large"

# a compressed header block can be larger than its decoded list (Huffman codes up to 30 bits a
# byte): the raw block may reach this many times max_header_list_size before it is refused
BLOCK_SLACK: Final = 4


class Bucket:
    """A token bucket: ``take`` is False once more than ``rate`` events came in any second."""

    __slots__ = ("rate", "tokens", "last")

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = float(rate)
        self.last = 0.0

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.last) * self.rate
        self.last = now
        if tokens > self.rate:
            tokens = self.rate
        tokens -= 1.0
        self.tokens = tokens
        return tokens >= 0.0


class H2Guard:
    """One connection's counters. ``feed`` scans the frame headers in ``data`` (the preface is
    skipped) and returns the reason of the first limit broken, or None."""

    __slots__ = ("resets", "control", "max_continuation", "max_block", "_skip", "_head", "_in_block",
                 "_continuations", "_block_bytes", "_update_credit", "now")  # fmt: skip

    def __init__(
        self,
        max_resets_per_second: int,
        max_control_frames_per_second: int,
        max_continuation_frames: int,
        max_header_list_size: int,
        preface: bool = True,
    ) -> None:
        self.resets = Bucket(max_resets_per_second)
        self.control = Bucket(max_control_frames_per_second)
        self.max_continuation = max_continuation_frames
        self.max_block = max_header_list_size * BLOCK_SLACK
        self._skip = len(PREFACE) if preface else 0  # bytes to pass over (preface, payloads)
        self._head = b""  # a frame header split across two reads
        self._in_block = False  # a HEADERS without END_HEADERS was seen: CONTINUATIONs follow
        self._continuations = 0
        self._block_bytes = 0
        # WINDOW_UPDATEs the client may send for free: two per DATA frame we sent (one for the
        # stream, one for the connection); the rest count as control frames
        self._update_credit = 0
        self.now = 0.0

    def data_sent(self, frames: int) -> None:
        """We sent ``frames`` DATA frames: the client has reason to open its windows again."""
        credit = self._update_credit + 2 * frames
        self._update_credit = credit if credit < 1 << 20 else 1 << 20

    def reset(self, now: float) -> str | None:
        """A stream reset by the client, or refused by us (over the concurrency limit)."""
        return None if self.resets.take(now) else RAPID_RESET

    def feed(self, data: bytes, now: float) -> str | None:
        self.now = now
        size = len(data)
        at = 0
        while at < size:
            skip = self._skip
            if skip:
                taken = skip if skip < size - at else size - at
                self._skip = skip - taken
                at += taken
                continue
            if self._head:
                need = 9 - len(self._head)
                head = self._head + data[at : at + need]
                at += need
                if len(head) < 9:
                    self._head = head
                    return None
                self._head = b""
            elif size - at >= 9:
                head = data[at : at + 9]
                at += 9
            else:
                self._head = data[at:]
                return None
            length = head[0] << 16 | head[1] << 8 | head[2]
            reason = self._frame(length, head[3], head[4])
            if reason is not None:
                return reason
            self._skip = length
        return None

    def _frame(self, length: int, kind: int, flags: int) -> str | None:
        if kind == DATA:
            if length == 0 and not flags & END_STREAM and not self.control.take(self.now):
                return CONTROL_FLOOD
            return None
        if kind == HEADERS:
            if not flags & END_HEADERS:
                self._in_block = True
                self._continuations = 0
                self._block_bytes = length
                if length > self.max_block:
                    return HEADERS_TOO_LARGE
            return None
        if kind == CONTINUATION:
            if not self._in_block:
                return None  # h2 refuses it (PROTOCOL_ERROR)
            self._continuations += 1
            self._block_bytes += length
            if flags & END_HEADERS:
                self._in_block = False
            if self._continuations > self.max_continuation:
                return CONTINUATION_FLOOD
            if self._block_bytes > self.max_block:
                return HEADERS_TOO_LARGE
            return None
        if kind == RST_STREAM:
            return None if self.resets.take(self.now) else RAPID_RESET
        if kind == WINDOW_UPDATE:
            if self._update_credit > 0:
                self._update_credit -= 1
                return None
            return None if self.control.take(self.now) else CONTROL_FLOOD
        if kind == SETTINGS or kind == PING:
            if flags & ACK:
                return None
            return None if self.control.take(self.now) else CONTROL_FLOOD
        if kind == PRIORITY or kind > CONTINUATION:  # unknown extension frames are ignored: bounded too
            return None if self.control.take(self.now) else CONTROL_FLOOD
        return None

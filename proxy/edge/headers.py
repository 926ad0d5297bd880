"""Which header fields belong to one hop (RFC 9110 7.6.1) and never pass through a proxy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

HOP_BY_HOP: Final = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"expect", b"http2-settings",
    }
)  # fmt: skip
# headers a peer cannot make us drop by naming them in Connection
PROTECTED: Final = frozenset({b"host", b"content-length", b"content-type"})
# Connection values that name no other header: the common case, with nothing more to drop
PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})


def end_to_end(headers: Sequence[tuple[bytes, bytes]], strip: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """``headers`` (names lower-case) without those in ``strip`` and those named in Connection."""
    drop = strip
    for name, value in headers:
        if name == b"connection":
            lowered = value.lower()
            if lowered not in PLAIN_CONNECTION:
                named = {part.strip() for part in lowered.split(b",")} - PROTECTED
                drop = drop | named
    return [header for header in headers if header[0] not in drop]

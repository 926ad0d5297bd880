"""Pure gRPC helpers for the request path: what a gRPC call is, its deadline, its status, and the
metric label of its method. No I/O; every function takes bytes as they came off the wire and
never raises on a peer's bad value (a malformed header is reported, not thrown).

The wire rules are gRPC's PROTOCOL-HTTP2.md: ``content-type: application/grpc[+proto|;...]``,
``grpc-timeout: 1*8DIGIT unit`` (H M S m u n), ``grpc-status`` a decimal code in the trailers
(or in the headers of a trailers-only answer), and HTTP-status-to-code mapping for answers
without one (http-grpc-status-mapping.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

from proxy.settings import GRPC_STATUS_CODES

Headers = Sequence[tuple[bytes, bytes]]

OK: Final = 0
CANCELLED: Final = 1
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
INTERNAL: Final = 13
UNAVAILABLE: Final = 14
# the status recorded for the canary (and http_requests_total) when a call ends with an error code:
# a 5xx, so the existing error-rate rules judge gRPC calls with no change
ERROR_STATUS: Final = {"UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
DEFAULT_ERROR_STATUS: Final = 500
# http-grpc-status-mapping.md: an answer without grpc-status gets its code from the HTTP status
_HTTP_TO_CODE: Final = {400: INTERNAL, 401: 16, 403: 7, 404: 12, 429: UNAVAILABLE, 502: UNAVAILABLE,
                        503: UNAVAILABLE, 504: UNAVAILABLE}  # fmt: skip
_UNITS: Final = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_METHOD: Final = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]{0,200}/[A-Za-z_][A-Za-z0-9_]{0,100}")
OTHER: Final = "other"


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A gRPC call: its content-type is ``application/grpc`` or ``application/grpc+<codec>``
    (``application/grpc-web`` is another protocol and not one)."""
    for name, value in headers:
        if name == b"content-type":
            lowered = value.lower()
            if lowered.startswith(b"application/grpc"):
                rest = lowered[16:17]
                return rest in (b"", b"+", b";")
            return False
    return False


def parse_timeout(value: bytes) -> float | None:
    """``grpc-timeout`` in seconds, or None when malformed (1 to 8 digits and one unit)."""
    if not 2 <= len(value) <= 9:
        return None
    digits = value[:-1]
    unit = _UNITS.get(value[-1])
    if unit is None or not digits.isdigit():
        return None
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """A ``grpc-timeout`` value for ``seconds`` (at most 8 digits, the finest unit that fits;
    rounded up so a deadline is never made shorter than asked by more than a unit)."""
    seconds = max(seconds, 0.0)
    for unit, scale in ((b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        amount = int(seconds * scale) + (0 if (seconds * scale).is_integer() else 1)
        if amount < 100_000_000:
            return b"%d%s" % (amount, unit)
    return b"99999999H"


def status_of(headers: Headers) -> int | None:
    """The ``grpc-status`` in ``headers`` (trailers, or a trailers-only answer's headers), or None
    when absent. A malformed value (not a small decimal) is UNKNOWN, as gRPC clients treat it."""
    for name, value in headers:
        if name == b"grpc-status":
            if value.isdigit() and len(value) <= 3:
                return int(value)
            return UNKNOWN
    return None


def call_status(http_status: int, headers: Headers, trailers: Headers) -> int:
    """The gRPC status a call ended with: from its trailers, else from a trailers-only answer's
    headers, else derived from the HTTP status (a 200 without any grpc-status is UNKNOWN)."""
    code = status_of(trailers)
    if code is None:
        code = status_of(headers)
    if code is None:
        code = UNKNOWN if http_status == 200 else _HTTP_TO_CODE.get(http_status, UNKNOWN)
    return code


def code_name(code: int) -> str:
    """The metric label of a status code: its name, or ``UNKNOWN`` for a number gRPC does not define."""
    if 0 <= code < len(GRPC_STATUS_CODES):
        return GRPC_STATUS_CODES[code]
    return "UNKNOWN"


def recorded_status(http_status: int, name: str, errors: frozenset[str]) -> int:
    """The status the canary and the request metrics record for a call: a 5xx for a code in the
    configured error set (UNAVAILABLE 503, DEADLINE_EXCEEDED 504, any other 500), else the HTTP
    status of the answer (200 for every gRPC answer that reached its trailers)."""
    if name in errors:
        return ERROR_STATUS.get(name, DEFAULT_ERROR_STATUS)
    return http_status


class MethodLabels:
    """The ``grpc_method`` label of a call: ``package.Service/Method`` from its path, bounded to
    ``limit`` distinct values per process (a client inventing method names cannot grow the
    metrics); a path that is not a gRPC method name, or one past the bound, is ``other``."""

    __slots__ = ("_known", "_limit")

    def __init__(self, limit: int) -> None:
        self._known: dict[str, str] = {}
        self._limit = limit

    def label(self, path: str) -> str:
        known = self._known.get(path)
        if known is not None:
            return known
        if len(self._known) >= self._limit or _METHOD.fullmatch(path) is None:
            return OTHER
        label = self._known[path] = path[1:]
        return label


def trailers_only(code: int, message: str) -> list[tuple[bytes, bytes]]:
    """The headers of a trailers-only gRPC answer the proxy makes itself (status 200)."""
    return [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", message.encode("ascii", "replace")),
    ]

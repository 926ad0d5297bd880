"""One exception tree for upstream failures; ``upstream.py`` maps aiohttp's errors into it."""

from __future__ import annotations


class UpstreamError(Exception):
    """Something went wrong talking to a backend. ``kind`` is the metric label."""

    kind = "error"
    status = 502
    #: True when nothing of the request reached the backend, so another backend may take it.
    nothing_sent = False

    def __init__(self, version: str, detail: str) -> None:
        super().__init__(detail)
        self.version = version
        self.detail = detail


class UpstreamConnectError(UpstreamError):
    kind = "connect"
    nothing_sent = True


class UpstreamConnectTimeout(UpstreamError):
    kind = "connect_timeout"
    status = 504
    nothing_sent = True


class UpstreamTimeout(UpstreamError):
    kind = "timeout"
    status = 504


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"


class UpstreamReset(UpstreamError):
    """The backend went away mid-answer, after the client got the headers."""

    kind = "reset"

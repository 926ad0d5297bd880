"""One exception tree for upstream failures: the edge client raises these, one `except` maps them."""

from __future__ import annotations


class UpstreamError(Exception):
    """Something went wrong talking to a backend. ``kind`` is the metric label."""

    kind = "error"
    status = 502
    #: True when nothing of the request reached the backend, so another backend may take it.
    nothing_sent = False
    #: False when the failure is the proxy's own (pool exhausted): then not a version's error.
    blames_version = True

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


class UpstreamPoolTimeout(UpstreamError):
    """Every pooled connection to the backend stayed busy for the pool-wait bound.

    That is the proxy's own capacity, not the backend's fault: answered 503 and never counted
    against the version in the canary windows."""

    kind = "pool_timeout"
    status = 503
    nothing_sent = True
    blames_version = False


class UpstreamRefusedStream(UpstreamError):
    """The backend did not process the stream (REFUSED_STREAM, or above a GOAWAY's last stream
    id, RFC 9113 6.8 and 8.7): it may be sent again, or served by the other version."""

    kind = "refused_stream"
    nothing_sent = True


class H2NotNegotiated(UpstreamProtocolError):
    """A backend configured for h2 did not speak it (ALPN did not choose ``h2``, or no HTTP/2
    SETTINGS came back): nothing was sent, so v2 may fall back to v1."""

    nothing_sent = True

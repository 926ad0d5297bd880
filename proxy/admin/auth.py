"""Who may change things: a bearer token compared in constant time, or loopback when none is set."""

from __future__ import annotations

import hmac

from starlette.requests import Request

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return token.strip()


def is_loopback(request: Request) -> bool:
    client = request.client
    return client is not None and (client.host in LOOPBACK or client.host.startswith("127."))


def allowed(request: Request, token: str | None) -> bool:
    """With a token configured it must match; without one only loopback peers may change things."""
    if token is None:
        return is_loopback(request)
    given = _bearer(request)
    return given is not None and hmac.compare_digest(given.encode(), token.encode())

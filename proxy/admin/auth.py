"""Who may change things: the bearer token, compared in constant time. No peer address is trusted.

A TLS terminator or sidecar on the same host makes every client look like 127.0.0.1, so "loopback
may change things" would hand the split to anyone (see docs/security.md). The token is always
there: configured, or generated at first start (``proxy/admin/token.py``).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, token: str) -> bool:
    """Constant time in the token's content (hmac.compare_digest), so timing does not leak it."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def allowed(request: Request, token: str | None) -> bool:
    """The token must match; with none at all (an app built without one) nothing may change."""
    return token is not None and token_matches(bearer(request), token)

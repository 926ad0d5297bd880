"""Who may change things: a bearer token compared in constant time, or a trusted peer when none is set.

Trusted peers are a setting (``admin_trusted_peers``, default ``127.0.0.1`` and ``::1``), not "any
127.x address": that keeps the rule exact and lets a test connect from 127.0.0.2 to play an
untrusted peer without binding the proxy to a public address.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

DEFAULT_TRUSTED = ("127.0.0.1", "::1")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PeerPolicy:
    """The trusted peer networks, parsed once; ``trusts`` is a few integer comparisons."""

    def __init__(self, peers: Iterable[str] = DEFAULT_TRUSTED) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(p, strict=False) for p in peers)

    def trusts(self, host: str | None) -> bool:
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False  # unix sockets, "testclient" and other non-IP peers are not trusted
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


_DEFAULT_POLICY = PeerPolicy()


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(given: str | None, token: str) -> bool:
    """Constant time in the token's content (hmac.compare_digest), so timing does not leak it."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def allowed(request: Request, token: str | None, peers: PeerPolicy | None = None) -> bool:
    """With a token configured it must match; without one only trusted peers may change things."""
    if token is None:
        client = request.client
        return (peers or _DEFAULT_POLICY).trusts(client.host if client else None)
    return token_matches(bearer(request), token)

"""How a request ended: ``ProxyApp.finish`` records each the one right way. A module of its own so
the forwarding paths (``forward``, ``duplex``) share them without importing each other."""

from __future__ import annotations

from typing import Final

ANSWERED: Final = 0  # the version's answer reached the client whole (any status, a 101 included)
FAILED: Final = 1  # the version failed it: the proxy answered 502/504 (or relayed a refused upgrade)
CUT: Final = 2  # the version's answer broke off after its head was relayed: the connection is closed
PROXY_LIMIT: Final = 3  # the proxy's own limit (no pool slot free): answered 503, not the version's error
CLIENT_GONE_REQUEST: Final = 4  # the client left before the answer began
CLIENT_GONE_RESPONSE: Final = 5  # the client left while the answer was being written
CLIENT_FAULT: Final = 6  # the client's own fault (a body below the minimum rate): never the version's

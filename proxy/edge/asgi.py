"""The ASGI shapes the edge speaks when it hands a request to an ASGI app (the admin API), and the
one client-side failure every layer above the edge catches. Kept in ``edge/`` so the edge imports
nothing above it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected (while we read its body, or before its answer was complete)."""

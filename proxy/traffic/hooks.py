"""The small interfaces through which other capabilities plug into the request path.

``traffic/`` defines them and calls them; ``shadow/``, ``canary/`` and ``traffic/deprecation``
implement them; ``app.py`` wires them. Each has a do-nothing default so the proxy runs without them.
Every method here runs on the hot path: it must not block, log per request, or touch Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from proxy.control.snapshot import Snapshot

Headers = list[tuple[bytes, bytes]]


class Recorder(Protocol):
    """Told about every answered request (canary windows count them per group and version)."""

    def record(self, group: str, version: str, status: int, seconds: float) -> None: ...


@dataclass(slots=True)
class MirrorRequest:
    """What was sent upstream for the primary, enough to send it again to v2."""

    group: str
    method: str
    path: str  # decoded, normalised (for endpoint naming)
    raw_target: bytes  # raw path + query, byte for byte
    headers: list[tuple[bytes, bytes]]  # as sent upstream (X-Request-ID, Host included)
    body: bytes
    request_id: str


@dataclass(slots=True)
class PrimaryResult:
    """The primary (v1) answer as the client got it; ``body`` is None when over the compare limit."""

    status: int
    headers: Headers
    body: bytes | None
    seconds: float
    trailers: Headers | None = None  # an h2 answer's trailers (a gRPC call's status is there)


class Mirror(Protocol):
    """Shadow traffic. ``plan`` decides per request (sampling, method, size); ``submit`` enqueues."""

    def plan(self, group: str, method: str, content_length: int | None, snapshot: Snapshot) -> Any | None:
        """A truthy plan (with ``max_body`` and ``max_compare`` ints) to mirror, or None."""
        ...

    def submit(self, plan: Any, request: MirrorRequest, primary: PrimaryResult) -> None: ...

    def abandon(self, plan: Any, reason: str) -> None:
        """The primary could not be mirrored after all (body too large, primary failed)."""
        ...


@dataclass(frozen=True, slots=True)
class DeprecationAction:
    """Either answer now (``gone`` body) or add ``headers`` to the normal answer."""

    rule: str
    headers: Headers
    gone_body: bytes | None = None


class Deprecations(Protocol):
    def check(self, method: str, path: str, snapshot: Snapshot) -> DeprecationAction | None: ...


class NoMirror:
    def plan(self, group: str, method: str, content_length: int | None, snapshot: Snapshot) -> None:
        return None

    def submit(self, plan: Any, request: MirrorRequest, primary: PrimaryResult) -> None:
        return None

    def abandon(self, plan: Any, reason: str) -> None:
        return None


class NoDeprecations:
    def check(self, method: str, path: str, snapshot: Snapshot) -> None:
        return None

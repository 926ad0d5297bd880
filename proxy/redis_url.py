"""What a ``redis_url`` names: plain Redis, Sentinel, or Cluster, parsed without connecting.

A leaf (it imports nothing of ours and no Redis client), so settings can check a URL at load time
and ``control/connect.py`` can build the client from the parts. Grammars:

- ``redis://`` / ``rediss://`` / ``unix://``: left to ``Redis.from_url`` (the scheme and the port
  checked here); any other scheme is refused.
- ``redis+sentinel://[user:pass@]host1:26379,host2:26379/<db>/<master-name>`` (the grammar
  python-socketio and redisvl use).
- ``redis+cluster://host:port[,host:port]``.

Bad URLs raise ``ValueError`` with one line saying what is expected (settings turns it into a
config error). Passwords never appear in messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL, CLUSTER, PLAIN = "redis+sentinel", "redis+cluster", "plain"
SENTINEL_FORM = "redis+sentinel://[user:pass@]host:26379[,host:port...]/<db>/<master-name>"
CLUSTER_FORM = "redis+cluster://[user:pass@]host:port[,host:port...]"


@dataclass(frozen=True)
class Target:
    kind: str
    nodes: list[tuple[str, int]] = field(default_factory=list)
    db: int = 0
    master: str = ""
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


PLAIN_SCHEMES = ("redis", "rediss", "unix")
ANY_FORM = "redis://[user:pass@]host:port/db, rediss://..., unix:///path, redis+sentinel://... or redis+cluster://..."


def shown(url: str) -> str:
    """``url`` for a message: whatever stands before an ``@`` (a password, perhaps) masked."""
    head, sep, tail = url.rpartition("@")
    if not sep:
        return url
    scheme, colon, _ = head.partition("://")
    return f"{scheme}://***@{tail}" if colon else f"***@{tail}"


def parse(url: str) -> Target:
    """Which kind of Redis ``url`` names, and its parts (plain URLs are left to redis-py, once their
    scheme and port are known to be right)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in PLAIN_SCHEMES:
        try:
            urlsplit(url).port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ValueError(f"{shown(url)!r}: the port must be a number from 0 to 65535") from None
        return Target(PLAIN)
    if scheme not in (SENTINEL, CLUSTER):
        raise ValueError(f"{shown(url)!r} is not a Redis URL; expected {ANY_FORM}")
    parts = urlsplit(url)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        creds, netloc = netloc.rsplit("@", 1)
        user, _, secret = creds.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) or None)
    form = SENTINEL_FORM if scheme == SENTINEL else CLUSTER_FORM
    nodes = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{item.strip() or '(empty)'!r} is not host:port; expected {form}")
        nodes.append((host.strip("[]"), int(port)))
    query = parse_qs(parts.query)
    if scheme == CLUSTER:
        if parts.path.strip("/"):
            raise ValueError(f"a cluster has no database or master name; expected {form}")
        return Target(CLUSTER, nodes, username=username, password=password)
    path = [p for p in parts.path.split("/") if p]
    if len(path) != 2 or not path[0].isdigit():
        raise ValueError(f"give the database and the master name; expected {form}")
    sentinel_password = (query.get("sentinel_password") or [""])[0] or None
    return Target(SENTINEL, nodes, int(path[0]), unquote(path[1]), username, password, sentinel_password)


def check(url: str) -> None:
    """Validate at settings load: raises ValueError for a malformed Sentinel/Cluster URL."""
    parse(url)


def is_cluster(url: str | None) -> bool:
    return bool(url) and parse(url or "").kind == CLUSTER


def describe(url: str) -> str:
    """The URL without credentials, for logs and messages (never raises)."""
    try:
        target = parse(url)
    except ValueError:
        return shown(url)
    if target.kind == PLAIN:
        parts = urlsplit(url)
        if not parts.hostname:  # unix:///path/to/socket
            return f"{parts.scheme}://{parts.path}"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"
    nodes = ",".join(f"{h}:{p}" for h, p in target.nodes)
    tail = f"/{target.db}/{target.master}" if target.kind == SENTINEL else ""
    return f"{target.kind}://{nodes}{tail}"

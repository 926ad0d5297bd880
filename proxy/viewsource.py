"""Where a view's JSON document was read: its ``source`` field, the one field in which the CLI's
Redis path and its admin API path (``--url``) differ for the same state (docs/schemas/*.json).

A leaf, so every capability's commands can stamp their documents (``proxy.shadow`` may not import
``proxy.admin``, where most views are built)."""

from __future__ import annotations

REDIS = "redis"
ADMIN_API = "admin_api"


def source(path: str, url: str) -> dict[str, str]:
    return {"path": path, "url": url}

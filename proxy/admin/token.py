"""The admin token: configured, or generated at first start and kept in a file only the owner reads.

Why not trust loopback peers instead: a TLS terminator or sidecar on the same host makes every
client arrive from 127.0.0.1. So every change through the admin API needs the token, and the
quick start still needs no step: `strangler serve` writes a generated token to
``admin_token_file`` (mode 0600) and the local CLI reads it from there.
"""

from __future__ import annotations

import os
import secrets

from pydantic import SecretStr

from proxy.settings import Settings, read_admin_token


def ensure_admin_token(settings: Settings) -> Settings:
    """Settings with an admin token: the configured one, else the file's, else a new one saved there."""
    if settings.admin_token is not None:
        return settings
    path = settings.admin_token_file
    token = read_admin_token(path)
    if token is None:
        token = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
    return settings.model_copy(update={"admin_token": SecretStr(token)})

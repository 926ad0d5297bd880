"""Request bodies read with a ceiling, for the admin routes a sender outside our control posts to
(Alertmanager, Slack): a declared or streamed size past the limit stops the read, so a huge body
is refused without ever being held in memory."""

from __future__ import annotations

from starlette.requests import Request


class BodyTooLarge(Exception):
    """The body is (or declares itself) larger than the limit; nothing more of it was read."""


async def capped_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)

"""One bounded GET for a gate: no redirects, a capped body, a deadline, JSON or a one-line reason.

Errors become ``Inconclusive`` with a reason built from the status code or the exception's type
only: httpx's messages carry the URL (and so a query's tokens or the address's credentials).
``Accept-Encoding: identity`` keeps the cap honest (a small gzip answer cannot inflate past it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import httpx

from proxy.canary.gates.result import Inconclusive

MAX_BODY_BYTES = 1 << 20


async def get_json(
    client: httpx.AsyncClient,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    max_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """The parsed JSON answer of ``GET url``; raises Inconclusive for anything else."""
    sent = {"Accept": "application/json", "Accept-Encoding": "identity", **(headers or {})}
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("GET", url, params=params, headers=sent) as response:
                status = response.status_code
                if 300 <= status < 400:
                    raise Inconclusive(f"answered HTTP {status} (redirects are not followed)")
                if not 200 <= status < 300:
                    raise Inconclusive(f"answered HTTP {status}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise Inconclusive(f"answer too large (over {max_bytes} bytes)")
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > max_bytes:
                        raise Inconclusive(f"answer too large (over {max_bytes} bytes)")
    except TimeoutError:
        raise Inconclusive(f"no answer within {timeout:g}s") from None
    except httpx.HTTPError as exc:
        raise Inconclusive(f"unreachable ({type(exc).__name__})") from None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise Inconclusive("answer is not JSON") from None

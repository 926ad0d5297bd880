"""build_admin in process (real Redis, no server): how capability routes are guarded and documented."""

from __future__ import annotations

import asyncio

import httpx
import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.app import AdminContext, PrefixMount, build_admin
from proxy.control.client import ControlClient
from proxy.control.keys import Keys
from proxy.control.store import ControlStore
from proxy.metrics import Metrics
from proxy.settings import Settings


async def thing(request: Request) -> Response:
    """A capability's route that reads on GET and changes on POST."""
    return JSONResponse({"method": request.method})


def test_capability_routes_are_guarded_per_method_and_documented(redis_url: str) -> None:
    async def scenario() -> None:
        settings = Settings(redis_url=redis_url, admin_token="tok")
        redis = aioredis.Redis.from_url(redis_url)
        metrics = Metrics()
        store = ControlStore(settings, redis, metrics)
        ctx = AdminContext(settings, store, metrics, redis, ControlClient(redis, Keys()))
        app = PrefixMount("/_strangler", build_admin(ctx, [Route("/thing", thing, methods=["GET", "POST"])]))
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy/_strangler") as client:
            assert (await client.get("/thing")).json() == {"method": "GET"}
            assert (await client.head("/thing")).status_code == 200
            denied = await client.post("/thing")
            assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"
            allowed = await client.post("/thing", headers={"Authorization": "Bearer tok"})
            assert allowed.json() == {"method": "POST"}
            doc = (await client.get("/openapi.json")).json()["paths"]["/_strangler/thing"]
            assert "security" not in doc["get"] and doc["post"]["security"] == [{"bearer": []}]
            assert doc["post"]["summary"].startswith("A capability's route")
        await redis.aclose()

    asyncio.run(scenario())

"""The demo's sample backends: one small "tasks" API, answered by v1 and by a slightly different v2.

The differences are the ones real migrations have, so the shadow report and the dashboards have
something to show:
- ``GET /api/tasks/{id}``: v2 renamed ``owner`` to ``assignee`` (a real diff, reported per field);
- every task in v2 carries a new ``updated_at`` timestamp (an added field);
- ``GET /api/stats`` is slower in v2 (a latency difference, visible per version in p95);
- ``/api/v0/tasks`` is the legacy listing both versions still serve (the demo deprecates it).
Run one alone with ``python -m proxy.demo.tasks --version v2 --port 8002`` (docker compose does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import zlib
from importlib import resources
from typing import Any

from aiohttp import web

SLOW_STATS_SECONDS = {"v1": 0.005, "v2": 0.12}


def seed() -> list[dict[str, Any]]:
    return list(json.loads(resources.files("proxy.demo").joinpath("tasks.json").read_text()))


def build_tasks_app(version: str) -> web.Application:
    """An aiohttp app; state is per app (in memory), so v1 and v2 can run in one process."""
    tasks: dict[int, dict[str, Any]] = {task["id"]: task for task in seed()}
    started = time.time()

    def shape(task: dict[str, Any], detail: bool = False) -> dict[str, Any]:
        out = dict(task)
        if version == "v2":
            out["updated_at"] = round(started + task["id"] * 60.0, 3)  # new field in v2
            if detail:
                out["assignee"] = out.pop("owner")  # renamed in v2, on the detail endpoint only
        return out

    async def list_tasks(request: web.Request) -> web.Response:
        items = [shape(task) for task in sorted(tasks.values(), key=lambda t: t["id"])]
        if request.query.get("done") in ("true", "false"):
            wanted = request.query["done"] == "true"
            items = [task for task in items if task["done"] is wanted]
        return web.json_response({"tasks": items, "count": len(items)})

    async def get_task(request: web.Request) -> web.Response:
        try:
            task = tasks[int(request.match_info["id"])]
        except (KeyError, ValueError):
            return web.json_response({"error": "task not found"}, status=404)
        return web.json_response(shape(task, detail=True))

    async def create_task(request: web.Request) -> web.Response:
        """Accepts and echoes the task without storing it: v1 and v2 would share a database in a
        real migration; here, keeping the data fixed keeps the shadow report about real diffs."""
        try:
            body = await request.json()
            title = str(body["title"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "body must be JSON with a title"}, status=422)
        new_id = 1000 + zlib.crc32(title.encode()) % 100000
        task = {"id": new_id, "title": title, "done": False, "owner": str(body.get("owner", "demo"))}
        return web.json_response(shape({**task, "priority": "low"}, detail=True), status=201)

    async def stats(request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_STATS_SECONDS.get(version, 0.0))
        done = sum(1 for task in tasks.values() if task["done"])
        return web.json_response({"total": len(tasks), "done": done, "open": len(tasks) - done})

    async def legacy(request: web.Request) -> web.Response:
        items = [{"id": t["id"], "name": t["title"]} for t in tasks.values()]
        return web.json_response({"items": items})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": version})

    app = web.Application()
    app.router.add_get("/api/tasks", list_tasks)
    app.router.add_post("/api/tasks", create_task)
    app.router.add_get("/api/tasks/{id}", get_task)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/api/v0/tasks", legacy)
    app.router.add_get("/api/v0/export", legacy)
    app.router.add_get("/health", health)
    return app


async def start_backend(version: str, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start one backend on ``port`` (0 = any free port); returns the runner and the real port."""
    runner = web.AppRunner(build_tasks_app(version), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None)
    assert sockets, "the backend did not bind"
    return runner, int(sockets[0].getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Strangler demo backend (tasks API)")
    parser.add_argument("--version", choices=["v1", "v2"], default="v1")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    web.run_app(build_tasks_app(args.version), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()

"""Shadow's admin routes (non-GET routes need the admin token):
``GET /diffs`` (``?endpoint=E`` for one endpoint), ``POST /diffs/reset``, ``GET /shadow``,
``PUT /shadow`` (``{"enabled": true, "sample_percentage": 5, "group": "orders", ...}``),
``GET /shadow/rules``, ``PUT /shadow/rules`` and ``DELETE /shadow/rules`` (``{"kind", "endpoint", "value"}``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.app import error, json_body
from proxy.control.client import InvalidValue
from proxy.control.store import ControlStore
from proxy.shadow.control import ShadowControl
from proxy.shadow.mirror import ShadowMirror
from proxy.shadow.policy import RULES_SECTION, SECTION
from proxy.shadow.report import ReportStore

SETTABLE = ("enabled", "sample_percentage", "methods", "max_body_bytes", "compare_max_bytes",
            "calibration_percentage")  # fmt: skip


def routes(
    store: ControlStore, report: ReportStore, control: ShadowControl, mirror: ShadowMirror
) -> list[Route]:
    async def get_diffs(request: Request) -> Response:
        """Shadow diff report: endpoints worst first (?endpoint=E: fields and samples of one)."""
        endpoint = request.query_params.get("endpoint")
        if endpoint:
            detail = await report.endpoint(endpoint)
            if detail is None:
                return error(404, "unknown endpoint", endpoint=endpoint)
            return JSONResponse(detail)
        return JSONResponse(await report.summary())

    async def reset_diffs(request: Request) -> Response:
        """Clear the diff report for all replicas ({"forget_noise": true} clears learnt noise too)."""
        body = await json_body(request, allow_empty=True)
        deleted = await report.reset(forget_noise=bool(body.get("forget_noise")))
        return JSONResponse({"reset": True, "keys_deleted": deleted})

    async def get_shadow(request: Request) -> Response:
        """Shadow settings: stored in Redis, in force on this replica, rejected values, rules."""
        status = await control.status()
        snapshot = store.current.section(SECTION)
        status["in_force"] = (
            {name: gp.summary() for name, gp in snapshot.groups.items()} if snapshot is not None else None
        )
        rules = store.current.section(RULES_SECTION)
        in_force = rules.rules if rules is not None else ()
        status["rules_in_force"] = [
            {"kind": r.kind, "endpoint": r.endpoint, "value": r.value, "source": r.source} for r in in_force
        ]
        status["queue_depth"] = mirror.queue_depth
        status["buffered_bytes"] = mirror.buffered_bytes
        status["report_epoch"] = mirror.epoch
        status["noise_in_force"] = mirror.noise_counts()
        status["pending"] = mirror.pending()  # endpoint -> comparisons waiting for its calibration
        return JSONResponse(status)

    async def put_shadow(request: Request) -> Response:
        """Change shadow settings live (fields as in strangler:shadow; "group" for one group)."""
        body = await json_body(request)
        group = body.pop("group", None)
        unknown = set(body) - set(SETTABLE)
        if unknown:
            return error(422, "unknown fields", fields=sorted(unknown), settable=list(SETTABLE))
        try:
            written = await control.set(body, group)
        except InvalidValue as exc:
            return error(422, "invalid shadow setting", detail=str(exc))
        return JSONResponse({"written": written})

    async def change_rule(request: Request) -> Response:
        """Add (PUT) or remove (DELETE) an ignore rule {"kind", "endpoint", "value"}."""
        body = await json_body(request)
        args = (str(body.get("kind", "")), body.get("endpoint"), body.get("value"))
        try:
            if request.method == "DELETE":
                removed = await control.remove_rule(*args)
                return JSONResponse({"removed": removed}, status_code=200 if removed else 404)
            return JSONResponse({"added": await control.add_rule(*args)})
        except InvalidValue as exc:
            return error(422, "invalid rule", detail=str(exc))

    async def get_rules(request: Request) -> Response:
        """Ignore rules: from the config file and from Redis."""
        return JSONResponse({"rules": await control.rules()})

    return [
        Route("/diffs", get_diffs, methods=["GET"]),
        Route("/diffs/reset", reset_diffs, methods=["POST"]),
        Route("/shadow", get_shadow, methods=["GET"]),
        Route("/shadow", put_shadow, methods=["PUT"]),
        Route("/shadow/rules", get_rules, methods=["GET"]),
        Route("/shadow/rules", change_rule, methods=["PUT", "DELETE"]),
    ]

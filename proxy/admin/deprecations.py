"""The deprecation admin routes: ``GET /deprecations``, ``PUT``/``DELETE /deprecations/{name}``.

The hook and its Redis section are ``traffic.deprecation.DeprecationRules``; these routes live in
``admin/`` so that ``traffic/`` never imports Starlette. The admin app guards them (writes need the
token) like its own routes.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin import views
from proxy.admin.app import error, here
from proxy.control.client import ControlClient
from proxy.control.store import ControlStore
from proxy.traffic.deprecation import SECTION, DeprecationRules, InvalidOverride, parse_override

log = logging.getLogger("strangler.deprecation")


def routes(rules: DeprecationRules, store: ControlStore, control: ControlClient) -> list[Route]:
    """GET /deprecations, PUT/DELETE /deprecations/{name}."""

    def listing(url: str) -> dict[str, Any]:
        rules_ = rules.describe(store.current.section(SECTION))
        return views.deprecations_document(
            views.source(views.ADMIN_API, url), control.keys.hash(SECTION), rules_
        )

    async def list_rules(request: Request) -> Response:
        """Deprecation rules in force (config + live overrides) with this proxy's hit counts per
        phase (this process and its workers; fleet totals are in Prometheus)."""
        return JSONResponse(listing(here(request)))

    async def put_rule(request: Request) -> Response:
        """Override a rule live: {"phase": "gone"} or any rule fields (a new name defines a rule)."""
        name = request.path_params["name"]
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error(400, "body must be a JSON object", example={"phase": "gone"})
        if not isinstance(body, dict) or not body:
            return error(400, "body must be a non-empty JSON object", example={"phase": "gone"})
        raw = body["phase"] if set(body) == {"phase"} and isinstance(body["phase"], str) else None
        raw = raw if raw is not None else orjson.dumps(body).decode()
        try:
            parse_override(name, raw, rules.configured)
        except InvalidOverride as exc:
            return error(422, "invalid deprecation override", detail=str(exc))
        await control.set_hash_fields(SECTION, {name: raw})
        await store.refresh()
        log.info("deprecation rule %s overridden through the admin API: %s", name, raw)
        return JSONResponse(
            views.override_document(views.source(views.ADMIN_API, here(request)), name, raw, True)
        )

    async def delete_rule(request: Request) -> Response:
        """Drop a rule's live override (a configured rule goes back to its config values); a rule
        this proxy does not know and Redis holds no override for is a 404."""
        name = request.path_params["name"]
        current = await control.get_hash(SECTION)
        where = views.source(views.ADMIN_API, here(request))
        if name not in current:
            if name not in rules.configured:
                return error(
                    404,
                    "unknown deprecation rule",
                    detail=f"{name!r}: not configured on this proxy, no live override in Redis",
                )
            return JSONResponse(views.override_document(where, name, None, False))
        await control.set_hash_fields(SECTION, {name: None})
        await store.refresh()
        log.info("deprecation override for %s removed through the admin API", name)
        return JSONResponse(views.override_document(where, name, None, True))

    return [
        Route("/deprecations", list_rules, methods=["GET"]),
        Route("/deprecations/{name}", put_rule, methods=["PUT"]),
        Route("/deprecations/{name}", delete_rule, methods=["DELETE"]),
    ]

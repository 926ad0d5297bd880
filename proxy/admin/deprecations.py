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

from proxy.admin.app import error
from proxy.control.client import ControlClient
from proxy.control.store import ControlStore
from proxy.traffic.deprecation import SECTION, DeprecationRules, InvalidOverride, parse_override

log = logging.getLogger("strangler.deprecation")


def routes(rules: DeprecationRules, store: ControlStore, control: ControlClient) -> list[Route]:
    """GET /deprecations, PUT/DELETE /deprecations/{name}."""

    def listing() -> dict[str, Any]:
        return {
            "rules": rules.describe(store.current.section(SECTION)),
            "redis_key": control.keys.hash(SECTION),
            "counts_scope": "this proxy process (all its workers); fleet totals are in Prometheus",
        }

    async def list_rules(request: Request) -> Response:
        """Deprecation rules in force (config + live overrides) with hit counts per phase."""
        return JSONResponse(listing())

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
            {"name": name, "override": raw, "rules": listing()["rules"]},
        )

    async def delete_rule(request: Request) -> Response:
        """Drop a rule's live override (a configured rule goes back to its config values)."""
        name = request.path_params["name"]
        current = await control.get_hash(SECTION)
        if name not in current:
            return error(404, "no live override for this rule", name=name)
        await control.set_hash_fields(SECTION, {name: None})
        await store.refresh()
        log.info("deprecation override for %s removed through the admin API", name)
        return JSONResponse({"name": name, "override": None, "rules": listing()["rules"]})

    return [
        Route("/deprecations", list_rules, methods=["GET"]),
        Route("/deprecations/{name}", put_rule, methods=["PUT"]),
        Route("/deprecations/{name}", delete_rule, methods=["DELETE"]),
    ]

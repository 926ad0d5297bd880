"""A hand-written OpenAPI 3.1 document for the admin API, built once from the route table.

Hand-written rather than Starlette's SchemaGenerator (which wants YAML in every docstring): each
route contributes its path, methods, first docstring line and whether it needs the token, so
routes the capabilities add (shadow, rollout, deprecations) appear without extra work; the
request bodies we know are described here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.settings import Settings

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what went wrong, in plain words"},
        "detail": {"type": "string"},
    },
}

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/split", "put"): {
        "type": "object",
        "required": ["percentage"],
        "properties": {
            "percentage": {"type": "number", "minimum": 0, "maximum": 100},
            "group": {"type": "string", "default": "default"},
        },
    },
    ("/rollback", "post"): {
        "type": "object",
        "properties": {"group": {"type": "string", "default": "default"}},
    },
    ("/alerts/alertmanager", "post"): {
        "type": "object",
        "description": "Alertmanager's webhook payload (version 4); other fields are ignored. A firing "
        "alert whose labels name a route group (canary.alert_group_label, default strangler_group) "
        "rolls that group back to 0% v2; resolved alerts change nothing.",
        "required": ["alerts"],
        "properties": {
            "version": {"type": "string", "const": "4"},
            "status": {"type": "string", "enum": ["firing", "resolved"]},
            "alerts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["status", "labels"],
                    "properties": {
                        "status": {"type": "string", "enum": ["firing", "resolved"]},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        "startsAt": {"type": "string", "format": "date-time"},
                        "fingerprint": {"type": "string"},
                    },
                },
            },
        },
    },
    ("/deprecations/{name}", "put"): {
        "type": "object",
        "description": 'either {"phase": ...} or rule fields (a name not configured defines a new rule)',
        "properties": {
            "phase": {"type": "string", "enum": ["auto", "warn", "gone", "off"]},
            "pattern": {"type": "string"},
            "methods": {"type": "array", "items": {"type": "string"}},
            "deprecated_at": {"type": "string", "description": "ISO 8601 date or datetime"},
            "sunset_at": {"type": "string", "description": "ISO 8601 date or datetime"},
            "migration_guide": {"type": "string", "format": "uri"},
            "replacement": {"type": "string"},
        },
    },
}
BODIES[("/split", "post")] = BODIES[("/split", "put")]
BODIES[("/rollout/approve", "post")] = {
    "type": "object",
    "description": "approve the current approval hold (a ladder step written N!)",
    "properties": {
        "group": {"type": "string", "default": "default"},
        "by": {"type": "string", "maxLength": 100, "description": "who approves (recorded)"},
        "hold_id": {"type": "integer", "description": "refused unless it is the current hold"},
    },
}
BODIES[("/rollout/start", "post")] = {
    "type": "object",
    "properties": {
        "group": {"type": "string", "default": "default"},
        "steps": {
            "description": 'ladder, e.g. [1, 5, "25!", 100] or "1,5,25!,100" (25!: approval step)',
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"oneOf": [{"type": "number"}, {"type": "string"}]}},
            ],
        },
        "interval": {"type": "string", "description": "hold per step, e.g. 30s, 5m"},
    },
}
SIGNED_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/slack/interactions", "post"): {
        "type": "object",
        "description": (
            "Slack's interactive payload (application/x-www-form-urlencoded, field payload: JSON "
            "with the strangler_approve action); verified with X-Slack-Signature and "
            "X-Slack-Request-Timestamp (5 minutes at most), not the admin token"
        ),
        "required": ["payload"],
        "properties": {"payload": {"type": "string"}},
    },
}


@dataclass(frozen=True, slots=True)
class RouteDoc:
    path: str
    methods: list[str]
    doc: str
    write: bool
    protected: bool


def _summary(doc: str) -> str:
    return doc.strip().splitlines()[0] if doc.strip() else ""


def openapi_document(settings: Settings, routes: list[RouteDoc]) -> dict[str, Any]:
    prefix = settings.admin_prefix
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        item = paths.setdefault(prefix + route.path, {})
        params = re.findall(r"{(\w+)}", route.path)
        for method in route.methods:
            lower = method.lower()
            if lower == "head":
                continue
            operation: dict[str, Any] = {
                "summary": _summary(route.doc) or f"{method} {prefix}{route.path}",
                "operationId": lower + "_" + re.sub(r"[^A-Za-z0-9]+", "_", route.path).strip("_"),
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {}}},
                    "default": {
                        "description": "error",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    },
                },
            }
            if route.path == "/metrics":
                operation["responses"]["200"] = {"description": "OK", "content": {"text/plain": {}}}
            if params:
                operation["parameters"] = [
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in params
                ]
            body = BODIES.get((route.path, lower))
            if body is not None:
                operation["requestBody"] = {
                    "required": route.path not in ("/rollback", "/rollout/start"),
                    "content": {"application/json": {"schema": body}},
                }
            signed = SIGNED_BODIES.get((route.path, lower))
            if signed is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": {"application/x-www-form-urlencoded": {"schema": signed}},
                }
                operation["security"] = []  # Slack's signature, checked by the handler
            if route.protected:
                operation["security"] = [{"bearer": []}]
                operation["responses"]["401"] = {
                    "description": "missing or wrong token",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
            item[lower] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Strangler admin API",
            "version": "1",
            "description": (
                "Control the v1 -> v2 migration. Changes need `Authorization: Bearer <token>` from "
                "every peer; without a configured token, `strangler serve` generates one in admin_token_file."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

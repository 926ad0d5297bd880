"""Reading and changing the live shadow settings and ignore rules; shared by the CLI and admin API.

Every write is validated with the same parsers the proxies use, then goes through
``ControlClient.set_hash_fields`` which publishes the change so every replica refreshes at once.
"""

from __future__ import annotations

from typing import Any

from proxy.control.client import ControlClient, InvalidValue
from proxy.settings import Settings
from proxy.shadow.policy import (
    GROUP_FIELDS,
    RULES_SECTION,
    SECTION,
    config_rules,
    make_policy_parser,
    make_rule,
    make_rules_parser,
    parse_rule_field,
    validate_fields,
)


class ShadowControl:
    def __init__(self, control: ControlClient, settings: Settings) -> None:
        self.control = control
        self.settings = settings

    def field_names(self, values: dict[str, Any], group: str | None) -> dict[str, Any]:
        """``{"sample_percentage": 5}`` + group -> ``{"group:<g>:sample_percentage": 5}``; None = global."""
        if group is None:
            return dict(values)
        if group not in self.settings.group_names:
            raise InvalidValue(f"unknown group {group!r}; configured: {', '.join(self.settings.group_names)}")
        out = {}
        for name, value in values.items():
            if name not in GROUP_FIELDS:
                raise InvalidValue(f"{name} cannot be set per group (per group: {', '.join(GROUP_FIELDS)})")
            out[f"group:{group}:{name}"] = value
        return out

    async def set(self, values: dict[str, Any], group: str | None = None) -> dict[str, str | None]:
        """Validate and write; None removes a field (back to the config default)."""
        fields = self.field_names(values, group)
        try:
            checked = validate_fields(fields, self.settings.group_names)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from exc
        if checked:
            await self.control.set_hash_fields(SECTION, checked)
        return checked

    async def status(self) -> dict[str, Any]:
        """Effective settings per group as a proxy would parse the hash now, plus what was rejected."""
        raw = await self.control.get_hash(SECTION)
        policy, problems = make_policy_parser(self.settings)(raw, None)
        rules = await self.rules()
        return {
            "redis": raw,
            "problems": problems,
            "groups": {name: gp.summary() for name, gp in policy.groups.items()},
            "rules": rules,
        }

    async def rules(self) -> list[dict[str, Any]]:
        raw = await self.control.get_hash(RULES_SECTION)
        ruleset, _ = make_rules_parser(self.settings)(raw, None)
        out = [
            {"kind": r.kind, "endpoint": r.endpoint, "value": r.value, "source": r.source}
            for r in ruleset.rules
        ]
        for name in raw:
            try:
                parse_rule_field(name)
            except ValueError as exc:
                out.append({"kind": "invalid", "endpoint": "", "value": name, "source": f"redis: {exc}"})
        return out

    async def add_rule(self, kind: str, endpoint: str | None, value: Any) -> dict[str, str]:
        try:
            rule = make_rule(kind, endpoint, value)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from exc
        await self.control.set_hash_fields(RULES_SECTION, {rule.key: "1"})
        return {"kind": rule.kind, "endpoint": rule.endpoint, "value": rule.value}

    async def remove_rule(self, kind: str, endpoint: str | None, value: Any) -> bool:
        try:
            rule = make_rule(kind, endpoint, value)
        except ValueError as exc:
            raise InvalidValue(str(exc)) from exc
        if any(r.key == rule.key for r in config_rules(self.settings.shadow)):
            raise InvalidValue("that rule comes from the config file; change it there")
        existing = await self.control.get_hash(RULES_SECTION)
        if rule.key not in existing:
            return False
        await self.control.set_hash_fields(RULES_SECTION, {rule.key: None})
        return True

"""Every Redis key and channel name, derived from settings in one place (the README lists them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names; ``split_key`` is kept outside the prefix because users' tooling already sets it."""

    split_key: str = "feature:v2_traffic_percentage"
    prefix: str = "strangler:"

    def split(self, group: str | None = None) -> str:
        """The global split key, or a route group's override key."""
        if group is None or group == "default":
            return self.split_key
        return f"{self.split_key}:{group}"

    @property
    def changes_channel(self) -> str:
        """Pub/sub channel every writer publishes on so replicas refresh at once."""
        return f"{self.prefix}changes"

    @property
    def groups(self) -> str:
        """Hash of the route groups running proxies know, and the share each serves (JSON per group)."""
        return f"{self.prefix}groups"

    def hash(self, name: str) -> str:
        """A control hash owned by one capability, e.g. ``strangler:shadow``."""
        return f"{self.prefix}{name}"

    def under(self, *parts: str) -> str:
        """Any other key under the prefix, e.g. ``strangler:rollout:default``."""
        return self.prefix + ":".join(parts)

    @property
    def epoch(self) -> str:
        """Written once when a Redis is first used; if it vanishes or changes, Redis lost its data."""
        return f"{self.prefix}epoch"

    @property
    def lost_state(self) -> str:
        """The record of a detected data loss (JSON), until someone sets a split by hand."""
        return f"{self.prefix}control:lost"

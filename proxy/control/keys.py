"""Every Redis key and channel name, derived from settings in one place (the README lists them).

On Redis Cluster (``cluster=True``) every key shares one hash slot, so MULTI/WATCH transactions, Lua
scripts and MGETs over several keys never fail with CROSSSLOT: the global split key stays plain
(``feature:v2_traffic_percentage``, so the seed's tooling keeps working), and every other key carries
that name as its hash tag: ``feature:v2_traffic_percentage:<group>`` becomes
``{feature:v2_traffic_percentage}:<group>`` and ``strangler:<rest>`` becomes
``strangler:{feature:v2_traffic_percentage}:<rest>``. The control state is small; one slot (one
master) holds it all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.settings import Settings


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names; ``split_key`` is kept outside the prefix because users' tooling already sets it."""

    split_key: str = "feature:v2_traffic_percentage"
    prefix: str = "strangler:"
    cluster: bool = False

    @classmethod
    def for_settings(cls, settings: Settings) -> Keys:
        from proxy.control.connect import is_cluster

        return cls(settings.split_key, settings.key_prefix, is_cluster(settings.redis_url))

    @property
    def _prefix(self) -> str:
        return f"{self.prefix}{{{self.split_key}}}:" if self.cluster else self.prefix

    @property
    def group_split_prefix(self) -> str:
        """What every group's split key starts with (for SCAN)."""
        return f"{{{self.split_key}}}:" if self.cluster else f"{self.split_key}:"

    def split(self, group: str | None = None) -> str:
        """The global split key, or a route group's override key."""
        if group is None or group == "default":
            return self.split_key
        return f"{self.group_split_prefix}{group}"

    @property
    def changes_channel(self) -> str:
        """Pub/sub channel every writer publishes on so replicas refresh at once."""
        return f"{self._prefix}changes"

    @property
    def groups(self) -> str:
        """Hash of the route groups running proxies know, and the share each serves (JSON per group)."""
        return f"{self._prefix}groups"

    def hash(self, name: str) -> str:
        """A control hash owned by one capability, e.g. ``strangler:shadow``."""
        return f"{self._prefix}{name}"

    def under(self, *parts: str) -> str:
        """Any other key under the prefix, e.g. ``strangler:rollout:default``."""
        return self._prefix + ":".join(parts)

    @property
    def epoch(self) -> str:
        """Written once when a Redis is first used; if it vanishes or changes, Redis lost its data."""
        return f"{self._prefix}epoch"

    @property
    def lost_state(self) -> str:
        """The record of a detected data loss (JSON), until someone sets a split by hand."""
        return f"{self._prefix}control:lost"

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


PARITY_LAST = "parity:last"  # a control hash (``Keys.hash``) that ``strangler parity`` writes
# a control hash (``Keys.hash``): each proxy's configured deprecation rules (name -> rule JSON), so
# `strangler deprecations phase|clear` knows the rules a running proxy serves
DEPRECATIONS_REGISTERED = "deprecations:registered"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names; ``split_key`` is kept outside the prefix because users' tooling already sets it."""

    split_key: str = "feature:v2_traffic_percentage"
    prefix: str = "strangler:"
    cluster: bool = False

    @classmethod
    def for_settings(cls, settings: Settings) -> Keys:
        from proxy.redis_url import is_cluster

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
    def split_state(self) -> str:
        """Hash: ``rollback:<group>`` while a rollback is in force (match rules yield to it) and
        ``epoch:<group>`` (bumped by rollbacks, rollout starts and 0%/100% writes; pins carry it)."""
        return f"{self._prefix}split_state"

    @property
    def groups(self) -> str:
        """Hash of the route groups running proxies know, and the share each serves (JSON per group)."""
        return f"{self._prefix}groups"

    def hash(self, name: str) -> str:
        """A control hash the control store reads into the snapshot section ``name``, e.g.
        ``strangler:shadow``; its owner names it (``shadow``, ``shadow_rules``, ``deprecations``,
        ``parity:last``)."""
        return f"{self._prefix}{name}"

    def under(self, *parts: str) -> str:
        """A key under the prefix; only the named keys below call it, so the layout stays here."""
        return self._prefix + ":".join(parts)

    # --- canary (proxy/canary) ----------------------------------------------------------------

    def canary_verdict(self, group: str) -> str:
        """The group's last check (JSON), with its failure streak, so a new leader carries on."""
        return self.under("canary", "verdict", group)

    def canary_decision(self, group: str) -> str:
        """The group's last rollback decision (JSON)."""
        return self.under("canary", "decision", group)

    @property
    def canary_decisions(self) -> str:
        """The last decisions, newest first (list)."""
        return self.under("canary", "decisions")

    @property
    def canary_leader(self) -> str:
        """The leader lock (holder identity, with expiry)."""
        return self.under("canary", "leader")

    def canary_since(self, group: str) -> str:
        """When the group's canary history last started afresh (a new rollout, a split by hand)."""
        return self.under("canary", "since", group)

    def canary_checks(self, group: str) -> str:
        """The group's recent checks, newest first (capped list of compact JSON), for backtests."""
        return self.under("canary", "checks", group)

    @property
    def alerts(self) -> str:
        """The alert outbox (hash: event id -> JSON)."""
        return self.under("canary", "alerts")

    @property
    def alerts_due(self) -> str:
        """When each queued alert is next due (sorted set)."""
        return self.under("canary", "alerts", "due")

    def window(self, group: str, version: str, second: int) -> str:
        """One second of one replica-summed (group, version) window (hash of counters)."""
        return self.under("win", group, version, str(second))

    def rollout(self, group: str) -> str:
        """The group's rollout state machine (JSON)."""
        return self.under("rollout", group)

    def rollout_log(self, group: str) -> str:
        """The group's rollout transitions, newest first (list)."""
        return self.under("rollout", group, "log")

    # --- shadow diff report (proxy/shadow/report.py) ------------------------------------------

    def diffs(self, kind: str, endpoint: str | None = None) -> str:
        """A diff report key: ``endpoints`` and ``groups`` alone, or ``counts``, ``fields``,
        ``suppressed``, ``samples`` of one endpoint; ``*`` matches them all (for SCAN)."""
        return self.under("diffs", kind) if endpoint is None else self.under("diffs", kind, endpoint)

    @property
    def diffs_epoch(self) -> str:
        """Incremented by every report reset, so every replica sees it."""
        return self.under("diffs_epoch")

    def noise(self, endpoint: str | None = None) -> str:
        """The endpoints with learnt noise (set), or one endpoint's noise counts (hash)."""
        return self.under("noise", "endpoints") if endpoint is None else self.under("noise", "seen", endpoint)

    @property
    def noise_pattern(self) -> str:
        """Every learnt-noise key (for SCAN)."""
        return self.under("noise", "*")

    # --- parity (proxy/parity) ----------------------------------------------------------------

    @property
    def parity_last(self) -> str:
        """The last ``strangler parity`` summary per table (hash: table -> JSON); also the
        control store's ``PARITY_LAST`` section, which feeds the parity gauges."""
        return self.hash(PARITY_LAST)

    @property
    def epoch(self) -> str:
        """Written once when a Redis is first used; if it vanishes or changes, Redis lost its data."""
        return f"{self._prefix}epoch"

    @property
    def lost_state(self) -> str:
        """The record of a detected data loss (JSON), until someone sets a split by hand."""
        return f"{self._prefix}control:lost"

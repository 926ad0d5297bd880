"""One JSON document per view, whatever the path: built here for the CLI's Redis path and for the
admin API, so ``strangler X --json`` and ``strangler X --url ... --json`` print the same document
for the same state. The schemas are ``docs/schemas/<view>.json``.

The only field allowed to differ between the two paths is ``source``: where the document was read
(``{"path": "redis", "url": <Redis URL without credentials>}`` or ``{"path": "admin_api", "url":
<admin API URL>}``). Two more differ because the paths see different things, and the schemas say
so: a deprecation rule's ``hits`` (counts live in a proxy's memory: null from Redis) and, in
``status``, the proxy's own view (``proxy``: the proxy the CLI's config names from Redis, the
answering proxy through its admin API), whose ``snapshot_age_seconds``/``snapshot_generation``
move by themselves.

Lives in ``proxy.admin`` (it may use every capability: the canary's records, parity's results);
``proxy.cli`` and the admin routes both import it. Rendering for people is here too, so both
paths also print the same table.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from proxy.control.client import ControlClient
from proxy.control.snapshot import parse_percentage
from proxy.viewsource import ADMIN_API, REDIS, source

__all__ = ["ADMIN_API", "REDIS", "source"]  # re-exported: views.source(views.REDIS, ...) reads well

if TYPE_CHECKING:
    from rich.console import Console

    from proxy.control.store import ControlStore


# --- status ---------------------------------------------------------------------------------------


def ordered(groups: list[str]) -> list[str]:
    """``default`` first, then by name: the same order whoever lists them."""
    return ["default", *sorted(set(groups) - {"default"})]


def split_rows(
    groups: list[str],
    raw: dict[str, str | None],
    registered: dict[str, dict[str, Any]],
    default_percentage: float,
) -> list[dict[str, Any]]:
    """Per group: the stored value, whether it is valid, and the share in force.

    The share in force is what the proxies reported serving (``strangler:groups``); without a
    report it is what a proxy would compute from the stored values, or None when that is invalid.
    """

    def parsed(value: str | None) -> tuple[bool, float | None]:
        try:
            return True, parse_percentage(value)
        except ValueError:
            return False, None

    global_ok, global_value = parsed(raw.get("default"))
    global_in_force = (default_percentage if global_value is None else global_value) if global_ok else None
    rows = []
    for group in groups:
        own = raw.get(group)
        valid, value = parsed(own)
        if group == "default":
            source_ = "global key" if own is not None else "default_percentage"
            computed = global_in_force
        else:
            source_ = "own key" if own is not None else "global"
            computed = (value if valid else None) if own is not None else global_in_force
        serving = registered.get(group, {}).get("serving")
        serving = float(serving) if isinstance(serving, int | float) else None
        rows.append(
            {
                "group": group,
                "percentage": serving if serving is not None else computed,
                "serving": serving,
                "stored": value,
                "raw": own,
                "valid": valid,
                "source": source_,
            }
        )
    return rows


async def status_document(
    control: ControlClient,
    groups: list[str],
    default_percentage: float,
    where: dict[str, str],
    proxy: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``status`` view from Redis: every group the caller knows plus those running proxies
    registered, the rollout, last check and decision per group, a loss of Redis data, parity."""
    from proxy.canary import statusview
    from proxy.parity.store import read_last_results

    registered = await control.registered_groups()
    names = ordered([*groups, *registered])
    raw = await control.get_split(names)
    canary = await statusview.read_status(control.redis, control.keys, names)
    parity = await read_last_results(control.redis, control.keys)
    rows = split_rows(names, raw, registered, default_percentage)
    for row in rows:
        entry = canary["groups"][row["group"]]
        row.update(rollout=entry["rollout"], verdict=entry["verdict"], decision=entry["decision"])
    return {
        "source": where,
        "redis_ok": True,
        "redis_data_lost": canary["state_lost"],
        "leader": canary["leader"],
        "groups": rows,
        "proxy": proxy,
        "parity": parity,
    }


def proxy_view(store: ControlStore, url: str) -> dict[str, Any]:
    """A proxy's own view of Redis: health, snapshot age and generation, when it saw data lost."""
    snap = store.current
    return {
        "url": url,
        "redis_ok": snap.redis_ok,
        "snapshot_age_seconds": store.age_seconds(),
        "snapshot_generation": snap.generation,  # +1 per refresh: "has it read Redis since my write?"
        "redis_data_lost_at": store.state_lost_at,  # this process saw Redis lose its data then
    }


def snapshot_status_document(
    store: ControlStore, groups: list[str], where: dict[str, str], proxy: dict[str, Any]
) -> dict[str, Any]:
    """The ``status`` view when the proxy cannot read Redis: what it serves from its snapshot."""
    snap = store.current
    rows = []
    for group in ordered(groups):
        served = snap.percentage(group)
        rows.append(
            {
                "group": group, "percentage": served, "serving": served, "stored": None, "raw": None,
                "valid": True, "source": "snapshot", "rollout": None, "verdict": None, "decision": None,
            }
        )  # fmt: skip
    lost = None if store.state_lost_at is None else {"at": store.state_lost_at}
    return {
        "source": where,
        "redis_ok": False,
        "redis_data_lost": lost,
        "leader": None,
        "groups": rows,
        "proxy": proxy,
        "parity": {},
    }


def render_status(doc: dict[str, Any], console: Console) -> None:
    """The ``status`` table and its lines, the same for both paths."""
    from rich.markup import escape
    from rich.table import Table

    from proxy.canary.commands import approval_line, gate_lines, summarize

    where = doc["source"]
    proxy = doc["proxy"]
    if proxy is None:
        console.print("proxy: no answer at the configured address (snapshot age unknown; use --url)")
    else:
        age = proxy.get("snapshot_age_seconds")
        reachable = "reachable" if proxy.get("redis_ok") else "UNREACHABLE (serving its last good snapshot)"
        shown = "-" if age is None else f"{age:.1f}s"
        console.print(f"proxy {escape(proxy['url'])}: Redis {reachable}, snapshot age {shown}")
    lost = doc["redis_data_lost"]
    if lost is None and proxy is not None and proxy.get("redis_data_lost_at") is not None:
        lost = {"at": proxy["redis_data_lost_at"]}
    if lost is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lost.get("at") or 0)))
        restored = ", ".join(lost.get("rollouts_restored") or []) or "none"
        console.print(
            f"[red]REDIS LOST ITS DATA at {when}[/red]: proxies kept their last split and wrote it back "
            f"(rollouts restored: {escape(restored)}); setting a split by hand clears this"
        )
    via = "Redis" if where["path"] == REDIS else "admin API"
    title = f"Strangler split ({via} {where['url']})" + ("" if doc["redis_ok"] else ": Redis UNREACHABLE")
    table = Table(title=escape(title))
    for column in (
        "group",
        "v2 % served",
        "stored value",
        "source",
        "rollout",
        "last check",
        "last decision",
    ):
        table.add_column(column, overflow="fold")
    for row in doc["groups"]:
        lines = summarize({"rollout": row["rollout"], "verdict": row["verdict"], "decision": row["decision"]})
        served = "?" if row["percentage"] is None else f"{row['percentage']:g}"
        stored = "-" if row["raw"] is None else escape(row["raw"]) + ("" if row["valid"] else " (INVALID)")
        table.add_row(
            row["group"], served, stored, row["source"], escape(lines["rollout"]), escape(lines["verdict"]),
            escape(lines["decision"]),
        )  # fmt: skip
    console.print(table)
    for row in doc["groups"]:  # metric gates of the last check (docs/canary.md, Metric gates)
        for line in gate_lines(row["verdict"]):
            console.print(f"{escape(row['group'])} {escape(line)}")
    for row in doc["groups"]:  # an approval hold asks a person to act: one line, not folded
        note = approval_line(row["rollout"]) if row["rollout"] else ""
        if note:
            hint = (
                f"; strangler rollout approve --group {row['group']}" if note.startswith("awaiting") else ""
            )
            console.print(f"rollout of {escape(row['group'])}: {escape(note)}{hint}", soft_wrap=True)
    for name, result in sorted(doc["parity"].items()):  # the last `strangler parity` run per table
        counts = ", ".join(f"{result.get(k, 0)} {k}" for k in ("missing", "extra", "changed"))
        console.print(f"parity {escape(name)}: {escape(str(result.get('status')))} ({counts})")
    for row in doc["groups"]:
        if not row["valid"]:
            serving = (
                "an unknown share (no proxy reported one)"
                if row["serving"] is None
                else f"{row['serving']:g}%"
            )
            console.print(
                f"[red]invalid value in Redis for {row['group']}:[/red] {escape(repr(row['raw']))} ignored; "
                f"proxies keep serving their last good value: {serving}"
            )


# --- set, rollback ----------------------------------------------------------------------------


def set_document(where: dict[str, str], group: str, percentage: float) -> dict[str, Any]:
    return {"source": where, "group": group, "percentage": percentage}


def rollback_document(
    where: dict[str, str], group: str | None, changed: dict[str, str | None] | None, detail: str | None = None
) -> dict[str, Any]:
    """``changed`` maps each group rolled back to its previous raw value; None while ``pending``
    (Redis could not take the write: the answering proxy serves 0% and retries it)."""
    return {
        "source": where,
        "group": group or "all",
        "percentage": 0.0,
        "pending": changed is None,
        "changed": changed,
        "detail": detail,
    }


# --- deprecations -------------------------------------------------------------------------------


def deprecations_document(
    where: dict[str, str], redis_key: str, rules: list[dict[str, Any]]
) -> dict[str, Any]:
    """Rules in force; each rule's ``hits`` is null when read from Redis (counts live in the proxy)."""
    return {"source": where, "redis_key": redis_key, "rules": rules}


def override_document(
    where: dict[str, str], name: str, override: str | None, changed: bool
) -> dict[str, Any]:
    """``deprecations phase`` (``override`` is the value written) and ``deprecations clear``
    (``override`` null; ``changed`` false when the rule had no live override)."""
    return {"source": where, "name": name, "override": override, "changed": changed}


# --- rollouts -----------------------------------------------------------------------------------


def rollout_document(where: dict[str, str], state: dict[str, Any]) -> dict[str, Any]:
    """What ``rollout start|pause|resume|abort|promote`` leaves: the rollout's state."""
    return {"source": where, **state}


def rollout_status_document(
    where: dict[str, str], group: str, leader: str | None, entry: dict[str, Any]
) -> dict[str, Any]:
    return {"source": where, "group": group, "leader": leader, **entry}

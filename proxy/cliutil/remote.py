"""The CLI's client for a running proxy's admin API (httpx: not the hot path, and sync is simpler).

``--url`` (or STRANGLER_ADMIN_URL) names the proxy, with or without the admin prefix
(``http://host:8080`` and ``http://host:8080/_strangler`` both work); ``--token`` (or
STRANGLER_ADMIN_TOKEN, else the token a local `strangler serve` generated in .strangler/admin-token)
is sent as ``Authorization: Bearer``. Errors come back as ``AdminError``
carrying the server's own JSON message, so the CLI can print it as is.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from rich.table import Table

from proxy.settings import read_admin_token

if TYPE_CHECKING:
    import httpx  # imported when a client is made: `strangler --help` and Redis commands skip it

DEFAULT_PREFIX = "/_strangler"


# How an admin API answer maps to the CLI's exit codes: the same as the Redis path's for the same
# refusal (README "Operate"): a refused request is bad input (2), a wrong or missing token too (2,
# with a hint), a proxy that failed or cannot be reached is a failed action (1).
USAGE_STATUSES = frozenset({400, 401, 403, 404, 405, 409, 422})
TOKEN_HINT = (
    "pass the proxy's admin token: --token or STRANGLER_ADMIN_TOKEN "
    "(a local `strangler serve` keeps it in .strangler/admin-token)"
)


class AdminError(Exception):
    """The admin API refused or could not be reached; ``str()`` is a message for humans."""

    def __init__(self, message: str, status: int | None = None, bad_input: bool = False) -> None:
        super().__init__(message)
        self.status = status
        # exit 2: the request was wrong before anything was sent (a malformed URL), or refused
        self.bad_input = bad_input or status in USAGE_STATUSES

    @property
    def exit_code(self) -> int:
        return 2 if self.bad_input else 1


def base_url(url: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``http://h:p`` -> ``http://h:p/_strangler``; a URL that already has a path is kept."""
    shape = f"must look like http://host:port[{prefix}]"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError as exc:  # an unclosed [ipv6, port 99999
        raise AdminError(f"admin URL {url!r} {shape}: {exc}", bad_input=True) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AdminError(f"admin URL {url!r} {shape}", bad_input=True)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or prefix}"


class AdminClient:
    def __init__(
        self, url: str, token: str | None = None, prefix: str = DEFAULT_PREFIX, timeout: float = 5.0
    ) -> None:
        self.url = base_url(url, prefix)
        if token is None:
            # the token `strangler serve` generated for this directory, if it did
            token = read_admin_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        import httpx

        self._client: httpx.Client = httpx.Client(headers=headers, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        expect: tuple[str, ...] = (),
    ) -> Any:
        """One call; ``expect``: fields a success answer of ours has (else it is not our API)."""
        import httpx

        try:
            response = self._client.request(method, self.url + path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise AdminError(f"admin API at {self.url} is unreachable: {exc}") from exc
        try:
            data = response.json()
        except ValueError:  # not JSON (or not text)
            data = None
        failed = response.status_code >= 400
        ours = isinstance(data, dict) and ("error" in data if failed else all(k in data for k in expect))
        if not ours:  # a backend, a default page: say so rather than relay its text (exit 2: a wrong
            # --url), unless something in front of the proxy failed (a 502 page: exit 1)
            asked = urlsplit(self.url + path).path
            raise AdminError(
                f"{self.url}: not a Strangler admin API (answered {response.status_code} to {asked})",
                response.status_code,
                bad_input=response.status_code < 500,
            )
        if response.status_code >= 400:
            extra = data.get("detail") or data.get("message") or ""
            message = f"{data['error']}" + (f": {extra}" if extra else "")
            if response.status_code in (401, 403):
                message = f"{data['error']}; {TOKEN_HINT}"
            raise AdminError(f"admin API answered {response.status_code}: {message}", response.status_code)
        return data

    # --- operations the CLI uses ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/status", expect=("source", "groups", "proxy")))

    def set_split(self, percentage: str | float, group: str | None) -> dict[str, Any]:
        try:
            value: Any = float(percentage)
        except ValueError:
            value = percentage  # let the server say why it is wrong
        if isinstance(value, float) and not (math.isfinite(value) and 0 <= value <= 100):
            # JSON has no NaN/Infinity; out of range: send the text, so the refusal quotes what was typed
            value = str(percentage)
        body = {"percentage": value, "group": group or "default"}
        return dict(self.request("PUT", "/split", body, expect=("group", "percentage")))

    def rollback(self, group: str | None) -> dict[str, Any]:
        """No group: the global split and every group with its own key."""
        return dict(self.request("POST", "/rollback", {"group": group} if group else {}, expect=("changed",)))

    def canary_status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/canary/status", expect=("groups", "leader")))

    def rollout(self, action: str, group: str | None, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """``action`` is start, pause, resume, abort or promote; "get" reads the state."""
        payload = {"group": group or "default", **(body or {})}
        if action == "get":
            return dict(
                self.request("GET", "/rollout", params={"group": group or "default"}, expect=("state",))
            )
        return dict(self.request("POST", f"/rollout/{action}", payload, expect=("group", "state")))

    def shadow(self) -> dict[str, Any]:
        return dict(self.request("GET", "/shadow"))

    def set_shadow(self, fields: dict[str, Any], group: str | None) -> dict[str, Any]:
        body = {**fields, **({"group": group} if group else {})}
        return dict(self.request("PUT", "/shadow", body)["written"])

    def shadow_rules(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/shadow/rules")["rules"])

    def change_rule(self, method: str, kind: str, endpoint: str | None, value: Any) -> dict[str, Any]:
        return dict(
            self.request(method, "/shadow/rules", {"kind": kind, "endpoint": endpoint, "value": value})
        )

    def diffs(self, endpoint: str | None = None) -> dict[str, Any]:
        return dict(self.request("GET", "/diffs", params={"endpoint": endpoint} if endpoint else None))

    def reset_diffs(self, forget_noise: bool) -> dict[str, Any]:
        return dict(self.request("POST", "/diffs/reset", {"forget_noise": forget_noise}))

    def deprecations(self) -> dict[str, Any]:
        return dict(self.request("GET", "/deprecations", expect=("rules",)))

    def override_deprecation(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.request("PUT", f"/deprecations/{name}", body, expect=("name", "override")))

    def clear_deprecation(self, name: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/deprecations/{name}", expect=("name", "override")))


# --- what the CLI commands print when they go through the admin API -------------------------------


def deprecation_table(rules: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("rule", "methods", "pattern", "phase", "now", "sunset", "warned", "gone (410)", "source"):
        table.add_column(column)
    for rule in rules:
        hits = rule.get("hits") or {}
        table.add_row(
            rule["name"],
            ",".join(rule.get("methods", [])),
            rule["pattern"],
            rule.get("phase", "auto"),
            rule.get("effective_phase", "?"),
            rule.get("sunset_at") or "-",
            str(hits.get("warn", "-")),
            str(hits.get("gone", "-")),
            rule.get("source", "config"),
        )
    return table

"""One JSON document per view whatever the path (Redis or a proxy's admin API), checked against
docs/schemas/<view>.json; names of rules and groups looked up where the
listing looks them up; admin API refusals exit as the Redis path's; one line for each error."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.clirun import Ran, strangler
from tests.support import ROOT, Backend, ProxyProcess, RedisServer, free_port, wait_until

TOKEN = "views-test-token-0123456789"
TASKS = [{"name": "tasks", "patterns": ["/tasks", "/tasks/**"]}]
RULE = {
    "name": "tasks-v0",
    "pattern": "/v0/tasks/**",
    "deprecated_at": "2025-01-01",
    "sunset_at": "2099-01-01",
}
SCHEMAS = ROOT / "docs" / "schemas"


def valid(view: str, text: str) -> dict[str, Any]:
    """The command's stdout, parsed and checked against the view's schema."""
    doc = json.loads(text)
    schema = json.loads((SCHEMAS / f"{view}.json").read_text())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert isinstance(doc, dict)
    return doc


def error_line(result: Ran) -> str:
    """The one line on stderr (never a traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def without_source(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "source"}


@pytest.fixture()
def views_proxy(start_proxy: Callable[..., ProxyProcess], redis_server: RedisServer) -> ProxyProcess:
    """A proxy with a route group and a deprecation rule that the CLI's own (empty) config knows nothing
    about; once it has registered both in Redis."""
    # no canary leader: its checks would change the state between the two reads of a comparison
    proxy = start_proxy(routes=TASKS, admin_token=TOKEN, deprecations=[RULE], canary={"enabled": False})
    r = redis_server.client()
    wait_until(lambda: r.hexists("strangler:deprecations:registered", "tasks-v0"), timeout=5)
    return proxy


def cli_config(tmp_path: Path, redis_url: str, port: int) -> str:
    """A CLI config naming only Redis and where its proxy would be (``port``)."""
    path = tmp_path / f"cli-{port}.yaml"
    path.write_text(yaml.safe_dump({"redis_url": redis_url, "port": port, "admin_token": TOKEN}))
    return str(path)


# --- item 1: rules and groups are looked up where the listing looks ---------------------------------


def test_deprecation_phase_and_clear_know_the_running_proxys_rules_and_refuse_unknown_ones(
    views_proxy: ProxyProcess, redis_server: RedisServer, redis_url: str
) -> None:
    r = redis_server.client()
    via_redis = ["--redis-url", redis_url]
    via_api = ["--url", views_proxy.url, "--token", TOKEN]

    gone = strangler("deprecations", "phase", "tasks-v0", "gone", *via_redis)
    assert (gone.returncode, gone.stdout) == (0, "deprecation rule tasks-v0: phase gone\n"), gone.stderr
    assert r.hget("strangler:deprecations", "tasks-v0") == "gone"
    wait_until(lambda: views_proxy.http.get(views_proxy.url + "/v0/tasks/1").status_code == 410, timeout=5)

    for args in (("clear", "nosuch"), ("phase", "nosuch", "gone")):
        refused = strangler("deprecations", *args, *via_redis)
        assert refused.returncode == 2
        assert error_line(refused) == (
            "error: unknown deprecation rule 'nosuch': not in this config, not registered by a running "
            f"proxy nor defined live in Redis at {redis_url}"
        )
    cleared = strangler("deprecations", "clear", "tasks-v0", *via_redis)
    assert (cleared.returncode, cleared.stdout) == (0, "deprecation rule tasks-v0: live override removed\n")
    again = strangler("deprecations", "clear", "tasks-v0", *via_redis)
    assert again.stdout == "deprecation rule tasks-v0: no live override (it follows its config)\n"
    assert again.returncode == 0 and r.hget("strangler:deprecations", "tasks-v0") is None

    # a rule defined live in Redis (no config has it): its phase changes, its definition stays
    live = {"pattern": "/v0/live/**", "deprecated_at": "2025-01-01"}
    r.hset("strangler:deprecations", "live-one", json.dumps(live))
    off = strangler("deprecations", "phase", "live-one", "off", *via_redis)
    assert (off.returncode, off.stdout) == (0, "deprecation rule live-one: phase off\n"), off.stderr
    assert json.loads(r.hget("strangler:deprecations", "live-one") or "{}") == {**live, "phase": "off"}

    # through the admin API: the same refusals, the same exit code
    unknown = strangler("deprecations", "clear", "nosuch", *via_api)
    assert unknown.returncode == 2
    assert error_line(unknown) == (
        "error: admin API answered 404: unknown deprecation rule: 'nosuch': not configured on this proxy, "
        "no live override in Redis"
    )
    sideways = strangler("deprecations", "phase", "tasks-v0", "sideways", *via_api)
    assert sideways.returncode == 2  # a 422 (exit 1 before)
    assert error_line(sideways) == (
        "error: admin API answered 422: invalid deprecation override: rule 'tasks-v0': expected one of "
        "auto, warn, gone, off or a JSON object"
    )

    # --json: the same document both ways (deprecation-change.json)
    docs = []
    for via in (via_redis, via_api):
        docs.append(
            valid(
                "deprecation-change",
                strangler("deprecations", "phase", "tasks-v0", "warn", "--json", *via).stdout,
            )
        )
        docs.append(
            valid("deprecation-change", strangler("deprecations", "clear", "tasks-v0", "--json", *via).stdout)
        )
    assert [d["source"]["path"] for d in docs] == ["redis", "redis", "admin_api", "admin_api"]
    assert (
        without_source(docs[0])
        == without_source(docs[2])
        == {"name": "tasks-v0", "override": "warn", "changed": True}
    )
    assert (
        without_source(docs[1])
        == without_source(docs[3])
        == {"name": "tasks-v0", "override": None, "changed": True}
    )


def test_unknown_groups_are_refused_on_both_paths(views_proxy: ProxyProcess, redis_url: str) -> None:
    via_redis = ["--redis-url", redis_url]
    via_api = ["--url", views_proxy.url, "--token", TOKEN]
    commands = [
        ("set", "10"),
        ("rollback",),
        ("rollout", "start"),
        ("rollout", "pause"),
        ("rollout", "status"),
    ]
    for command in commands:
        refused = strangler(*command, "--group", "nosuch", *via_redis)
        assert refused.returncode == 2, command
        known = "known groups (config and Redis): default, tasks"
        assert error_line(refused) == f"error: unknown group 'nosuch'; {known}", command
        remote = strangler(*command, "--group", "nosuch", *via_api)
        assert remote.returncode == 2, command
        expected = "error: admin API answered 404: unknown group: 'nosuch'; known groups: default, tasks"
        if command == ("rollout", "status"):  # read from /canary/status, refused by the CLI
            expected = "error: unknown group 'nosuch'; the proxy serves: default, tasks"
        assert error_line(remote) == expected, command
    # a group only the running proxy knows is not refused
    assert strangler("set", "10", "--group", "tasks", *via_redis).returncode == 0


# --- item 5: one document per view, both paths ------------------------------------------------------


def test_status_is_the_same_document_through_redis_and_through_the_admin_api(
    views_proxy: ProxyProcess, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    r = redis_server.client()
    via_redis = ["--config", cli_config(tmp_path, redis_url, views_proxy.port)]
    via_api = ["--url", views_proxy.url, "--token", TOKEN]
    assert strangler("set", "30", "--group", "tasks", *via_redis).returncode == 0
    assert strangler("rollout", "start", "--steps", "5,100", "--interval", "1h", *via_redis).returncode == 0
    parity = {"status": "different", "kind": "sql", "missing": 1, "extra": 0, "changed": 0, "seconds": 0.5}
    r.hset("strangler:parity:last", "orders", json.dumps(parity))
    wait_until(lambda: json.loads(r.hget("strangler:groups", "tasks") or "{}").get("serving") == 30.0)
    wait_until(lambda: json.loads(r.hget("strangler:groups", "default") or "{}").get("serving") == 5.0)

    from_redis = valid("status", strangler("status", "--json", *via_redis).stdout)
    from_api = valid("status", strangler("status", "--json", *via_api).stdout)

    assert from_redis["source"] == {"path": "redis", "url": redis_url}
    assert from_api["source"] == {"path": "admin_api", "url": views_proxy.admin}
    for doc in (from_redis, from_api):  # the proxy's own clock moves between the two reads
        assert doc["proxy"]["redis_ok"] is True and doc["proxy"].pop("snapshot_age_seconds") < 5
        assert doc["proxy"].pop("snapshot_generation") >= 1
    assert without_source(from_redis) == without_source(from_api)
    assert [(g["group"], g["percentage"]) for g in from_api["groups"]] == [("default", 5.0), ("tasks", 30.0)]
    assert from_api["groups"][0]["rollout"]["state"] == "progressing"
    assert from_api["parity"] == {"orders": parity}

    # and the same table for people
    shown = [strangler("status", *via, columns=250).stdout for via in (via_redis, via_api)]
    assert [text.splitlines()[2:] for text in shown][0] == [text.splitlines()[2:] for text in shown][1]


def test_set_rollback_rollouts_and_deprecations_are_one_document_per_view(
    views_proxy: ProxyProcess, redis_url: str, tmp_path: Path
) -> None:
    via_redis = ["--redis-url", redis_url]
    via_api = ["--url", views_proxy.url, "--token", TOKEN]
    docs: dict[str, list[dict[str, Any]]] = {}
    for via in (via_redis, via_api):
        docs.setdefault("set", []).append(
            valid("set", strangler("set", "20", "--group", "tasks", "--json", *via).stdout)
        )
        docs.setdefault("rollback", []).append(
            valid("rollback", strangler("rollback", "--group", "tasks", "--json", *via).stdout)
        )
        assert strangler("set", "20", "--group", "tasks", *via).returncode == 0  # the same state again
        for action in ("start", "pause", "resume", "promote", "abort"):
            extra = ["--steps", "5,50,100", "--interval", "1h"] if action == "start" else []
            done = strangler("rollout", action, "--group", "tasks", *extra, "--json", *via)
            assert done.returncode == 0, (action, done.stderr)
            state = valid("rollout", done.stdout)
            assert state["source"]["path"] == ("redis" if via is via_redis else "admin_api")
        docs.setdefault("rollout-status", []).append(
            valid("rollout-status", strangler("rollout", "status", "--group", "tasks", "--json", *via).stdout)
        )
    cli = ["--config", cli_config(tmp_path, redis_url, free_port())]  # no proxy there: read from Redis
    docs["deprecations"] = [
        valid("deprecations", strangler("deprecations", "--json", *cli).stdout),
        valid("deprecations", strangler("deprecations", "--json", *via_api).stdout),
    ]

    for view, (from_redis, from_api) in docs.items():
        assert from_redis["source"]["path"] == "redis" and from_api["source"]["path"] == "admin_api", view
        if view == "rollout-status":  # two rollouts, one after the other: their clocks differ
            for doc in (from_redis, from_api):
                doc["rollout"] = {
                    k: v for k, v in doc["rollout"].items() if not k.endswith("_at") and k != "last"
                }
                doc["rollout"]["seq"] = doc["rollout"]["hold_id"] = None  # counted over both rollouts
        if view == "deprecations":  # counts live in the proxy: null from Redis
            assert {rule["hits"] is None for rule in from_redis["rules"]} == {True}
            assert from_api["rules"][0]["hits"] == {"warn": 0, "gone": 0}
            for rule in from_api["rules"]:
                rule["hits"] = None
        assert without_source(from_redis) == without_source(from_api), view
    assert docs["rollback"][0]["changed"] == {"tasks": "20"}
    assert [rule["name"] for rule in docs["deprecations"][0]["rules"]] == ["tasks-v0"]


def test_status_shows_on_both_paths_that_redis_lost_its_data(
    views_proxy: ProxyProcess, redis_server: RedisServer, redis_url: str, tmp_path: Path
) -> None:
    r = redis_server.client()
    via_redis = ["--config", cli_config(tmp_path, redis_url, views_proxy.port)]
    via_api = ["--url", views_proxy.url, "--token", TOKEN]
    assert strangler("set", "60", *via_redis).returncode == 0
    wait_until(lambda: json.loads(r.hget("strangler:groups", "default") or "{}").get("serving") == 60.0)
    r.flushall()  # Redis restarted without its data
    wait_until(lambda: r.get("strangler:control:lost") is not None, timeout=5)
    wait_until(lambda: r.get("feature:v2_traffic_percentage") == "60", timeout=5)  # written back

    for via in (via_redis, via_api):
        doc = valid("status", strangler("status", "--json", *via).stdout)
        assert doc["redis_data_lost"]["at"] > 0 and doc["proxy"]["redis_data_lost_at"] is not None
        table = strangler("status", *via, columns=250)
        assert table.returncode == 0
        assert "REDIS LOST ITS DATA at " in table.stdout, table.stdout
        assert "proxies kept their last split and wrote it back" in table.stdout


def test_status_through_the_admin_api_when_the_proxy_cannot_reach_redis(
    proxy_factory: Callable[..., ProxyProcess],
    v1v2: tuple[Backend, Backend],
    redis_factory: Callable[[], RedisServer],
) -> None:
    redis = redis_factory()
    v1, v2 = v1v2
    proxy = proxy_factory(v1_url=v1.url, v2_url=v2.url, redis_url=redis.url, admin_token=TOKEN)
    assert strangler("set", "15", "--redis-url", redis.url).returncode == 0
    wait_until(lambda: proxy.http.get(proxy.admin + "/split").json()["default"] == 15.0, timeout=5)
    redis.stop()
    wait_until(lambda: not proxy.http.get(proxy.admin + "/ready").json()["redis_ok"], timeout=5)
    doc = valid("status", strangler("status", "--json", "--url", proxy.url).stdout)
    assert doc["redis_ok"] is False and doc["proxy"]["redis_ok"] is False
    assert (
        doc["groups"][0] | {"group": "default", "percentage": 15.0, "source": "snapshot"} == doc["groups"][0]
    )
    table = strangler("status", "--url", proxy.url, columns=250)
    assert f"proxy {proxy.admin}: Redis UNREACHABLE (serving its last good snapshot)" in table.stdout

    # rollback with Redis down, of everyone or of a group the CLI's config does not name (looked up
    # in Redis): one line, and what would work
    for extra in ([], ["--group", "registered-only"]):
        back = strangler("rollback", *extra, "--redis-url", redis.url)
        assert back.returncode == 1, extra
        line = error_line(back)
        assert line.startswith(f"error: Redis at {redis.url} is unreachable: "), line
        assert line.endswith("; a running proxy's admin API can do it: --url http://HOST:PORT"), line
    failed = strangler("set", "5", "--url", proxy.url, "--token", TOKEN)  # a 5xx is a failed action: 1
    assert failed.returncode == 1
    assert (
        error_line(failed)
        == "error: admin API answered 503: redis unavailable: control state unavailable now; retry"
    )
    accepted = valid("rollback", strangler("rollback", "--json", "--url", proxy.url, "--token", TOKEN).stdout)
    assert accepted["pending"] is True and accepted["changed"] is None


def test_admin_api_refusals_exit_as_the_redis_path_and_a_backend_is_not_an_admin_api(
    views_proxy: ProxyProcess, v1v2: tuple[Backend, Backend], redis_url: str, tmp_path: Path
) -> None:
    bad = strangler("set", "250", "--url", views_proxy.url, "--token", TOKEN)
    assert bad.returncode == 2
    assert (
        error_line(bad)
        == "error: admin API answered 422: invalid percentage: '250' is not a percentage between 0 and 100"
    )
    assert (
        strangler("set", "250", "--redis-url", redis_url).returncode == 2
    )  # the same refusal, the same code

    denied = strangler("set", "5", "--url", views_proxy.url, "--token", "wrong")
    assert denied.returncode == 2
    assert error_line(denied) == (
        "error: admin API answered 401: unauthorized; pass the proxy's admin token: --token or "
        "STRANGLER_ADMIN_TOKEN (a local `strangler serve` keeps it in .strangler/admin-token)"
    )

    v1, _ = v1v2  # a backend answers every path (200, JSON)
    for command in (("status",), ("set", "5"), ("rollback",)):
        wrong = strangler(*command, "--url", v1.url)
        assert wrong.returncode == 2, command
        path = {"status": "status", "set": "split", "rollback": "rollback"}[command[0]]
        assert error_line(wrong) == (
            f"error: {v1.url}/_strangler: not a Strangler admin API (answered 200 to /_strangler/{path})"
        )
    with static_server(tmp_path) as elsewhere:  # a web server that answers 404 to our paths
        missing = strangler("status", "--url", elsewhere)
    assert missing.returncode == 2
    assert error_line(missing) == (
        f"error: {elsewhere}/_strangler: not a Strangler admin API (answered 404 to /_strangler/status)"
    )


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the test's stderr is the CLI's
        pass


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """Python's own file server on a free port (answers 404 with an HTML page to unknown paths)."""
    handler = functools.partial(QuietFiles, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_parity_results_as_stored_match_their_schema(redis_server: RedisServer, redis_url: str) -> None:
    summary = {
        "status": "equal", "source_rows": 3, "target_rows": 3, "missing": 0, "extra": 0, "changed": 0,
        "changed_columns": {}, "skipped_recent": 0, "resolved_after_lag": 0, "seconds": 0.1,
        "finished_at": 1700000000.0, "error": None, "kind": "sql",
    }  # fmt: skip
    redis_server.client().hset("strangler:parity:last", "orders", json.dumps(summary))
    last = strangler("parity", "last", "--redis-url", redis_url, "--json")
    assert last.returncode == 0, last.stderr
    assert valid("parity-results", last.stdout) == {"orders": summary}


def test_shadow_views_are_one_document_per_view_and_only_the_admin_api_sees_the_replica(
    views_proxy: ProxyProcess, redis_url: str
) -> None:
    via_redis = ["--redis-url", redis_url]
    via_api = ["--url", views_proxy.url, "--token", TOKEN]
    docs: dict[str, list[dict[str, Any]]] = {}
    for via in (via_redis, via_api):
        docs.setdefault("on", []).append(valid("shadow", strangler("shadow", "on", "--json", *via).stdout))
        set_out = strangler("shadow", "set", "--sample", "12.5", "--group", "tasks", "--json", *via)
        docs.setdefault("set", []).append(valid("shadow-set", set_out.stdout))
        added = strangler("shadow", "ignore", "add", "--tolerance", "0.50", "--json", *via)
        docs.setdefault("add", []).append(valid("shadow-rule-change", added.stdout))
        status = strangler("shadow", "status", "--json", *via)
        docs.setdefault("status", []).append(valid("shadow", status.stdout))
        removed = strangler("shadow", "ignore", "remove", "--tolerance", "0.5", "--json", *via)
        docs.setdefault("remove", []).append(valid("shadow-rule-change", removed.stdout))
        docs.setdefault("off", []).append(valid("shadow", strangler("shadow", "off", "--json", *via).stdout))
        assert strangler("shadow", "set", "--reset", "--group", "tasks", *via).returncode == 0

    for view, (from_redis, from_api) in docs.items():
        assert from_redis["source"]["path"] == "redis" and from_api["source"]["path"] == "admin_api", view
        if "replica" in from_redis:  # the answering proxy's own state: only through its admin API
            assert from_redis["replica"] is None and isinstance(from_api["replica"], dict), view
            from_api["replica"] = None
        assert without_source(from_redis) == without_source(from_api), view
    assert docs["on"][0]["groups"]["default"]["enabled"] is True
    assert docs["off"][0]["groups"]["default"]["enabled"] is False
    assert docs["set"][0] == {
        "source": docs["set"][0]["source"],
        "group": "tasks",
        "written": {"group:tasks:sample_percentage": "12.5"},
    }
    assert docs["status"][0]["groups"]["tasks"]["sample_percentage"] == 12.5
    tolerance = {"kind": "tolerance", "endpoint": "*", "value": "0.5"}
    assert docs["add"][0]["change"] == "added" and docs["add"][0]["rule"] == tolerance
    assert docs["remove"][0]["change"] == "removed" and docs["remove"][0]["rule"] == tolerance
    assert {**tolerance, "source": "redis"} in docs["status"][0]["rules"]

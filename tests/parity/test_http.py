"""`strangler parity http` against two small list APIs on 127.0.0.1 (real sockets, real paging)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from typer.testing import CliRunner

from proxy.cli import app


class ListApi:
    """``GET /items`` paged by cursor (``?cursor=&limit=``), page (``?page=&limit=``) or offset
    (``?offset=&limit=``), and ``GET /items/<id>``. Records every query it was sent."""

    def __init__(self, records: list[dict[str, Any]], style: str, status: int = 200) -> None:
        self.records = records
        self.style = style
        self.status = status
        self.seen: list[dict[str, list[str]]] = []
        self.headers: list[str | None] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                api.headers.append(self.headers.get("Authorization"))
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                api.seen.append(query)
                if url.path.startswith("/items/"):
                    ident = url.path.rsplit("/", 1)[1]
                    found = [r for r in api.records if str(r["id"]) == ident]
                    self.answer(200 if found else 404, found[0] if found else {"error": "not found"})
                    return
                if api.status != 200:
                    self.answer(api.status, {"error": "boom"})
                    return
                limit = int(query.get("limit", ["10"])[0])
                if api.style == "cursor":
                    start = int(query.get("cursor", ["0"])[0])
                elif api.style == "page":
                    start = (int(query.get("page", ["1"])[0]) - 1) * limit
                else:
                    start = int(query.get("offset", ["0"])[0])
                page = api.records[start : start + limit]
                body: dict[str, Any] = {"data": {"items": page}}
                if api.style == "cursor":
                    body["next"] = str(start + limit) if start + limit < len(api.records) else None
                self.answer(200, body)

            def answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def apis() -> Iterator[Any]:
    made: list[ListApi] = []

    def make(records: list[dict[str, Any]], style: str, status: int = 200) -> ListApi:
        api = ListApi(records, style, status)
        made.append(api)
        return api

    yield make
    for api in made:
        api.stop()


def records(n: int) -> list[dict[str, Any]]:
    return [
        {"id": i, "name": f"n{i}", "price": i * 1.5, "tags": ["a", "b"], "etag": f"v1-{i}"} for i in range(n)
    ]


def parity_http(*args: str) -> tuple[int, dict[str, Any], str]:
    result = CliRunner().invoke(
        app,
        ["parity", "http", "--items-path", "data.items", "--no-store", "--json", "--page-size", "7", *args],
    )
    out = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {}
    return result.exit_code, out, result.stderr


@pytest.mark.parametrize("style", ["cursor", "page", "offset"])
def test_every_pagination_style_walks_every_record(apis: Any, style: str) -> None:
    old = records(30)
    new = [{**r, "etag": f"v2-{r['id']}"} for r in old if r["id"] != 4]  # every etag differs
    new.append({"id": 99, "name": "x", "price": 0, "tags": [], "etag": "e"})
    by_id = {r["id"]: r for r in new}
    by_id[10]["name"] = "renamed"
    by_id[21]["tags"] = ["b", "a"]  # order differs
    v1, v2 = apis(old, style), apis(new, style)
    code, report, err = parity_http(
        "--v1", v1.url, "--v2", v2.url, "--path", "/items", "--paginate", style, "--next-path", "next",
        "--exclude", "root['etag']", "-H", "Authorization: Bearer secret",
    )  # fmt: skip
    assert code == 1, err
    [table] = report["tables"]
    assert (table["source_rows"], table["target_rows"]) == (30, 30)
    assert table["samples"]["missing"] == ["4"] and table["samples"]["extra"] == ["99"]
    changed = {c["key"]: c["columns"] for c in table["samples"]["changed"]}
    assert changed["10"] == {"root['name']": ['"n10"', '"renamed"']}
    assert set(changed) == {"10", "21"}  # etag is ignored everywhere
    assert table["aggregates"]["pages"]["v1"] == 5  # 30 records, 7 per page (cursor: no empty page)
    assert set(v1.headers) == {"Bearer secret"}
    if style == "page":
        assert [q["page"] for q in v1.seen] == [["1"], ["2"], ["3"], ["4"], ["5"]]
    if style == "offset":
        assert [q["offset"] for q in v1.seen] == [["0"], ["7"], ["14"], ["21"], ["28"]]

    # ignore order makes id 21 equal; with the same data on both sides: exit 0
    code, report, _ = parity_http(
        "--v1", v1.url, "--v2", v1.url, "--path", "/items", "--paginate", style, "--next-path", "next",
    )  # fmt: skip
    assert code == 0 and report["tables"][0]["status"] == "equal"


def test_sampled_single_records_are_compared_whole(apis: Any) -> None:
    old = records(12)
    new = [dict(r) for r in old]
    for r in new:
        r["price"] = r["price"] + 0.001
    v1, v2 = apis(old, "offset"), apis(new, "offset")
    code, report, err = parity_http(
        "--v1", v1.url, "--v2", v2.url, "--path", "/items", "--paginate", "offset",
        "--item-path", "/items/{id}", "--sample", "5", "--tolerance", "0.01",
    )  # fmt: skip
    assert code == 0, err
    lists, items = report["tables"]
    assert lists["status"] == items["status"] == "equal" and items["source_rows"] == 5
    item_queries = [q for q in v2.seen if not q]
    assert len(item_queries) == 5
    code, report, _ = parity_http(
        "--v1", v1.url, "--v2", v2.url, "--path", "/items", "--paginate", "offset",
        "--item-path", "/items/{id}", "--sample", "5",
    )  # fmt: skip
    assert code == 1 and report["tables"][1]["changed"] == 5


def test_a_failing_or_unreachable_api_exits_2(apis: Any) -> None:
    v1, broken = apis(records(3), "cursor"), apis(records(3), "cursor", status=500)
    code, report, _ = parity_http("--v1", v1.url, "--v2", broken.url, "--path", "/items")
    assert code == 2 and "answered 500" in report["tables"][0]["error"]
    code, report, _ = parity_http("--v1", v1.url, "--v2", "http://127.0.0.1:1", "--path", "/items")
    assert code == 2 and "ConnectError" in report["tables"][0]["error"]
    code, _, err = parity_http("--v1", v1.url, "--v2", v1.url, "--path", "/items", "--paginate", "sideways")
    assert code == 2 and "pagination must be one of" in err


def test_the_live_shadow_ignore_rules_apply_to_records_and_items(apis: Any, redis_url: str) -> None:
    import redis

    from proxy.shadow.policy import rule_key

    old = records(9)
    new = [{**r, "etag": "changed", "name": r["name"].upper()} for r in old]
    v1, v2 = apis(old, "page"), apis(new, "page")
    args = (
        "--v1", v1.url, "--v2", v2.url, "--path", "/items", "--paginate", "page",
        "--item-path", "/items/{id}", "--sample", "3", "--redis-url", redis_url,
    )  # fmt: skip
    code, report, _ = parity_http(*args, "--shadow-rules")
    assert code == 1 and report["tables"][0]["changed_columns"] == {"root['etag']": 9, "root['name']": 9}
    client = redis.Redis.from_url(redis_url)
    client.hset(
        "strangler:shadow_rules",
        mapping={
            # page paths of the list endpoint apply to each record of it
            rule_key("exclude_path", "GET /items", "root['data']['items'][*]['etag']"): "1",
            rule_key("exclude_path", "GET /items", "root['data']['items'][*]['name']"): "1",
            # the item endpoint's own rules, and rules for every endpoint
            rule_key("exclude_path", "GET /items/{id}", "root['etag']"): "1",
            rule_key("exclude_path", "*", "root['name']"): "1",
        },
    )
    code, report, err = parity_http(*args, "--shadow-rules")
    assert code == 0, (report, err)
    code, report, _ = parity_http(*args)  # without the flag: the rules are not read
    assert code == 1


def test_a_malformed_url_is_exit_2_not_a_traceback(apis: Any) -> None:
    v1 = apis(records(3), "cursor")
    code, report, err = parity_http("--v1", v1.url, "--v2", "not a url", "--path", "/items")
    assert (code, report, err.strip()) == (
        2,
        {},
        "error: --v2: 'not a url' is not an http:// or https:// URL with a host",
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (("--v1", "notaurl", "--v2", "http://127.0.0.1:9", "--path", "/items"),
         "error: --v1: 'notaurl' is not an http:// or https:// URL with a host"),
        (("--v1", "http://127.0.0.1:9", "--v2", "ftp://x", "--path", "/items"),
         "error: --v2: 'ftp://x' is not an http:// or https:// URL with a host"),
        (("--v1", "http://127.0.0.1:9", "--v2", "http://127.0.0.1:9", "--path", "items"),
         "error: --path: 'items' must start with /"),
    ],
)  # fmt: skip
def test_a_bad_url_or_path_names_its_flag_before_any_request(args: tuple[str, ...], line: str) -> None:
    """Exit 2 and one line naming the flag (before: the walk failed naming only the path)."""
    code, out, err = parity_http(*args)
    assert (code, out, err.strip()) == (2, {}, line)

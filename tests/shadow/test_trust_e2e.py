"""A diff report a team can trust. One test per defect, each with scripted v1/v2 backends
that reproduce it and a real proxy, asserting the report's exact counts and fields.

The proxies here run one shadow worker, so mirrored requests are handled in the order they were
sent and "the n-th answer" of a scripted backend is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.shadow.conftest import Scripted
from tests.shadow.helpers import cli, detail, row, summary, wait_row
from tests.support import ProxyProcess, wait_until

Start = Callable[..., ProxyProcess]
Pair = tuple[Scripted, Scripted]


def get(proxy: ProxyProcess, *paths: str, headers: dict[str, str] | None = None) -> None:
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for path in paths:
            assert client.get(path, headers=headers).status_code < 600


def counts(found: dict[str, Any]) -> tuple[int, int, int, int, int]:
    return found["compared"], found["matched"], found["mismatched"], found["noise"], found["skipped"]


def shadow_status(proxy: ProxyProcess) -> dict[str, Any]:
    return dict(httpx.get(proxy.admin + "/shadow", timeout=5).json())


# 1 -------------------------------------------------------------------------------------------------


def test_one_v1_error_on_calibration_never_hides_a_v2_that_answers_500(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    good = {"json": {"id": 1, "name": "a"}}
    v1.script("/t1/item", primary=[good], calibration=[{"status": 503, "json": {"error": "busy"}}, good])
    v2.script("/t1/item", any=[{"status": 500, "json": {"error": "boom"}}])
    proxy = shadow_proxy(calibration_percentage=100)
    get(proxy, *["/t1/item"] * 5)
    found = wait_row(proxy, "GET /t1/item", compared=5)
    assert counts(found) == (5, 0, 5, 0, 0)
    assert found["mismatch_rate"] == 1.0  # what max_shadow_mismatch_rate reads
    report = detail(proxy, "GET /t1/item")
    assert report["fields"] == {"status": 5, "root['error']": 5, "root['id']": 5, "root['name']": 5}
    assert report["noise_seen"] == {} and report["noise_fields"] == [] and report["suppressed"] == {}
    assert len(v1.requests("/t1/item")) == 10  # every request was calibrated, learnt nothing


def test_a_field_that_varied_once_is_not_noise(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    v1.script("/t1/ts", primary=[{"json": {"ts": 1}}], calibration=[{"json": {"ts": 2}}, {"json": {"ts": 1}}])
    v2.script("/t1/ts", any=[{"json": {"ts": 3}}])
    proxy = shadow_proxy(calibration_percentage=100)  # noise_threshold: 2 (default)
    get(proxy, *["/t1/ts"] * 4)
    assert counts(wait_row(proxy, "GET /t1/ts", compared=4)) == (4, 0, 4, 0, 0)
    report = detail(proxy, "GET /t1/ts")
    assert report["fields"] == {"root['ts']": 4}
    assert report["noise_seen"] == {"root['ts']": 1} and report["noise_fields"] == []


# 2 -------------------------------------------------------------------------------------------------


def test_forget_noise_reaches_every_running_replica(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    v1.script(
        "/t2/r",
        primary=[{"json": {"r": n}} for n in range(100)],
        calibration=[{"json": {"r": 1000 + n}} for n in range(100)],
    )
    v2.script("/t2/r", any=[{"json": {"r": -1}}])
    a = shadow_proxy(calibration_percentage=100)
    b = shadow_proxy(prefix=a.settings["key_prefix"], calibration_percentage=100)
    get(a, *["/t2/r"] * 3)  # the first waits (pending) for the second calibration: all noise
    wait_row(a, "GET /t2/r", compared=3)
    wait_until(lambda: shadow_status(b)["noise_in_force"] == {"GET /t2/r": 1}, message="b reads a's noise")
    get(b, *["/t2/r"] * 2)
    assert counts(wait_row(a, "GET /t2/r", compared=5)) == (5, 0, 0, 5, 0)
    assert detail(a, "GET /t2/r")["noise_fields"] == ["root['r']"]

    # stop calibrating, then forget: both replicas must stop suppressing within the poll interval
    cli(a, "shadow", "set", "--calibration", "0")
    wait_until(
        lambda: all(shadow_status(p)["in_force"]["default"]["calibration_percentage"] == 0 for p in (a, b))
    )
    epoch = shadow_status(a)["report_epoch"]
    cli(a, "diffs", "--reset", "--forget-noise")
    wait_until(
        lambda: all(shadow_status(p)["report_epoch"] == epoch + 1 for p in (a, b)),
        timeout=5,
        message="every replica saw the reset",
    )
    assert all(shadow_status(p)["noise_in_force"] == {} for p in (a, b))
    get(a, "/t2/r", "/t2/r")
    get(b, "/t2/r", "/t2/r")
    assert counts(wait_row(a, "GET /t2/r", compared=4)) == (4, 0, 4, 0, 0)
    report = detail(a, "GET /t2/r")
    assert (
        report["fields"] == {"root['r']": 4} and report["noise_fields"] == [] and report["suppressed"] == {}
    )


# 3 -------------------------------------------------------------------------------------------------


def test_noise_never_hides_a_change_of_type_presence_or_structure(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    item = {"n": 1}
    # a random id and a list whose length varies, in every v1 answer
    v1.script(
        "/t3/feed",
        primary=[{"json": {"id": f"u{n}", "items": [item] * (1 + n % 3)}} for n in range(6)],
        calibration=[{"json": {"id": f"c{n}", "items": [item] * (2 + n % 3)}} for n in range(6)],
    )
    v2.script(
        "/t3/feed",
        shadow=[
            {"json": {"id": "x", "items": [item]}},  # 0: pending until noise is known, then noise
            {"json": {"id": "y", "items": [item]}},  # 1: noise
            {"json": {"id": "z", "items": [item]}},  # 2: noise
            {"json": {"id": 7, "items": [item]}},  # 3: a string became an integer
            {"json": {"items": [item]}},  # 4: the field is gone
            {"json": {"id": "w", "items": [{"n": "1"}] * 4}},  # 5: every item's n became a string
        ],
    )
    proxy = shadow_proxy(calibration_percentage=100)
    get(proxy, *["/t3/feed"] * 6)
    assert counts(wait_row(proxy, "GET /t3/feed", compared=6)) == (6, 0, 3, 3, 0)
    report = detail(proxy, "GET /t3/feed")
    assert report["fields"] == {"root['id']": 2, "root['items'][*]['n']": 1, "root['items'][*]": 1}
    assert report["noise_fields"] == ["len(root['items'])", "root['id']"]
    kinds = {(d["field"], d["kind"]) for s in report["samples"] for d in s["diff"]}
    assert {("root['id']", "type"), ("root['id']", "removed"), ("root['items'][*]['n']", "type")} <= kinds


# 4 -------------------------------------------------------------------------------------------------


def test_numbers_are_compared_exactly_and_one_equals_one_point_zero(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    v1.script(
        "/t4/money",
        any=[
            {
                "text": '{"big": 18446744073709551621, "dec": 1.00000000000000001, '
                '"one": 1, "price": 10.10, "sci": 1E2}'
            }
        ],
    )
    v2.script(
        "/t4/money",
        any=[{"text": '{"big": 18446744073709551622, "dec": 1.0, "one": 1.0, "price": 10.1, "sci": 100}'}],
    )
    v1.script("/t4/same", any=[{"text": '{"id": 340282366920938463463374607431768211455, "x": 0.1}'}])
    v2.script("/t4/same", any=[{"text": '{"x":1e-1,"id":340282366920938463463374607431768211455}'}])
    proxy = shadow_proxy()
    get(proxy, "/t4/money", "/t4/same")
    assert counts(wait_row(proxy, "GET /t4/money", compared=1)) == (1, 0, 1, 0, 0)
    report = detail(proxy, "GET /t4/money")
    assert report["fields"] == {"root['big']": 1, "root['dec']": 1}
    diffs = {d["field"]: (d["v1"], d["v2"]) for d in report["samples"][0]["diff"]}
    assert diffs["root['big']"] == ("18446744073709551621", "18446744073709551622")
    assert diffs["root['dec']"] == ("1.00000000000000001", "1")
    assert counts(wait_row(proxy, "GET /t4/same", compared=1)) == (1, 1, 0, 0, 0)


# 5 -------------------------------------------------------------------------------------------------

MiB = 1024 * 1024


def test_a_hung_v2_with_1mb_answers_stays_within_the_byte_budget(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    size = MiB  # exactly compare_max_bytes: every primary body is captured
    v1.script("/t5/big", any=[{"size": size}])
    v2.script("/t5/big", any=[{"delay": 120, "json": {}}])  # hung
    budget = 16 * MiB
    proxy = shadow_proxy(  # its memory is measured: its own process
        concurrency=4, queue_size=1000, timeout_seconds=300, max_buffered_bytes=budget, process=True
    )
    total = 120
    before = proxy.rss()
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        for _ in range(total):
            assert len(client.get("/t5/big").content) == size
    grown = proxy.rss() - before
    admitted = (budget // 2) // size  # half the budget for queued jobs, half for answers being read
    status = shadow_status(proxy)
    assert status["buffered_bytes"] == admitted * size
    assert proxy.metric("strangler_shadow_requests_total", outcome="dropped") == total - admitted
    assert proxy.metric("strangler_shadow_requests_total", outcome="sent") == 4  # the hung workers
    wait_until(lambda: summary(proxy)["groups"]["default"]["dropped"] == total - admitted, timeout=5)
    # 120 MiB went through; the mirror held 8 MiB of it (RSS also holds allocator slack)
    assert grown < budget + 48 * MiB, f"RSS grew {grown / MiB:.1f} MiB"
    print(f"\nRSS grew {grown / MiB:.1f} MiB for {total} x 1 MiB answers, budget {budget // MiB} MiB")


# 6 -------------------------------------------------------------------------------------------------


def test_a_crawler_cannot_push_a_busy_endpoint_out_and_reset_frees_slots(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    v1.script("/t6/orders/1", any=[{"json": {"total": 10}}])
    v2.script("/t6/orders/1", any=[{"json": {"total": 11}}])
    proxy = shadow_proxy(max_endpoints=20)
    get(proxy, *["/t6/orders/1"] * 5)
    get(proxy, *[f"/t6/search/word{n}" for n in range(60)])
    get(proxy, *["/t6/orders/1"] * 5)
    orders = wait_row(proxy, "GET /t6/orders/{id}", compared=10)
    assert counts(orders) == (10, 0, 10, 0, 0)  # never pushed into "other"
    words = [r for r in summary(proxy)["endpoints"] if r["endpoint"].startswith("GET /t6/search/")]
    other = row(proxy, "other")
    # 19 free slots went to the first words; the other 41 evicted each other and stayed "other"
    assert len(words) == 19 and other is not None and other["compared"] == 41

    # a reset frees the slots on every replica: new names get theirs at once
    cli(proxy, "diffs", "--reset")
    wait_until(lambda: shadow_status(proxy)["report_epoch"] >= 1, timeout=5)
    get(proxy, *[f"/t6/fresh/name{n}" for n in range(20)])
    wait_until(lambda: len(summary(proxy)["endpoints"]) == 20, timeout=10, message="20 own names")
    assert row(proxy, "other") is None


def test_endpoint_names_from_patterns_dates_slugs_and_hashes(shadow_proxy: Start, scripted: Pair) -> None:
    proxy = shadow_proxy(endpoint_patterns=["/t6/search/{term}"])
    get(
        proxy,
        "/t6/search/apples",
        "/t6/search/pears",
        "/t6/reports/2024-01-31",
        "/t6/reports/2024-02-29",
        "/t6/posts/how-to-cook-rice",
        "/t6/commits/9f1c2ab",
        "/t6/commits/e83c5163316f89bfbde7d9ab23ca2e25604af290",
    )

    def seven() -> list[dict[str, Any]] | None:
        rows = summary(proxy)["endpoints"]
        return rows if sum(r["compared"] for r in rows) == 7 else None

    names = {r["endpoint"]: r["compared"] for r in wait_until(seven, message="7 comparisons")}
    assert names == {
        "GET /t6/search/{term}": 2,
        "GET /t6/reports/{date}": 2,
        "GET /t6/posts/{slug}": 1,
        "GET /t6/commits/{id}": 2,
    }


# 7 -------------------------------------------------------------------------------------------------


def test_compressed_answers_are_compared_decoded(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    doc = {"id": 1, "lines": [{"sku": "a", "qty": 2}] * 50}
    changed = {"id": 1, "lines": [{"sku": "a", "qty": 2}] * 49 + [{"sku": "a", "qty": 3}]}
    v1.script("/t7/gz", any=[{"json": doc, "encode": "gzip:1"}])
    v2.script("/t7/gz", any=[{"json": doc, "encode": "gzip:9"}])
    v1.script("/t7/gzdiff", any=[{"json": doc, "encode": "gzip:1"}])
    v2.script("/t7/gzdiff", any=[{"json": changed, "encode": "gzip:9"}])
    v1.script("/t7/br", any=[{"json": doc, "encode": "br"}])
    v2.script("/t7/br", any=[{"json": changed, "encode": "br"}])
    v1.script("/t7/deflate", any=[{"json": doc, "encode": "deflate"}])
    v2.script("/t7/deflate", any=[{"json": doc, "encode": "deflate:9"}])
    v1.script("/t7/bomb", any=[{"json": {"ok": True}, "encode": "gzip:9"}])
    v2.script("/t7/bomb", any=[{"text": " " * (50 * MiB), "encode": "gzip:9"}])  # 50 KB on the wire
    proxy = shadow_proxy()
    get(proxy, "/t7/gz", "/t7/gzdiff", "/t7/br", "/t7/deflate", "/t7/bomb")
    assert counts(wait_row(proxy, "GET /t7/gz", compared=1)) == (1, 1, 0, 0, 0)
    assert counts(wait_row(proxy, "GET /t7/deflate", compared=1)) == (1, 1, 0, 0, 0)
    for path in ("/t7/gzdiff", "/t7/br"):
        assert counts(wait_row(proxy, f"GET {path}", compared=1)) == (1, 0, 1, 0, 0)
        assert detail(proxy, f"GET {path}")["fields"] == {"root['lines'][*]['qty']": 1}
    # decoding stops at compare_max_bytes: the bomb is "far larger than v1", not 50 MiB in memory
    assert counts(wait_row(proxy, "GET /t7/bomb", compared=1)) == (1, 0, 1, 0, 0)
    assert detail(proxy, "GET /t7/bomb")["fields"] == {"body-size": 1}


# 8 -------------------------------------------------------------------------------------------------


def test_markers_sent_by_a_client_never_reach_v2_or_calibration(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    proxy = shadow_proxy(calibration_percentage=100)
    forged = {
        "X-Strangler-Shadow": "forged",
        "X-Strangler-Calibration": "forged",
        "Authorization": "Bearer t",
    }
    get(proxy, "/t8/mark", headers=forged)
    wait_row(proxy, "GET /t8/mark", pending=1)  # settled; judged once calibrated (no false alarms before)
    (mirrored,) = v2.requests("/t8/mark")

    def marker_values(entry: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((k.lower(), v) for k, v in entry["headers"] if k.lower().startswith("x-strangler-"))

    # (the primary copy to v1 is the request path's business: tests/shadow/test_markers_e2e.py)
    calibration = [e for e in v1.requests("/t8/mark") if ("x-strangler-calibration", "1") in marker_values(e)]
    assert len(calibration) == 1

    assert marker_values(mirrored) == [("x-strangler-shadow", "1")]
    assert marker_values(calibration[0]) == [("x-strangler-calibration", "1"), ("x-strangler-shadow", "1")]
    # documented: the client's credentials go to v2 with the mirrored copy
    assert ("Authorization", "Bearer t") in [tuple(h) for h in mirrored["headers"]]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/t8/del", {"X-HTTP-Method-Override": "DELETE"}),
        ("/t8/del2", {"X-Method-Override": "delete"}),
        ("/t8/del3?_method=DELETE", {}),
    ],
)
def test_a_method_override_is_never_calibrated_and_is_named_by_its_method(
    shadow_proxy: Start, scripted: Pair, path: str, headers: dict[str, str]
) -> None:
    """A group that opted in to mirroring DELETE: a GET claiming DELETE goes to v2 once, never twice
    to v1 (calibration is for safe requests only), and is reported as a DELETE."""
    v1, v2 = scripted
    proxy = shadow_proxy(methods=["GET", "DELETE"], calibration_percentage=100, calibration_warmup=3)
    get(proxy, path, headers=headers)
    plain = path.split("?")[0]
    found = wait_row(proxy, f"DELETE {plain}", compared=1)
    assert counts(found) == (1, 1, 0, 0, 0)
    assert [e["kind"] for e in v1.requests(plain)] == ["primary"]
    assert [e["kind"] for e in v2.requests(plain)] == ["shadow"]


# 9 -------------------------------------------------------------------------------------------------


def test_ignore_order_compares_lists_as_multisets(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    v1.script("/t9/cart", any=[{"json": {"lines": [1, 1, 2]}}])
    v2.script("/t9/cart", shadow=[{"json": {"lines": [1, 2]}}, {"json": {"lines": [2, 1, 1]}}])
    proxy = shadow_proxy(ignore_order=True)
    get(proxy, "/t9/cart", "/t9/cart")
    assert counts(wait_row(proxy, "GET /t9/cart", compared=2)) == (2, 1, 1, 0, 0)
    report = detail(proxy, "GET /t9/cart")
    assert report["fields"] == {"root['lines'][*]": 1}
    assert report["samples"][0]["diff"][0]["kind"] == "repeated"


# 10 ------------------------------------------------------------------------------------------------


def test_an_answer_over_the_compare_limit_still_has_its_status_and_size_compared(
    shadow_proxy: Start, scripted: Pair
) -> None:
    v1, v2 = scripted
    v1.script("/t10/small", any=[{"json": {"ok": True}}])  # 12 bytes
    v2.script("/t10/small", any=[{"size": 100_000}])
    v1.script("/t10/both", any=[{"size": 50_000}])
    v2.script("/t10/both", shadow=[{"size": 60_000, "status": 500}, {"size": 60_000}])
    proxy = shadow_proxy(compare_max_bytes=10_000)
    get(proxy, "/t10/small", "/t10/both", "/t10/both")
    assert counts(wait_row(proxy, "GET /t10/small", compared=1)) == (1, 0, 1, 0, 0)
    assert detail(proxy, "GET /t10/small")["fields"] == {"body-size": 1}
    # both over the limit: the status is still compared; equal status and type: skipped
    both = wait_row(proxy, "GET /t10/both", skipped=1, mismatched=1)
    assert (both["mismatched"], both["skipped"], both["compared"]) == (1, 1, 1)
    assert detail(proxy, "GET /t10/both")["fields"] == {"status": 1}


# 11 ------------------------------------------------------------------------------------------------


def test_a_bom_or_a_json_charset_is_not_a_difference(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    v1.script("/t11/bom", any=[{"json": {"a": 1}}])
    v2.script("/t11/bom", any=[{"json": {"a": 1}, "bom": True}])
    v1.script("/t11/charset", any=[{"json": {"a": 1}, "headers": {"Content-Type": "application/json"}}])
    v2.script(
        "/t11/charset",
        any=[{"json": {"a": 1}, "headers": {"Content-Type": "application/json; charset=utf-8"}}],
    )
    v1.script("/t11/html", any=[{"text": "<p>", "headers": {"Content-Type": "text/html; charset=utf-8"}}])
    v2.script("/t11/html", any=[{"text": "<p>", "headers": {"Content-Type": "text/html; charset=latin-1"}}])
    proxy = shadow_proxy()
    get(proxy, "/t11/bom", "/t11/charset", "/t11/html")
    assert counts(wait_row(proxy, "GET /t11/bom", compared=1)) == (1, 1, 0, 0, 0)
    assert counts(wait_row(proxy, "GET /t11/charset", compared=1)) == (1, 1, 0, 0, 0)
    # outside JSON the charset matters
    assert counts(wait_row(proxy, "GET /t11/html", compared=1)) == (1, 0, 1, 0, 0)
    assert detail(proxy, "GET /t11/html")["fields"] == {"content-type": 1}


# 12 ------------------------------------------------------------------------------------------------


def test_semantic_headers_are_compared(shadow_proxy: Start, scripted: Pair) -> None:
    v1, v2 = scripted
    v1.script("/t12/go", any=[{"status": 302, "headers": {"Location": "/a"}}])
    v2.script("/t12/go", any=[{"status": 302, "headers": {"Location": "http://evil.example/b"}}])
    v1.script("/t12/cache", any=[{"json": {}, "headers": {"Cache-Control": "no-store, private"}}])
    v2.script(
        "/t12/cache",
        shadow=[
            {"json": {}, "headers": {"Cache-Control": "private,no-store"}},
            {"json": {}, "headers": {"Cache-Control": "public, max-age=3600"}},
        ],
    )
    v1.script("/t12/enc", any=[{"json": {"a": 1}, "encode": "gzip"}])
    v2.script("/t12/enc", any=[{"json": {"a": 1}}])
    proxy = shadow_proxy()
    get(proxy, "/t12/go", "/t12/cache", "/t12/cache", "/t12/enc")
    assert counts(wait_row(proxy, "GET /t12/go", compared=1)) == (1, 0, 1, 0, 0)
    go = detail(proxy, "GET /t12/go")
    assert go["fields"] == {"header:location": 1}
    assert go["samples"][0]["diff"] == [
        {"field": "header:location", "kind": "changed", "v1": "/a", "v2": "http://evil.example/b"}
    ]
    assert counts(wait_row(proxy, "GET /t12/cache", compared=2)) == (2, 1, 1, 0, 0)
    assert detail(proxy, "GET /t12/cache")["fields"] == {"header:cache-control": 1}
    assert counts(wait_row(proxy, "GET /t12/enc", compared=1)) == (1, 0, 1, 0, 0)
    assert detail(proxy, "GET /t12/enc")["fields"] == {"header:content-encoding": 1}

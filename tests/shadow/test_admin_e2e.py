"""The admin API serves the same report and settings as the CLI; changes need the token."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.shadow.helpers import BASE_SHADOW, in_force, wait_row
from tests.support import Backend, ProxyProcess, wait_until

TOKEN = "s3cret-token"


def test_admin_routes_for_settings_rules_and_report(
    proxy_factory: Callable[..., ProxyProcess], v1v2: tuple[Backend, Backend], redis_url: str
) -> None:
    v1, v2 = v1v2
    v2.control(extra={"total": 3})
    proxy = proxy_factory(
        v1_url=v1.url, v2_url=v2.url, redis_url=redis_url, admin_token=TOKEN,
        routes=[{"name": "orders", "patterns": ["/orders/**"]}], shadow={**BASE_SHADOW, "enabled": False},
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {TOKEN}"}
    admin = httpx.Client(base_url=proxy.admin, timeout=5)

    assert admin.put("/shadow", json={"enabled": True}).status_code == 401
    assert admin.post("/diffs/reset").status_code == 401
    assert admin.put("/shadow", json={"sample_percentage": 150}, headers=auth).status_code == 422
    assert admin.put("/shadow", json={"bogus": 1}, headers=auth).status_code == 422
    assert (
        admin.put("/shadow", json={"compare_max_bytes": 5, "group": "orders"}, headers=auth).status_code
        == 422
    )
    written = admin.put("/shadow", json={"enabled": True, "methods": ["GET", "POST"], "group": "orders"},
                        headers=auth)  # fmt: skip
    assert written.status_code == 200 and written.json()["written"] == {
        "group:orders:enabled": "true", "group:orders:methods": "GET,POST"
    }  # fmt: skip
    admin.put("/shadow", json={"enabled": True}, headers=auth).raise_for_status()
    wait_until(lambda: in_force(proxy, "orders")["enabled"], timeout=5, message="enabled live")
    assert in_force(proxy, "orders")["methods"] == ["GET", "POST"]
    assert in_force(proxy, "default")["methods"] == ["GET", "HEAD", "OPTIONS"]

    rule = {"kind": "exclude_path", "endpoint": "POST /orders/**", "value": "root['total']"}
    assert admin.put("/shadow/rules", json={**rule, "value": "total"}, headers=auth).status_code == 422
    assert admin.put("/shadow/rules", json=rule, headers=auth).status_code == 200
    assert rule | {"source": "redis"} in admin.get("/shadow/rules").json()["rules"]
    wait_until(lambda: len(admin.get("/shadow").json()["rules_in_force"]) == 2, timeout=5)

    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for i in range(3):
            assert client.post(f"/orders/{i}", json={"i": i}).status_code == 200
            assert client.get(f"/orders/{i}").status_code == 200
    assert wait_row(proxy, "POST /orders/**", compared=3)["matched"] == 3  # the rule hides the new field
    assert wait_row(proxy, "GET /orders/**", compared=3)["mismatched"] == 3
    report = admin.get("/diffs").json()
    assert [row["endpoint"] for row in report["endpoints"]] == ["GET /orders/**", "POST /orders/**"]
    assert report["groups"]["orders"]["sent"] == 6
    assert admin.get("/diffs", params={"endpoint": "GET /orders/**"}).json()["fields"] == {"root['total']": 3}
    assert admin.get("/diffs", params={"endpoint": "GET /nope"}).status_code == 404

    assert admin.request("DELETE", "/shadow/rules", json=rule, headers=auth).json() == {"removed": True}
    assert admin.post("/diffs/reset", headers=auth).json()["reset"] is True
    assert admin.get("/diffs").json() == {"endpoints": [], "groups": {}}
    admin.close()

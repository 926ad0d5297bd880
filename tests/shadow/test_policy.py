"""Parsing the live shadow settings and ignore rules (pure: raw Redis strings in, policy out)."""

from __future__ import annotations

import pytest

from proxy.settings import ConfigError, Settings, load_settings
from proxy.shadow.endpoints import OTHER, EndpointNamer, templated
from proxy.shadow.policy import (
    GroupPolicy,
    ShadowPolicy,
    glob_to_regex,
    make_policy_parser,
    make_rule,
    make_rules_parser,
    rule_key,
    validate_fields,
)
from proxy.traffic.routing import RouteTable


def settings(**shadow: object) -> Settings:
    return Settings(
        routes=[{"name": "orders", "patterns": ["/orders/**"]}, {"name": "users", "patterns": ["/users/*"]}],
        shadow=shadow,
    )


def parse(raw: dict[str, str], previous: object = None, **shadow: object) -> tuple[ShadowPolicy, list[str]]:
    return make_policy_parser(settings(**shadow))(raw, previous)


def test_config_defaults_without_redis() -> None:
    policy, problems = parse({})
    assert problems == []
    default = policy.for_group("default")
    assert (default.enabled, default.sample_percentage, default.methods) == (
        False, 100.0, frozenset({"GET", "HEAD", "OPTIONS"})
    )  # fmt: skip
    assert default.body_limit == default.max_body == 1024 * 1024 and default.max_compare == 1024 * 1024
    assert policy.for_group("unknown-group") is policy.default


def test_live_values_override_config_and_groups_override_global() -> None:
    policy, problems = parse(
        {
            "enabled": "on",
            "sample_percentage": "12.5",
            "methods": "get, head",
            "group:orders:methods": "GET,POST",
            "group:orders:sample_percentage": "100",
            "group:users:enabled": "false",
            "max_body_bytes": "0",
        },
        groups={"users": {"sample_percentage": 50}},
    )
    assert problems == []
    assert policy.for_group("default").sample_percentage == 12.5
    assert policy.for_group("default").methods == frozenset({"GET", "HEAD"})
    orders = policy.for_group("orders")
    assert orders.enabled and orders.sample_percentage == 100 and orders.methods == frozenset({"GET", "POST"})
    assert policy.for_group("users").enabled is False
    assert policy.for_group("users").sample_percentage == 50  # config group value beats live global
    # a 0-byte limit still gives forward.py a capture limit, so a chunked body is seen as too large
    assert (policy.default.body_limit, policy.default.max_body) == (0, 1)


def test_global_off_is_a_kill_switch_for_every_group() -> None:
    policy, _ = parse({"enabled": "false", "group:orders:enabled": "true"}, enabled=True)
    assert not any(gp.enabled for gp in policy.groups.values())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_percentage", "abc"),
        ("sample_percentage", "150"),
        ("sample_percentage", "nan"),
        ("enabled", "maybe"),
        ("methods", "GET,FETCH"),
        ("methods", ""),
        ("max_body_bytes", "-1"),
        ("max_body_bytes", "1MB"),
        ("group:nope:enabled", "true"),
        ("group:orders:compare_max_bytes", "1"),
        ("surprise", "1"),
    ],
)
def test_bad_values_are_rejected_and_the_last_good_value_is_kept(field: str, value: str) -> None:
    good, problems = parse({"sample_percentage": "5", "enabled": "true", "methods": "GET"})
    assert problems == []
    policy, problems = parse(
        {"sample_percentage": "5", "enabled": "true", "methods": "GET", field: value}, good
    )
    assert len(problems) == 1 and field in problems[0]
    assert policy.for_group("default") == good.for_group("default")
    # with no previous good value the config default is used
    fresh, problems = parse({field: value})
    assert len(problems) == 1 and fresh.for_group("default").sample_percentage == 100


def test_deleting_a_field_goes_back_to_the_config_default() -> None:
    live, _ = parse({"sample_percentage": "5"}, sample_percentage=40)
    back, _ = parse({}, live, sample_percentage=40)
    assert back.for_group("default").sample_percentage == 40


def test_validate_fields_normalises_what_our_tools_write() -> None:
    groups = ["default", "orders"]
    assert validate_fields({"methods": "post,get", "enabled": True, "sample_percentage": 5.0}, groups) == {
        "methods": "GET,POST", "enabled": "true", "sample_percentage": "5"
    }  # fmt: skip
    assert validate_fields({"group:orders:sample_percentage": None}, groups) == {
        "group:orders:sample_percentage": None
    }
    with pytest.raises(ValueError):
        validate_fields({"sample_percentage": "101"}, groups)


def test_rules_parser_merges_config_and_live_rules_and_keeps_last_good() -> None:
    parser = make_rules_parser(
        settings(exclude_paths=["root['version']"], ignore_order_endpoints=["GET /lists"])
    )
    live = rule_key("exclude_path", "GET /users/*", "root['data'][*]['updated_at']")
    rule_set, problems = parser({live: "1", rule_key("tolerance", "*", "0.5"): "1"}, None)
    assert problems == []
    users = rule_set.for_endpoint("GET /users/*")
    assert users.exclude_paths == ("root['version']",)
    assert [r.pattern for r in users.exclude_regexes] == [glob_to_regex("root['data'][*]['updated_at']")]
    assert users.tolerance == 0.5 and users.ignore_order is False
    assert rule_set.for_endpoint("GET /lists").ignore_order is True
    # a broken rule next to the good ones: reported, the good ones stay
    broken, problems = parser({live: "1", '["exclude_regex", "*", "("]': "1", "not json": "1"}, rule_set)
    assert len(problems) == 2
    assert broken.for_endpoint("GET /users/*").exclude_regexes == users.exclude_regexes


def test_glob_paths_match_one_index_or_key() -> None:
    import re

    regex = re.compile(glob_to_regex("root['data'][*]['updated_at']"))
    assert regex.search("root['data'][0]['updated_at']")
    assert regex.search("root['data']['k']['updated_at']")
    assert not regex.search("root['data'][0]['x']['updated_at']")
    assert not regex.search("root['data'][0]['updated_at_2']")


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("exclude_path", "data.id"),
        ("exclude_regex", "("),
        ("tolerance", "-1"),
        ("tolerance", "x"),
        ("nope", ""),
    ],
)
def test_invalid_rules_are_refused(kind: str, value: str) -> None:
    with pytest.raises(ValueError):
        make_rule(kind, None, value)


def test_bad_config_rules_are_one_config_error() -> None:
    with pytest.raises(ConfigError):
        load_settings(None, shadow={"exclude_paths": ["data.id"]})
    with pytest.raises(ConfigError):
        load_settings(None, shadow={"exclude_regex_paths": ["("]})


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/users/42", "/api/users/{id}"),
        ("/api/users/42/orders/7", "/api/users/{id}/orders/{id}"),
        ("/api/items/9f1c3a6e-0b1d-4c2e-9a8b-1234567890ab", "/api/items/{id}"),
        ("/api/blobs/507f1f77bcf86cd799439011", "/api/blobs/{id}"),
        ("/api/blobs/cafe", "/api/blobs/cafe"),
        ("/api/v2/users", "/api/v2/users"),
        ("/", "/"),
        ("/reports/2024-01-31", "/reports/{date}"),
        ("/reports/2024-01-31T10:00:00Z/raw", "/reports/{date}/raw"),
        ("/commits/9f1c2ab", "/commits/{id}"),
        ("/commits/deadbeef", "/commits/deadbeef"),  # a word that happens to be hex: kept
        ("/posts/how-to-cook-rice", "/posts/{slug}"),
        ("/user-settings/dark-mode", "/user-settings/dark-mode"),
        ("/search/word17", "/search/word17"),  # name these with endpoint_patterns
    ],
)
def test_id_segments_become_placeholders(path: str, expected: str) -> None:
    assert templated(path) == expected


def test_endpoint_names_use_group_patterns_and_slots_go_to_volume() -> None:
    namer = EndpointNamer(RouteTable(settings().routes), max_endpoints=3)
    assert namer.name("GET", "/orders/1/lines/2") == "GET /orders/**"
    assert namer.name("GET", "/orders/2") == "GET /orders/**"
    assert namer.name("POST", "/orders/1") == "POST /orders/**"
    assert namer.name("GET", "/users/bob") == "GET /users/*"
    # the sketch is full: a newcomer evicts the least seen name but must be seen twice to be named
    assert namer.name("GET", "/health/deep") == OTHER
    assert namer.name("GET", "/health/deep") == "GET /health/deep"
    # the busiest name kept its slot through all of it
    assert namer.name("GET", "/orders/9") == "GET /orders/**"
    assert len(namer.known) == 3
    namer.reset()
    assert namer.known == frozenset()


def test_plan_object_has_what_forward_needs() -> None:
    policy, _ = parse({"enabled": "true"})
    plan: GroupPolicy = policy.for_group("orders")
    assert isinstance(plan.max_body, int) and isinstance(plan.max_compare, int)

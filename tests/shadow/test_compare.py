"""The comparison is pure: table-driven, no server."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.shadow.compare import (
    Answer,
    Difference,
    classify,
    compare,
    differences,
    is_noisy,
    learn,
    normalise_path,
)
from proxy.shadow.policy import EndpointRules, RuleSet, make_rule

JSON = "application/json"


def answer(payload: object, status: int = 200, content_type: str = JSON) -> Answer:
    return Answer(status, content_type, orjson.dumps(payload))


def rules(*specs: tuple[str, str | None]) -> EndpointRules:
    return RuleSet(tuple(make_rule(kind, None, value) for kind, value in specs)).for_endpoint("GET /x")


def fields(a: Answer, b: Answer, r: EndpointRules | None = None) -> list[str]:
    return sorted({d.field for d in differences(a, b, r or EndpointRules())[0]})


def test_identical_json_matches_whatever_the_key_order_or_spacing() -> None:
    a = Answer(200, JSON, b'{"a": 1, "b": [1, 2]}')
    b = Answer(200, "application/json", b'{"b":[1,2],"a":1}')
    assert compare(a, b, EndpointRules(), set()).result == "match"


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        ({"a": 1}, {"a": 2}, ["root['a']"]),
        ({"a": 1}, {"a": 1, "b": 2}, ["root['b']"]),
        ({"a": 1, "b": 2}, {"a": 1}, ["root['b']"]),
        ({"a": 1}, {"a": "1"}, ["root['a']"]),
        ({"items": [{"id": 1}, {"id": 2}]}, {"items": [{"id": 1}, {"id": 3}]}, ["root['items'][*]['id']"]),
        ({"a": {"b": {"c": 1}}}, {"a": {"b": {"c": 2}}}, ["root['a']['b']['c']"]),
        # many keys differ: still reported field by field, not as one replaced object
        ({"a": 1, "b": 2, "c": 3}, {"a": 9, "b": 8, "c": 3}, ["root['a']", "root['b']"]),
        # keys deepdiff would take for private attributes are data in JSON (GraphQL, Mongoose)
        ({"__typename": "User", "id": 1}, {"__typename": "Admin", "id": 1}, ["root['__typename']"]),
        ({"__v": 0}, {}, ["root['__v']"]),
        ({"a": [{"__id": 1}]}, {"a": [{"__id": 2}]}, ["root['a'][*]['__id']"]),
    ],
)
def test_json_differences_are_reported_per_field(left: object, right: object, expected: list[str]) -> None:
    assert fields(answer(left), answer(right)) == expected


def test_numbers_in_sampled_values_are_shown_as_numbers() -> None:
    """The values a report shows for a changed object keep JSON's numbers (not "1999")."""
    left = {"price": {"amount": 1999, "rate": 0.25, "tags": [1, 2]}}
    right = {"price": "free"}
    (found,) = differences(answer(left), answer(right), EndpointRules())[0]
    assert orjson.loads(found.v1) == {"amount": 1999, "rate": 0.25, "tags": [1, 2]}
    huge = b'{"a": {"n": 18446744073709551621}}'
    (found,) = differences(Answer(200, JSON, huge), answer({"a": 1}), EndpointRules())[0]
    assert found.v1 == '{"n":"18446744073709551621"}'  # no JSON number type here holds it exactly


def test_status_and_content_type_are_compared() -> None:
    assert fields(answer({}, 200), answer({}, 201)) == ["status"]
    assert fields(answer({}, content_type="application/json; charset=utf-8"),
                  answer({}, content_type="application/json;charset=UTF-8")) == []  # fmt: skip
    assert fields(answer({}, content_type=JSON), answer({}, content_type="text/plain")) == ["content-type"]


def test_non_json_bodies_are_compared_by_their_bytes() -> None:
    assert fields(Answer(200, "text/html", b"<p>a</p>"), Answer(200, "text/html", b"<p>a</p>")) == []
    assert fields(Answer(200, "text/html", b"<p>a</p>"), Answer(200, "text/html", b"<p>b</p>")) == ["body"]
    # a body that claims JSON but is not: bytes
    assert fields(Answer(200, JSON, b"{nope"), Answer(200, JSON, b"{nope!")) == ["body"]


def test_exclude_paths_exact_and_wildcard_and_regex() -> None:
    a = answer({"id": 1, "data": [{"updated_at": 1, "x": 1}, {"updated_at": 2, "x": 2}], "meta": {"t": 1}})
    b = answer({"id": 2, "data": [{"updated_at": 5, "x": 1}, {"updated_at": 6, "x": 3}], "meta": {"t": 2}})
    assert fields(a, b) == [
        "root['data'][*]['updated_at']",
        "root['data'][*]['x']",
        "root['id']",
        "root['meta']['t']",
    ]
    r = rules(("exclude_path", "root['id']"), ("exclude_path", "root['data'][*]['updated_at']"),
              ("exclude_regex", r"\['meta'\]"))  # fmt: skip
    assert fields(a, b, r) == ["root['data'][*]['x']"]


def test_ignore_order_and_numeric_tolerance() -> None:
    a, b = answer({"tags": [1, 2, 3]}), answer({"tags": [3, 1, 2]})
    assert fields(a, b) == ["root['tags'][*]"]
    assert fields(a, b, rules(("ignore_order", None))) == []
    a, b = answer({"price": 10.001}), answer({"price": 10.002})
    assert fields(a, b) == ["root['price']"]
    assert fields(a, b, rules(("tolerance", "0.01"))) == []
    assert fields(a, answer({"price": 10.5}), rules(("tolerance", "0.01"))) == ["root['price']"]


def test_rules_apply_per_endpoint() -> None:
    rule_set = RuleSet(
        (make_rule("ignore_order", "GET /lists", None), make_rule("exclude_path", "*", "root['t']"))
    )
    assert rule_set.for_endpoint("GET /lists").ignore_order is True
    assert rule_set.for_endpoint("GET /other").ignore_order is False
    assert rule_set.for_endpoint("GET /other").exclude_paths == ("root['t']",)


def test_pathological_json_is_compared_as_bytes_quickly() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    other = b"[" * 100_000 + b"1" + b"]" * 100_000
    started = time.perf_counter()
    assert compare(Answer(200, JSON, deep), Answer(200, JSON, deep), EndpointRules(), set()).result == "match"
    outcome = compare(Answer(200, JSON, deep), Answer(200, JSON, other), EndpointRules(), set())
    assert outcome.result == "mismatch" and outcome.mismatched == ["body"]
    # nested within orjson's limit but past ours: still bytes, no RecursionError
    medium = b'{"a":' * 900 + b"1" + b"}" * 900
    assert compare(Answer(200, JSON, medium), Answer(200, JSON, medium.replace(b"1", b"2")), EndpointRules(),
                   set()).mismatched == ["body"]  # fmt: skip
    assert time.perf_counter() - started < 5


def test_noise_is_what_differs_between_two_v1_answers_and_is_not_a_mismatch() -> None:
    first = answer({"id": 1, "uuid": "a", "at": 1.5, "items": [{"t": 1}]})
    second = answer({"id": 1, "uuid": "b", "at": 1.6, "items": [{"t": 2}]})
    noisy = learn(first, second, EndpointRules())
    assert noisy == {"root['uuid']", "root['at']", "root['items'][*]['t']"}
    v2 = answer({"id": 1, "uuid": "c", "at": 1.7, "items": [{"t": 3}, {"t": 4}]})
    outcome = compare(first, v2, EndpointRules(), noisy)
    # the second item is new (the list's length did not vary in v1): a real difference, not noise
    assert outcome.result == "mismatch" and outcome.mismatched == ["root['items'][*]"]
    v2 = answer({"id": 1, "uuid": "c", "at": 1.7, "items": [{"t": 3}]})
    outcome = compare(first, v2, EndpointRules(), noisy)
    assert outcome.result == "noise" and outcome.mismatched == []
    assert sorted(outcome.suppressed) == ["root['at']", "root['items'][*]['t']", "root['uuid']"]
    assert compare(first, answer({"id": 2, "uuid": "c", "at": 1.5, "items": [{"t": 1}]}), EndpointRules(),
                   noisy).mismatched == ["root['id']"]  # fmt: skip


def test_noise_covers_children_of_a_noisy_field_only() -> None:
    def changed(path: str, kind: str = "changed") -> Difference:
        return Difference(path, kind, "1", "2")

    assert is_noisy(changed("root['meta']['x']"), {"root['meta']"})
    assert is_noisy(changed("root['meta'][*]"), {"root['meta']"})
    assert not is_noisy(changed("root['metadata']"), {"root['meta']"})
    # noise means "the value varies": never a change of type or presence
    assert not is_noisy(changed("root['meta']", "type"), {"root['meta']"})
    assert not is_noisy(changed("root['meta']", "removed"), {"root['meta']"})
    assert classify([], {"root['a']"}).result == "match"


def test_paths_fold_list_indexes() -> None:
    assert normalise_path("root['a'][12]['b'][0]") == "root['a'][*]['b'][*]"
    assert normalise_path("root['x[1]']") == "root['x[*]']"  # inside a key: harmless over-folding


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_any_json_matches_itself(value: object) -> None:
    assert compare(answer(value), answer(value), EndpointRules(), set()).result == "match"


@given(json_values, json_values)
def test_comparison_never_raises_and_matches_exactly_the_same_document(left: object, right: object) -> None:
    outcome = compare(answer(left), answer(right), EndpointRules(), set())
    same = orjson.dumps(left, option=orjson.OPT_SORT_KEYS) == orjson.dumps(right, option=orjson.OPT_SORT_KEYS)
    assert outcome.result == ("match" if same else "mismatch")  # True and 1 are not the same JSON


@pytest.mark.parametrize("order", [False, True])
@pytest.mark.parametrize(
    ("left", "right"),
    [([False, False], [False, 0]), ([True], [1]), ({"a": [0]}, {"a": [False]}), ([1, True], [1, 1])],
)
def test_a_boolean_is_never_the_same_as_a_number_in_a_list(order: bool, left: object, right: object) -> None:
    """Python says 0 == False and deepdiff compares lists with == first: found by the property
    test above (a v2 answering 0 where v1 said false was reported as a match)."""
    assert compare(answer(left), answer(right), EndpointRules(ignore_order=order), set()).result == "mismatch"


@pytest.mark.parametrize("order", [False, True])
def test_a_difference_deep_into_a_large_document_is_found(order: bool) -> None:
    """deepdiff's max_diffs counts visited nodes, not differences: with it, anything past the first
    thousand nodes was reported as a match. Work is bounded by compare_max_bytes instead."""
    doc = [{"id": i, "price": i} for i in range(5000)]
    changed = [dict(d) for d in doc]
    changed[4900]["price"] = -1
    outcome = compare(answer(doc), answer(changed), EndpointRules(ignore_order=order), set())
    assert outcome.result == "mismatch" and outcome.mismatched == ["root[*]['price']"]

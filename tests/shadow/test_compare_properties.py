"""Properties of the comparison over generated JSON documents (Hypothesis).

* a document always matches itself re-serialised (key order, whitespace, escapes, 1 vs 1.0);
* any single mutation is reported at the right path, with ignore_order on or off;
* learnt noise never turns a type change or a removed key into a match.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from proxy.shadow.compare import (
    QUICK_MAX_BYTES,
    Answer,
    EndpointRules,
    Outcome,
    _numbers,
    _shape,
    compare,
    deep_differences,
    length_name,
    quick_compare,
    quick_differences,
)

JSON = "application/json"
Path = tuple[str | int, ...]

keys = st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=4)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)  # past 2^64: the exact parser
    | st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=25,
)
documents = st.dictionaries(keys, values, min_size=1, max_size=5)


def dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def answer(body: bytes) -> Answer:
    return Answer(200, JSON, body)


def as_floats(value: Any) -> Any:
    """Integers written as 1.0 where a double holds them exactly (JSON has one number type)."""
    if isinstance(value, dict):
        return {k: as_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_floats(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**53:
        return float(value)
    return value


def shuffled(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    return value


@given(documents, st.randoms(use_true_random=False), st.booleans())
def test_a_document_matches_itself_reserialised(doc: dict[str, Any], rng: random.Random, order: bool) -> None:
    original = json.dumps(doc, ensure_ascii=False).encode()
    again = json.dumps(shuffled(as_floats(doc), rng), ensure_ascii=True, indent=2).encode()
    outcome = compare(answer(original), answer(again), EndpointRules(ignore_order=order), set())
    assert outcome.result == "match", outcome.differences


# --- mutations ------------------------------------------------------------------------------------


def nodes(value: Any, path: Path = ()) -> list[Path]:
    """Every location below the root."""
    found: list[Path] = []
    if isinstance(value, dict):
        for k, v in value.items():
            found.append((*path, k))
            found.extend(nodes(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.append((*path, i))
            found.extend(nodes(v, (*path, i)))
    return found


def at(doc: Any, path: Path) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def field(path: Path) -> str:
    """The report's field name for a location (list indexes folded)."""
    return "root" + "".join("[*]" if isinstance(s, int) else f"[{s!r}]" for s in path)


def other_type(value: Any) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return len(value)
    if value is None:
        return False
    if isinstance(value, list):
        return {"k": value}
    return [value]


def same_type_change(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return None


MUTATIONS = ("changed", "type", "removed", "added", "dropped", "duplicated")


def mutate(doc: dict[str, Any], kind: str, data: st.DataObject) -> tuple[dict[str, Any], Path] | None:
    """Apply one mutation to a copy; return it and the mutated location (None: not applicable)."""
    copy = json.loads(json.dumps(doc))
    places = nodes(copy)
    if kind == "changed":
        places = [p for p in places if same_type_change(at(copy, p)) is not None]
    elif kind in ("removed",):
        places = [p for p in places if isinstance(p[-1], str)]
    elif kind == "added":
        places = [()] + [p for p in places if isinstance(at(copy, p), dict)]
    elif kind in ("dropped", "duplicated"):
        places = [p for p in places if isinstance(p[-1], int)]
    if not places:
        return None
    path = data.draw(st.sampled_from(places))
    parent = at(copy, path[:-1]) if path else None
    if kind == "changed":
        parent[path[-1]] = same_type_change(at(copy, path))
    elif kind == "type":
        parent[path[-1]] = other_type(at(copy, path))
    elif kind == "removed":
        del parent[path[-1]]
    elif kind == "added":
        target = at(copy, path)
        new = data.draw(keys.filter(lambda k: k not in target))
        target[new] = data.draw(scalars)
        path = (*path, new)
    elif kind == "dropped":
        del parent[path[-1]]
    else:
        parent.insert(path[-1], parent[path[-1]])
    return copy, path


def related(a: str, b: str) -> bool:
    return a == b or a.startswith(b) or b.startswith(a)


@pytest.mark.parametrize("kind", MUTATIONS)
@given(doc=documents, order=st.booleans(), data=st.data())
def test_one_mutation_is_reported_at_its_path(
    kind: str, doc: dict[str, Any], order: bool, data: st.DataObject
) -> None:
    mutated = mutate(doc, kind, data)
    if mutated is None:
        return
    new, path = mutated
    expected = field(path)
    outcome = compare(answer(dump(doc)), answer(dump(new)), EndpointRules(ignore_order=order), set())
    assert outcome.result == "mismatch", (kind, path)
    if kind in ("dropped", "duplicated"):
        # the list itself changed: reported on its items
        expected = field(path[:-1]) + "[*]"
        assert all(f.startswith(expected) or expected.startswith(f) for f in outcome.mismatched), outcome
        if not order:
            assert expected in outcome.mismatched or any(f.startswith(expected) for f in outcome.mismatched)
    elif order and any(isinstance(s, int) for s in path):
        # ignore_order may pair list items differently: reported at the item or inside it
        assert all(related(f, expected) for f in outcome.mismatched), (expected, outcome)
    else:
        assert outcome.mismatched == [expected], (kind, outcome.differences)


def all_noise(doc: Any) -> set[str]:
    """The widest noise a calibration could teach about a document: every value and list varies."""
    names = {field(p) for p in nodes(doc)}
    names |= {length_name(field(p) + "[*]") for p in [(), *nodes(doc)] if isinstance(at(doc, p), list)}
    return names


@pytest.mark.parametrize("kind", ["type", "removed"])
@given(doc=documents, order=st.booleans(), data=st.data())
def test_noise_never_turns_a_type_change_or_removal_into_a_match(
    kind: str, doc: dict[str, Any], order: bool, data: st.DataObject
) -> None:
    mutated = mutate(doc, kind, data)
    if mutated is None:
        return
    new, path = mutated
    indexes = [i for i, step in enumerate(path) if isinstance(step, int)]
    if order and indexes:
        # in an unordered list whose length varies, an item is known only by its shape: a change
        # that leaves both sides with the same set of item shapes cannot be told from variation
        cut = indexes[-1]
        before, after = at(doc, path[:cut]), at(new, path[:cut])
        assume({_shape(_numbers(v, 1)) for v in before} != {_shape(_numbers(v, 1)) for v in after})
    noisy = all_noise(doc) | all_noise(new)
    outcome = compare(answer(dump(doc)), answer(dump(new)), EndpointRules(ignore_order=order), noisy)
    assert outcome.result == "mismatch", (kind, path, outcome)
    assert any(related(f, field(path)) for f in outcome.mismatched), (path, outcome)


# --- the quick walk agrees with deepdiff ----------------------------------------------------------

any_keys = keys | st.text(max_size=5)  # quotes, backslashes, the empty key: deepdiff spells the path
quick_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_keys, children, max_size=4),
    max_leaves=20,
)


@given(doc=st.dictionaries(any_keys, quick_values, max_size=5), data=st.data())
def test_the_quick_walk_reports_exactly_what_deepdiff_reports(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    """Same differences, same order, same paths and values, whenever the walk answers at all;
    and the walk answers for every change that touches no list (the cost saved per comparison)."""
    new = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(0, 4))):
        mutated = mutate(new, data.draw(st.sampled_from(MUTATIONS)), data)
        if mutated is not None:
            new = mutated[0]
    if data.draw(st.booleans()):  # and unrelated documents, roots of other types included
        new = data.draw(quick_values)
    left, right = _numbers(doc, 1), _numbers(new, 1)
    quick = quick_differences(left, right, EndpointRules())
    deep = deep_differences(left, right, EndpointRules())
    if quick is not None:
        assert quick == deep
    if not any(isinstance(v, list) for v in walk_values(doc)) and not isinstance(new, list):
        if not any(isinstance(v, list) for v in walk_values(new)):
            assert quick is not None


def walk_values(value: Any) -> list[Any]:
    found = [value]
    if isinstance(value, dict):
        for v in value.values():
            found.extend(walk_values(v))
    elif isinstance(value, list):
        for v in value:
            found.extend(walk_values(v))
    return found


@pytest.mark.parametrize(
    ("left", "right"),
    [([False], [0]), ({"a": [0]}, {"a": [False]}), ({"a": 0}, {"a": False}), ({"a": None}, {"a": 0})],
)
def test_the_quick_walk_never_equates_a_boolean_with_a_number(left: Any, right: Any) -> None:
    quick = quick_differences(_numbers(left, 1), _numbers(right, 1), EndpointRules())
    assert quick != []
    outcome = compare(answer(dump(left)), answer(dump(right)), EndpointRules(), set())
    assert outcome.result == "mismatch"


def test_rules_leave_the_diff_to_deepdiff() -> None:
    left, right = _numbers({"a": 1, "b": 2}, 1), _numbers({"a": 1, "b": 3}, 1)
    assert quick_differences(left, right, EndpointRules()) == deep_differences(left, right, EndpointRules())
    assert quick_differences(left, left, EndpointRules(exclude_paths=("root['b']",))) == []
    for rules in (
        EndpointRules(ignore_order=True),
        EndpointRules(exclude_paths=("root['b']",)),
        EndpointRules(exclude_regexes=(re.compile("b"),)),
        EndpointRules(tolerance=2.0),
    ):
        assert quick_differences(left, right, rules) is None


@given(doc=st.dictionaries(any_keys, quick_values, max_size=5), data=st.data())
def test_a_quick_comparison_on_the_loop_has_the_outcome_of_the_full_one(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    """What the event loop decides is what the compare thread would have decided; it declines
    (None) rather than decode, parse a large body or run deepdiff."""
    new = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(0, 3))):
        mutated = mutate(new, data.draw(st.sampled_from(MUTATIONS)), data)
        if mutated is not None:
            new = mutated[0]
    left = Answer(200, JSON, dump(doc))
    right = Answer(
        data.draw(st.sampled_from([200, 200, 404])), data.draw(st.sampled_from([JSON, JSON, "text/plain"])),
        dump(new), encoding=data.draw(st.sampled_from(["", "", "identity", "gzip"])),
    )  # fmt: skip
    noisy = set(data.draw(st.lists(st.sampled_from(sorted(all_noise(doc) | {"root"})), max_size=3)))
    quick = quick_compare(left, right, EndpointRules(), noisy)
    if quick is not None:
        assert quick == compare(left, right, EndpointRules(), noisy)
    if right.encoding == "gzip" and left.body != right.body:
        assert quick is None


def test_a_quick_comparison_declines_large_bodies_and_lists_deepdiff_must_align() -> None:
    big = dump({"pad": "x" * QUICK_MAX_BYTES})
    assert quick_compare(answer(big), answer(big), EndpointRules(), set()) == Outcome("match")
    assert quick_compare(answer(big), answer(big[:-3] + b'y"}'), EndpointRules(), set()) is None
    assert quick_compare(answer(b"[1, 2]"), answer(b"[1, 3]"), EndpointRules(), set()) is None
    outcome = quick_compare(
        answer(b'{"a": [1], "b": 1}'), answer(b'{"b": 2, "a": [1.0]}'), EndpointRules(), set()
    )
    assert outcome == compare(
        answer(b'{"a": [1], "b": 1}'), answer(b'{"b": 2, "a": [1.0]}'), EndpointRules(), set()
    )
    assert outcome is not None and outcome.mismatched == ["root['b']"]

"""Comparing two answers: pure functions. ``quick_compare`` is cheap and bounded (small bodies,
no deepdiff) and runs on the event loop; anything else goes through ``compare`` in a thread.

Status, Content-Type, a few semantic headers and the body are compared. Bodies are decoded first
(gzip, deflate, br; never past ``compare_max_bytes`` of decoded size) and a UTF-8 BOM is dropped.
JSON bodies go through deepdiff (a structural diff reported per field), with every number turned
into one exact type (``Decimal``) so ``1`` equals ``1.0`` and ``18446744073709551621`` differs from
``...622``. Anything else, or JSON we refuse to walk (unparseable, or nested deeper than
``MAX_DEPTH``), is compared by its bytes. Field names are deepdiff paths with list indexes folded
to ``[*]``, so ``root['items'][0]['id']`` and ``[1]`` are one field (bounded report, and noise
learnt on one item applies to all).

Noise (see ``learn`` and ``is_noisy``) only ever means "this JSON value varies": a v2 difference in
status, content type, a header, presence, type or structure is a mismatch whatever was learnt.
"""

from __future__ import annotations

import inspect
import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

import orjson
from deepdiff import DeepDiff
from deepdiff.helper import notpresent
from deepdiff.model import DictRelationship

from proxy.shadow.policy import EndpointRules

try:  # optional at import so a missing wheel degrades to "br compared as bytes", never a crash
    import brotli as _brotli
except ImportError:  # pragma: no cover - brotli is a declared dependency
    _brotli = None

MAX_DEPTH = 100  # deepdiff recurses per level; far below Python's recursion limit
MAX_REPORTED = 50  # differences kept per comparison for samples
# JSON bodies up to this size (both together) may be compared on the event loop: parsing them and
# the quick walk take tens of microseconds; anything larger, or needing deepdiff, goes to a thread
QUICK_MAX_BYTES = 8 * 1024
VALUE_CHARS = 200
DEFAULT_HEADERS = ("location", "content-encoding", "cache-control")
BOM = b"\xef\xbb\xbf"
# fields that describe the answer as a whole: never learnt as noise, never suppressed
WHOLE = frozenset({"status", "content-type", "body", "body-size"})

_INDEX = re.compile(r"\[\d+\]")
_EXACT = Context(prec=1_000_000)  # normalize() rounds to the context's precision: never let it


class JsonNumber(Decimal):
    """A JSON number: equal to the same number, never to ``true`` or ``false``.

    Python says ``0 == False``, and deepdiff compares lists with ``==`` before walking them, so
    ``[false]`` against ``[0]`` was a match."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, bool):
            return False
        return Decimal.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = Decimal.__hash__


_ZERO = JsonNumber(0)
# a number orjson may not keep exactly: 16+ significant digits, or a 3-digit exponent
_LOSSY = re.compile(rb"\d(?:\.?\d){15}|[eE][+-]?\d{3}")
_KINDS = {
    "values_changed": "changed",
    "type_changes": "type",
    "dictionary_item_added": "added",
    "dictionary_item_removed": "removed",
    "iterable_item_added": "item-added",
    "iterable_item_removed": "item-removed",
    "repetition_change": "repeated",
    "attribute_added": "added",
    "attribute_removed": "removed",
}
ITEM_KINDS = frozenset({"item-added", "item-removed", "repeated"})
_DEEPDIFF_ARGS = inspect.signature(DeepDiff.__init__).parameters
# newer deepdiff reports a whole dict as changed when most keys differ; we always want fields
_EXTRA: dict[str, Any] = {}
if "threshold_to_diff_deeper" in _DEEPDIFF_ARGS:
    _EXTRA["threshold_to_diff_deeper"] = 0
# on by default, deepdiff skips dict keys starting with "__" (meant for Python objects' private
# attributes); in a JSON answer "__typename" (GraphQL) or "__v" (Mongoose) is data like any other
_EXTRA["ignore_private_variables"] = False
if "multiprocessing_workers" in _DEEPDIFF_ARGS:
    # left unset, deepdiff asks os.cpu_count() per diff: glibc reads /sys/devices/system/cpu/online
    # (three syscalls per comparison); it never forks for us anyway (multiprocessing is off)
    _EXTRA["multiprocessing_workers"] = 1


@dataclass(frozen=True, slots=True)
class Answer:
    """One side of a comparison. ``body`` is None when it was over the compare limit."""

    status: int
    content_type: str
    body: bytes | None
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value) for the compared set
    encoding: str = ""  # Content-Encoding, to decode the body before comparing


@dataclass(frozen=True, slots=True)
class Options:
    """Per-process comparison settings (the per-endpoint ones are ``EndpointRules``)."""

    max_bytes: int = 1024 * 1024  # decoded body limit; beyond it the body is not compared
    headers: tuple[str, ...] = DEFAULT_HEADERS


@dataclass(frozen=True, slots=True)
class Difference:
    field: str  # normalised deepdiff path, or status, content-type, body, body-size, header:<name>
    kind: str  # changed, type, added, removed, item-added, item-removed, repeated
    v1: str
    v2: str
    # for list items: the item's shape (keys and value types) is one the other side's list has
    same_shape: bool = True

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "kind": self.kind, "v1": self.v1, "v2": self.v2}


@dataclass(slots=True)
class Outcome:
    """``result`` is match, mismatch, noise (every difference is noise) or skipped (body too large)."""

    result: str
    differences: list[Difference] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # distinct fields
    suppressed: list[str] = field(default_factory=list)  # distinct noisy fields that differed


def normalise_path(path: str) -> str:
    return _INDEX.sub("[*]", path)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media.endswith("/json")


def media_type(content_type: str) -> str:
    """``Application/JSON; charset=UTF-8`` -> ``application/json`` (JSON is UTF-8: charset means
    nothing there); other types keep their parameters, lower-cased, spaces dropped."""
    parts = [part.strip() for part in content_type.lower().split(";") if part.strip()]
    if parts and _is_json(parts[0]):
        parts = [parts[0], *(p for p in parts[1:] if not p.startswith("charset="))]
    return ";".join(parts)


def _json_default(value: Any) -> Any:
    """A number inside a sampled object or list is shown as a JSON number, not a string: an int
    when it is whole and fits, a float when that float is exactly it; only a number neither can
    hold (a huge or very precise one) is shown as its exact text, quoted."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value() and -(2**63) <= value < 2**64:
            return int(value)
        as_float = float(value)
        if Decimal(repr(as_float)) == value:
            return as_float
        return _number_text(value)
    raise TypeError


def _number_text(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else str(value)


def _short(value: Any) -> str:
    if type(value).__name__ == "NotPresent":
        return "<absent>"
    if isinstance(value, Decimal):
        text = _number_text(value)
    else:
        try:
            text = orjson.dumps(value, default=_json_default).decode()
        except TypeError:
            text = repr(value)
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS] + "..."


# --- bodies ---------------------------------------------------------------------------------------


class TooLarge(Exception):
    """The decoded body would pass the compare limit (a decompression bomb stops here)."""


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding (gzip, x-gzip, deflate, br; comma-separated list applied in reverse).

    Raises TooLarge past ``limit`` decoded bytes (decoding stops there: a 1 KB bomb never becomes
    a 1 GB buffer) and ValueError for an unknown or corrupt encoding."""
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip", "deflate"):
            body = _inflate(body, coding, limit)
        elif coding == "br" and _brotli is not None:
            body = _unbrotli(body, limit)
        else:
            raise ValueError(f"unsupported content-encoding {coding!r}")
    return body


def _inflate(body: bytes, coding: str, limit: int) -> bytes:
    # 16+MAX_WBITS: gzip; 32+: zlib or gzip header; deflate is often sent raw (-MAX_WBITS)
    attempts = [16 + zlib.MAX_WBITS] if coding != "deflate" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    last: Exception | None = None
    for wbits in attempts:
        try:
            inflater = zlib.decompressobj(wbits)
            out = inflater.decompress(body, limit + 1)
            if len(out) > limit or inflater.unconsumed_tail:
                raise TooLarge()
            out += inflater.flush()
            if len(out) > limit:
                raise TooLarge()
            return out
        except zlib.error as exc:
            last = exc
    raise ValueError(f"corrupt {coding} body: {last}")


def _unbrotli(body: bytes, limit: int) -> bytes:
    assert _brotli is not None
    decoder = _brotli.Decompressor()
    out = bytearray()
    try:
        step = 64 * 1024  # feed in slices so the output is checked before it can grow far
        for start in range(0, len(body), step):
            out += decoder.process(body[start : start + step])
            if len(out) > limit:
                raise TooLarge()
    except _brotli.error as exc:
        raise ValueError(f"corrupt br body: {exc}") from exc
    return bytes(out)


# --- JSON -----------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _exact(body: bytes) -> Any:
    """The slow exact parser: ints stay ints, decimals become Decimal (no binary rounding)."""
    return json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)


def _numbers(value: Any, depth: int) -> Any:
    """Every number as a normalised JsonNumber (JSON has one number type; bool stays bool and is
    never equal to a number).

    Returns the converted value, or raises RecursionError when nested deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise RecursionError
    if isinstance(value, dict):
        return {k: _numbers(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v, depth + 1) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, Decimal):
        number = value
    else:
        return value
    # one spelling per number (1, 1.0 and 1E0 hash alike in ignore_order), -0 is 0, no rounding
    return JsonNumber(number.normalize(_EXACT)) if number else _ZERO


def load_json(body: bytes, exact: bool = False) -> tuple[bool, Any]:
    """(True, value) for JSON we are willing to walk; (False, None) to fall back to bytes."""
    try:
        value = _exact(body) if exact else orjson.loads(body)
        return True, _numbers(value, 1)
    except (orjson.JSONDecodeError, ValueError, RecursionError):  # invalid, too deep, too many digits
        return False, None


def needs_exact(body: bytes) -> bool:
    """True when orjson might round a number of this body (checked on the bytes, cheaply)."""
    return _LOSSY.search(body) is not None


def _shape(value: Any) -> Any:
    """Keys and value types, recursively (list items as a set of shapes): what "structure" means."""
    if isinstance(value, dict):
        return ("d", tuple(sorted((k, _shape(v)) for k, v in value.items())))
    if isinstance(value, list):
        return ("l", frozenset(_shape(v) for v in value))
    if isinstance(value, bool):
        return "b"
    if isinstance(value, Decimal):
        return "n"
    if isinstance(value, str):
        return "s"
    return "z" if value is None else type(value).__name__


def _report_order() -> tuple[str, ...]:
    """The order in which this process's deepdiff lists report types (a set in deepdiff, so it
    follows string hashing): the quick walk lists its findings in the same order."""
    tree = DeepDiff(
        {"a": 1, "b": 1, "c": 1}, {"a": 2, "b": "1", "d": 1}, view="tree", log_frequency_in_sec=0, **_EXTRA
    ).tree
    return tuple(name for name, levels in tree.items() if levels)


_QUICK_KINDS = ("values_changed", "type_changes", "dictionary_item_added", "dictionary_item_removed")
# the quick walk needs deepdiff to diff every dict field by field (threshold_to_diff_deeper)
_ORDER = _report_order() if "threshold_to_diff_deeper" in _EXTRA else ()
if not set(_QUICK_KINDS) <= set(_ORDER):  # a deepdiff we do not know: always ask it
    _ORDER = ()
_KEY_PATHS: dict[str, str | None] = {}
_KEY_PATHS_MAX = 10_000  # keys come from traffic: the cache stays bounded


def _key_path(key: str) -> str | None:
    """``['key']`` as deepdiff spells a dict key in a path (its own code, cached)."""
    if key in _KEY_PATHS:
        return _KEY_PATHS[key]
    spelt = DictRelationship(None, None, key).get_param_repr()
    if len(_KEY_PATHS) < _KEY_PATHS_MAX:
        _KEY_PATHS[key] = spelt
    return spelt


def _walk(t1: Any, t2: Any, path: str, found: dict[str, list[tuple[str, Any, Any]]]) -> bool:
    """deepdiff's dict and scalar rules (see ``quick_differences``); False when a list differs."""
    if t1 is t2:
        return True
    if type(t1) is not type(t2):
        found["type_changes"].append((path, t1, t2))
        return True
    if type(t1) is dict:
        # added keys in v2's order, removed in v1's, then the common ones in v2's (as deepdiff)
        for key in t2:
            if key not in t1:
                step = _key_path(key)
                if step is None:
                    return False
                found["dictionary_item_added"].append((path + step, notpresent, t2[key]))
        for key in t1:
            if key not in t2:
                step = _key_path(key)
                if step is None:
                    return False
                found["dictionary_item_removed"].append((path + step, t1[key], notpresent))
        for key in t2:
            if key in t1:
                step = _key_path(key)
                if step is None or not _walk(t1[key], t2[key], path + step, found):
                    return False
        return True
    if type(t1) is list:
        return bool(t1 == t2)  # an equal list reports nothing; how deepdiff aligns others is its own
    if t1 != t2:
        found["values_changed"].append((path, t1, t2))
    return True


def quick_differences(left: Any, right: Any, rules: EndpointRules) -> list[Difference] | None:
    """What ``_json_differences`` would report, without deepdiff, or None when only deepdiff can
    tell (a list differs, or a rule applies).

    deepdiff costs tens of microseconds even for two tiny documents; equal documents and documents
    whose differences are in objects and scalars (the common migration diff: a field renamed,
    added or changed) are walked here with deepdiff's own rules: a type change is reported as
    such (``true`` is not ``1``), keys added then removed then common ones walked, report types in
    deepdiff's order, paths spelt by deepdiff. A property test holds the two to the same output."""
    if left == right:  # JsonNumber keeps 0 != false, so equal values report nothing in deepdiff too
        return []
    if not _ORDER or rules.ignore_order or rules.exclude_paths or rules.exclude_regexes or rules.tolerance:
        return None
    found: dict[str, list[tuple[str, Any, Any]]] = {kind: [] for kind in _QUICK_KINDS}
    if not _walk(left, right, "root", found):
        return None
    out: list[Difference] = []
    for report_type in _ORDER:
        kind = _KINDS.get(report_type, report_type)
        for path, t1, t2 in found.get(report_type, ()):
            out.append(Difference(normalise_path(path), kind, _short(t1), _short(t2)))
    return out


class _NeedsThread(Exception):
    """Raised by a quick comparison that only deepdiff, a decoder or a large parse can finish."""


def _json_differences(left: Any, right: Any, rules: EndpointRules, deep: bool = True) -> list[Difference]:
    quick = quick_differences(left, right, rules)
    if quick is not None:
        return quick
    if not deep:
        raise _NeedsThread
    return deep_differences(left, right, rules)


def deep_differences(left: Any, right: Any, rules: EndpointRules) -> list[Difference]:
    """The differences deepdiff finds (what the product reports; ``quick_differences`` agrees)."""
    diff = DeepDiff(
        left,
        right,
        ignore_order=rules.ignore_order,
        report_repetition=rules.ignore_order,  # multisets: [1,1,2] vs [1,2] is a difference
        exclude_paths=list(rules.exclude_paths) or None,
        exclude_regex_paths=list(rules.exclude_regexes) or None,
        math_epsilon=rules.tolerance or None,
        view="tree",
        log_frequency_in_sec=0,
        **_EXTRA,
    )
    found: list[Difference] = []
    shapes: dict[int, frozenset[Any]] = {}
    for report_type, levels in diff.tree.items():
        kind = _KINDS.get(report_type, report_type)
        for level in levels:
            path = level.path() or "root"
            same = True
            if kind in ("item-added", "item-removed") and level.up is not None:
                # an added item must look like one v1 has, a removed one like one v2 still has
                item, other = (level.t2, level.up.t1) if kind == "item-added" else (level.t1, level.up.t2)
                if isinstance(other, list):
                    known = shapes.get(id(other))
                    if known is None:
                        known = shapes[id(other)] = frozenset(_shape(v) for v in other)
                    same = not known or _shape(item) in known
            found.append(Difference(normalise_path(path), kind, _short(level.t1), _short(level.t2), same))
    return found


# --- answers --------------------------------------------------------------------------------------


def _prepare(answer: Answer, limit: int, deep: bool = True) -> bytes | None:
    """The body to compare: decoded, BOM dropped; None when over the limit (or not captured)."""
    if answer.body is None:
        return None
    body = answer.body
    if answer.encoding:
        if not deep and answer.encoding.strip().lower() != "identity":
            raise _NeedsThread
        try:
            body = decode_body(body, answer.encoding, limit)
        except TooLarge:
            return None
        except ValueError:
            body = answer.body  # unknown or corrupt encoding: compare what was sent
    return body[3:] if body.startswith(BOM) else body


def _body_differences(
    a: Answer, b: Answer, rules: EndpointRules, options: Options, deep: bool = True
) -> list[Difference] | None:
    """Body differences, or None when the body could not be compared (over the limit)."""
    left = _prepare(a, options.max_bytes, deep)
    right = _prepare(b, options.max_bytes, deep)
    if left is None or right is None:
        # one side over the limit, the other far under it: that is a difference, not a skip
        small = left if left is not None else right
        if small is not None and len(small) < options.max_bytes // 2:
            over = f"over {options.max_bytes} bytes"
            size = f"{len(small)} bytes"
            v1, v2 = (size, over) if left is not None else (over, size)
            return [Difference("body-size", "changed", v1, v2)]
        return None
    if left == right:
        return []  # the same bytes (the usual case in a migration): nothing to parse or diff
    if _is_json(a.content_type) and _is_json(b.content_type):
        if not deep and len(left) + len(right) > QUICK_MAX_BYTES:
            raise _NeedsThread
        exact = needs_exact(left) or needs_exact(right)
        ok_a, parsed_a = load_json(left, exact)
        ok_b, parsed_b = load_json(right, exact)
        if ok_a and ok_b:
            try:
                return _json_differences(parsed_a, parsed_b, rules, deep)
            except RecursionError:
                pass
    return [Difference("body", "changed", f"{len(left)} bytes", f"{len(right)} bytes")]


def _location(value: str) -> str:
    return value.strip()


def _header_value(name: str, value: str) -> str:
    """Normalise what is only spelling: case of tokens and spaces in lists (values stay exact)."""
    if name in ("cache-control", "content-encoding", "vary"):
        return ",".join(sorted(part.strip().lower() for part in value.split(",") if part.strip()))
    if name == "location":
        return _location(value)
    return value.strip()


def header_map(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _header_differences(a: Answer, b: Answer, options: Options) -> list[Difference]:
    found: list[Difference] = []
    left, right = header_map(a.headers), header_map(b.headers)
    redirect = 300 <= a.status < 400 or 300 <= b.status < 400 or 201 in (a.status, b.status)
    for name in options.headers:
        if name == "location" and not redirect:
            continue
        one, two = left.get(name), right.get(name)
        if one is None and two is None:
            continue
        if one is not None and two is not None and _header_value(name, one) == _header_value(name, two):
            continue
        kind = "changed" if one is not None and two is not None else ("added" if one is None else "removed")
        found.append(Difference(f"header:{name}", kind, one or "<absent>", two or "<absent>"))
    return found


def differences(
    a: Answer, b: Answer, rules: EndpointRules, options: Options | None = None, deep: bool = True
) -> tuple[list[Difference], bool]:
    """Every difference between two answers (v1 first), rules applied; and whether bodies were
    compared (False: one was over the limit). ``deep=False`` raises ``_NeedsThread`` instead of
    decoding, parsing a large body or running deepdiff."""
    options = options or Options()
    found: list[Difference] = []
    if a.status != b.status:
        found.append(Difference("status", "changed", str(a.status), str(b.status)))
    if media_type(a.content_type) != media_type(b.content_type):
        found.append(Difference("content-type", "changed", a.content_type, b.content_type))
    found.extend(_header_differences(a, b, options))
    body = _body_differences(a, b, rules, options, deep)
    if body is not None:
        found.extend(body)
    return found, body is not None


# --- noise ----------------------------------------------------------------------------------------


def length_name(path: str) -> str:
    """``root['items'][*]`` -> ``len(root['items'])``: "this list's length varies"."""
    return f"len({path[:-3]})" if path.endswith("[*]") else f"len({path})"


def is_noisy(diff: Difference, noisy: frozenset[str] | set[str]) -> bool:
    """Whether a v2 difference is explained by learnt noise (the noise rule, docs/shadow.md).

    * a changed value (same JSON type) is noise when that field, or a parent of it, was seen to
      vary between two v1 answers, or it lies inside a list whose length varies;
    * an item added to, removed from or repeated in a list is noise when that list's length was
      seen to vary, and (for an added item) the item has a shape v1's list already has;
    * a type change, an added or removed key, status, content type, headers and body-size never are.
    """
    if not noisy or diff.field in WHOLE or diff.field.startswith("header:"):
        return False
    path = diff.field
    if diff.kind == "changed":
        for known in noisy:
            if known.startswith("len("):
                inner = known[4:-1] + "[*]"
                if path.startswith(inner) and (len(path) == len(inner) or path[len(inner)] in "[."):
                    return True
            elif path == known or (path.startswith(known) and path[len(known)] in "[."):
                return True
        return False
    if diff.kind in ITEM_KINDS:
        return diff.same_shape and length_name(path) in noisy
    return False


def classify(found: list[Difference], noisy: frozenset[str] | set[str], compared: bool = True) -> Outcome:
    if not found:
        return Outcome("match" if compared else "skipped")
    mismatched: dict[str, None] = {}
    suppressed: dict[str, None] = {}
    for diff in found:
        if noisy and is_noisy(diff, noisy):
            suppressed[diff.field] = None
        else:
            mismatched[diff.field] = None
    result = "mismatch" if mismatched else ("noise" if compared else "skipped")
    return Outcome(result, found[:MAX_REPORTED], list(mismatched), list(suppressed))


def compare(
    a: Answer,
    b: Answer,
    rules: EndpointRules,
    noisy: frozenset[str] | set[str],
    options: Options | None = None,
) -> Outcome:
    """v1 answer ``a`` against v2 answer ``b``."""
    found, compared = differences(a, b, rules, options)
    return classify(found, noisy, compared)


def quick_compare(
    a: Answer,
    b: Answer,
    rules: EndpointRules,
    noisy: frozenset[str] | set[str],
    options: Options | None = None,
) -> Outcome | None:
    """``compare`` when it is cheap enough for the event loop, else None (then ``compare`` runs in
    the compare thread): the same bytes, or JSON bodies of at most ``QUICK_MAX_BYTES`` together
    whose differences ``quick_differences`` can tell. No decoding, no deepdiff. Same outcome."""
    try:
        found, compared = differences(a, b, rules, options, deep=False)
    except _NeedsThread:
        return None
    return classify(found, noisy, compared)


def learn(first: Answer, second: Answer, rules: EndpointRules, options: Options | None = None) -> set[str]:
    """Noise candidates from two v1 answers to the same request (the caller counts them).

    Nothing is learnt unless both are the same successful JSON answer: a 503 on one side teaches
    nothing. Only a value that changed with its type kept (``root['id']``) or a list whose length
    changed (``len(root['items'])``) is learnt; status, content type, headers, body, presence and
    type changes never are."""
    if first.status != second.status or first.status >= 400:
        return set()
    if media_type(first.content_type) != media_type(second.content_type) or not _is_json(first.content_type):
        return set()
    found, compared = differences(first, second, rules, options)
    if not compared:
        return set()
    names: set[str] = set()
    for diff in found:
        if diff.field in WHOLE or diff.field.startswith("header:"):
            continue
        if diff.kind == "changed":
            names.add(diff.field)
        elif diff.kind in ITEM_KINDS:
            names.add(length_name(diff.field))
    return names

"""The small languages of metric gates, parsed once when the settings load: conditions, a strict
JSONPath subset and the ``{{group}}``/``{{version}}``/``{{window}}`` templates.

A leaf module (imports nothing of ours) because ``proxy.settings`` parses gates at load time (a bad
condition is one ``ConfigError`` at start-up, not a surprise at the first check) and settings may
not import the canary capability. Nothing here is ``eval``: conditions are a hand-written grammar::

    expr    := and ('||' and)*
    and     := atom ('&&' atom)*
    atom    := '(' expr ')' | chain
    chain   := operand op operand (op operand)*      # 0.9 <= result <= 1
    operand := 'result' | number                     # finite, e.g. 0.05, -1, 2e-3
    op      := '<' | '<=' | '>' | '>=' | '==' | '!='

Every chain must mention ``result``. The value judged is always finite: a NaN or infinite metric
is inconclusive before any condition sees it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_CONDITION_CHARS = 200
MAX_DEPTH = 8
MAX_JSON_PATH_CHARS = 200
PLACEHOLDERS = ("group", "version", "window")

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, ">": operator.gt,
}  # fmt: skip
_TOKEN = re.compile(
    r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<word>[A-Za-z_]+)"
    r"|(?P<op><=|>=|==|!=|<|>|&&|\|\||\(|\)))"
)

Predicate = Callable[[float], bool]


@dataclass(frozen=True)
class Condition:
    """A parsed condition: ``holds(value)`` for a finite value; ``text`` as written."""

    text: str
    predicate: Predicate

    def holds(self, value: float) -> bool:
        return self.predicate(value)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _TOKEN.match(stripped, position)
        if match is None or match.end() == position:
            raise ValueError(f"condition {text!r}: unexpected {stripped[position : position + 10].strip()!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ValueError(f"condition {self.text!r}: ends too early")
        self.at += 1
        return token

    def fail(self, what: str) -> ValueError:
        return ValueError(f"condition {self.text!r}: {what}")

    def expr(self, depth: int) -> Predicate:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        parts = [self.conj(depth)]
        while self.peek() == ("op", "||"):
            self.take()
            parts.append(self.conj(depth))
        if len(parts) == 1:
            return parts[0]
        alternatives = tuple(parts)
        return lambda value: any(part(value) for part in alternatives)

    def conj(self, depth: int) -> Predicate:
        parts = [self.atom(depth)]
        while self.peek() == ("op", "&&"):
            self.take()
            parts.append(self.atom(depth))
        if len(parts) == 1:
            return parts[0]
        conjuncts = tuple(parts)
        return lambda value: all(part(value) for part in conjuncts)

    def atom(self, depth: int) -> Predicate:
        if self.peek() == ("op", "("):
            self.take()
            inner = self.expr(depth + 1)
            if self.take() != ("op", ")"):
                raise self.fail("a '(' is not closed")
            return inner
        return self.chain()

    def operand(self) -> float | None:
        kind, value = self.take()
        if kind == "word":
            if value != "result":
                raise self.fail(f"unknown name {value!r} (only 'result' and numbers)")
            return None
        if kind == "num":
            number = float(value)
            if not math.isfinite(number):
                raise self.fail(f"{value} is not a finite number")
            return number
        raise self.fail(f"expected 'result' or a number, found {value!r}")

    def chain(self) -> Predicate:
        operands = [self.operand()]
        ops: list[Callable[[float, float], bool]] = []
        while (token := self.peek()) is not None and token[0] == "op" and token[1] in _OPS:
            ops.append(_OPS[self.take()[1]])
            operands.append(self.operand())
        if not ops:
            raise self.fail("expected a comparison such as 'result < 0.05'")
        if None not in operands:
            raise self.fail("each comparison must use 'result'")
        pairs = tuple(zip(ops, operands, operands[1:], strict=False))

        def compare(value: float) -> bool:
            return all(op(value if a is None else a, value if b is None else b) for op, a, b in pairs)

        return compare


def parse_condition(text: str) -> Condition:
    """The condition as a predicate, or ValueError naming what is wrong (one line)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("condition must be a non-empty string such as 'result < 0.05'")
    if len(text) > MAX_CONDITION_CHARS or "\n" in text:
        raise ValueError(f"condition must be one line of at most {MAX_CONDITION_CHARS} characters")
    parser = _Parser(text)
    predicate = parser.expr(0)
    if parser.peek() is not None:
        raise parser.fail(f"unexpected {parser.peek()[1]!r}")  # type: ignore[index]
    return Condition(text, predicate)


# --- JSONPath: the strict subset $.a.b[0]['c-d'] ---------------------------------------------------

_SEGMENT = re.compile(
    r"\.(?P<name>[A-Za-z_][A-Za-z0-9_-]*)|\[(?P<index>-?\d{1,6})\]|\['(?P<quoted>[^'\\]{1,100})'\]"
)


def parse_json_path(text: str) -> tuple[str | int, ...]:
    """``$`` then ``.name``, ``[index]`` or ``['any name']`` segments: the keys to follow. No
    wildcards, filters or recursion: a gate reads one number (or one flat list of numbers)."""
    if not isinstance(text, str) or not text.startswith("$") or len(text) > MAX_JSON_PATH_CHARS:
        raise ValueError(
            f"json_path {text!r} must start with '$' (e.g. $.data.error_rate), at most 200 chars"
        )
    segments: list[str | int] = []
    position = 1
    while position < len(text):
        match = _SEGMENT.match(text, position)
        if match is None:
            raise ValueError(f"json_path {text!r}: unsupported at {text[position:position + 10]!r} "
                             "(only .name, [index] and ['name'])")  # fmt: skip
        if match["index"] is not None:
            segments.append(int(match["index"]))
        else:
            segments.append(match["name"] or match["quoted"])
        position = match.end()
    return tuple(segments)


_MISSING = object()


def select(document: Any, path: tuple[str | int, ...]) -> Any:
    """The value at ``path`` in a parsed JSON document; raises LookupError naming the first
    segment that is not there."""
    node = document
    walked = "$"
    for segment in path:
        if isinstance(segment, int):
            if not isinstance(node, list) or not -len(node) <= segment < len(node):
                raise LookupError(f"no [{segment}] at {walked}")
            node = node[segment]
            walked += f"[{segment}]"
        else:
            value = node.get(segment, _MISSING) if isinstance(node, dict) else _MISSING
            if value is _MISSING:
                raise LookupError(f"no {segment!r} at {walked}")
            node = value
            walked += f".{segment}"
    return node


# --- templates ----------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def check_template(text: str, what: str) -> str:
    """Refuse placeholders other than ``{{group}}``, ``{{version}}`` and ``{{window}}``."""
    for name in _PLACEHOLDER.findall(text):
        if name not in PLACEHOLDERS:
            raise ValueError(f"{what}: unknown placeholder {{{{{name}}}}} (known: group, version, window)")
    return text


def render(text: str, values: dict[str, str], quote: Callable[[str], str] | None = None) -> str:
    """Fill the placeholders from our own configuration values (never from request data);
    ``quote`` escapes each value for where it lands (a URL)."""

    def fill(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        return quote(value) if quote else value

    return _PLACEHOLDER.sub(fill, text)

"""Prometheus and HTTP/JSON gates: an answer in, a list of numbers (or Inconclusive) out.

The parsing functions are pure (``prometheus_values``, ``json_values``) so every hostile answer
is a table test; ``evaluate`` adds the one GET. Placeholders are filled from our configuration
only (the group's name, ``v2``, the judged window), never from request data.
"""

from __future__ import annotations

import functools
import time
import urllib.parse
from typing import Any

import httpx

from proxy.canary.gates.fetch import get_json
from proxy.canary.gates.result import GateResult, Inconclusive, judge
from proxy.gatespec import parse_condition, parse_json_path, render, select
from proxy.settings import HttpGate, PrometheusGate

MAX_SERIES = 1000
_condition = functools.lru_cache(maxsize=512)(parse_condition)
_json_path = functools.lru_cache(maxsize=512)(parse_json_path)


def window_text(seconds: float) -> str:
    """A PromQL duration: ``60s``, or ``2500ms`` (PromQL takes no fractional units)."""
    return f"{seconds:g}s" if float(seconds).is_integer() else f"{round(seconds * 1000)}ms"


def template_values(group: str, window_seconds: float) -> dict[str, str]:
    return {"group": group, "version": "v2", "window": window_text(window_seconds)}


def _number(raw: Any) -> float:
    """A sample or JSON value as a float: numbers and numeric strings (Prometheus sends
    ``"0.5"``, ``"NaN"``, ``"+Inf"``); booleans, objects, arrays and other strings are not."""
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise Inconclusive(f"value is a {type(raw).__name__}, not a number")
    if isinstance(raw, str) and len(raw) > 64:
        raise Inconclusive("value is a long string, not a number")
    try:
        return float(raw)
    except (ValueError, OverflowError):
        raise Inconclusive("value is a string, not a number") from None


def prometheus_values(answer: Any) -> list[float]:
    """The values of an instant query: one per series of a vector, or the scalar."""
    if not isinstance(answer, dict) or answer.get("status") != "success":
        raise Inconclusive("not a successful Prometheus answer")
    data = answer.get("data")
    if not isinstance(data, dict):
        raise Inconclusive("Prometheus answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        if not isinstance(result, list) or len(result) != 2:
            raise Inconclusive("malformed scalar")
        return [_number(result[1])]
    if kind != "vector":
        raise Inconclusive(f"result type {str(kind)[:20]!r} (a query must give a vector or a scalar)")
    if not isinstance(result, list):
        raise Inconclusive("malformed vector")
    if len(result) > MAX_SERIES:
        raise Inconclusive(f"{len(result)} series (at most {MAX_SERIES})")
    values = []
    for series in result:
        sample = series.get("value") if isinstance(series, dict) else None
        if not isinstance(sample, list) or len(sample) != 2:
            raise Inconclusive("malformed sample in the vector")
        values.append(_number(sample[1]))
    return values


def json_values(answer: Any, path: tuple[str | int, ...]) -> list[float]:
    """The number at ``path``, or each number of a flat list there (all must pass)."""
    try:
        found = select(answer, path)
    except LookupError as exc:
        raise Inconclusive(f"json_path finds nothing ({exc})"[:120]) from None
    if isinstance(found, list):
        if len(found) > MAX_SERIES:
            raise Inconclusive(f"json_path selects {len(found)} values (at most {MAX_SERIES})")
        return [_number(item) for item in found]
    return [_number(found)]


def _headers(gate: PrometheusGate | HttpGate) -> dict[str, str]:
    return {name: secret.get_secret_value() for name, secret in gate.headers.items()}


async def evaluate(
    client: httpx.AsyncClient,
    gate: PrometheusGate | HttpGate,
    group: str,
    window_seconds: float,
    timeout: float,
    wall: float | None = None,
) -> GateResult:
    """One evaluation of ``gate`` for ``group``; never raises for anything the far end does."""
    values = template_values(group, window_seconds)
    try:
        if isinstance(gate, PrometheusGate):
            url = gate.address.rstrip("/") + "/api/v1/query"
            params = {
                "query": render(gate.query, values),
                "time": f"{time.time() if wall is None else wall:.3f}",
            }
            answer = await get_json(client, url, params=params, headers=_headers(gate), timeout=timeout)
            numbers = prometheus_values(answer)
        else:
            url = render(gate.url, values, quote=lambda v: urllib.parse.quote(v, safe=""))
            answer = await get_json(client, url, headers=_headers(gate), timeout=timeout)
            numbers = json_values(answer, _json_path(gate.json_path))
    except Inconclusive as exc:
        return GateResult("inconclusive", None, str(exc))
    return judge(numbers, _condition(gate.condition))

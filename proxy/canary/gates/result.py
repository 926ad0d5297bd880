"""The outcome of one gate evaluation: pass, fail or inconclusive, the value and one line why."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from proxy.gatespec import Condition

GateStatus = Literal["pass", "fail", "inconclusive"]


class Inconclusive(Exception):
    """The metric could not be read or is not one judgeable number; the message is the one-line
    reason shown in status (it never contains the URL, its credentials or header values)."""


@dataclass(frozen=True, slots=True)
class GateResult:
    status: GateStatus
    value: float | None
    reason: str


def judge(values: list[float], condition: Condition) -> GateResult:
    """Every series must satisfy the condition (a vector of several series passes only when all
    pass); no value, or a NaN or infinite one, is inconclusive: nothing to judge is never a pass
    and never a failure."""
    if not values:
        return GateResult("inconclusive", None, "no data (empty result)")
    for value in values:
        if not math.isfinite(value):
            return GateResult("inconclusive", None, f"value is {value} (not a finite number)")
    series = f" ({len(values)} series)" if len(values) > 1 else ""
    for value in values:
        if not condition.holds(value):
            return GateResult("fail", value, f"{value:g} fails '{condition.text}'{series}")
    return GateResult("pass", values[0], f"{values[0]:g} meets '{condition.text}'{series}")

"""Writes to the ``split_state`` hash (rollback in force, pin epoch), inside the caller's
transaction so the split and its state change together.

Every writer of the split through our tools calls :func:`note` beside its ``SET``: the manual
paths (``ControlClient``) and the rollout's compare-and-set (``canary/rollout.py``). A plain
``redis-cli SET`` does not, so it neither starts nor ends a rollback and keeps the pin epoch.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.control.keys import Keys


def note(
    pipe: Any, keys: Keys, group: str, value: float, rollback: bool = False, new_ramp: bool = False
) -> None:
    """Queue on ``pipe`` what a split write of ``value`` to ``group`` means: a rollback is marked in
    force (until a later write above 0); a rollback, a new ramp and a write of 0 or 100 bump the
    group's epoch, so pins issued before it are no longer honoured."""
    key = keys.split_state
    if rollback:
        pipe.hset(key, f"rollback:{group}", repr(time.time()))
    elif value > 0:
        pipe.hdel(key, f"rollback:{group}")
    if rollback or new_ramp or value <= 0 or value >= 100:
        pipe.hincrby(key, f"epoch:{group}", 1)

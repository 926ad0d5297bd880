"""When to restart a worker that died, and when its deaths are a crash loop: pure arithmetic on
times, no process in sight (tests/supervisor/test_restarts.py drives it with made-up clocks).

The first death after a healthy run is restarted at once; each further death doubles the wait
(``base`` to ``cap``). A worker that lived ``reset_after`` seconds starts the count afresh.
``loop_deaths`` deaths within ``loop_window`` seconds is a crash loop: reported, never hidden."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    base: float = 0.1  # the wait after the second death in a row
    cap: float = 10.0  # the longest wait
    reset_after: float = 30.0  # a worker that lived this long was healthy: the backoff starts again
    loop_deaths: int = 5  # this many deaths ...
    loop_window: float = 60.0  # ... within this many seconds: a crash loop


@dataclass(frozen=True)
class Decision:
    delay: float  # seconds until the next attempt (0: at once)
    crash_loop: bool  # loop_deaths deaths within loop_window
    deaths: int  # deaths within the window, this one included


@dataclass
class RestartHistory:
    """One worker slot's deaths."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    in_a_row: int = 0  # deaths since the last healthy run
    deaths: deque[float] = field(default_factory=deque)

    def died(self, now: float, lived: float) -> Decision:
        policy = self.policy
        if lived >= policy.reset_after:
            self.in_a_row = 0
        delay = 0.0 if self.in_a_row == 0 else min(policy.cap, policy.base * 2 ** (self.in_a_row - 1))
        self.in_a_row += 1
        self.deaths.append(now)
        while self.deaths and self.deaths[0] <= now - policy.loop_window:
            self.deaths.popleft()
        return Decision(delay, len(self.deaths) >= policy.loop_deaths, len(self.deaths))

    def in_crash_loop(self, now: float) -> bool:
        """Whether the deaths still within the window make a crash loop (it ends as they age out)."""
        recent = [t for t in self.deaths if t > now - self.policy.loop_window]
        return len(recent) >= self.policy.loop_deaths

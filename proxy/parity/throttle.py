"""``--max-qps``: a shared pacing gate for queries and HTTP requests on both sides."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Throttle:
    """At most ``qps`` starts per second across all threads (None: no limit). Pacing, not bursts:
    the point is to stay gentle on a production database, as pt-table-checksum does."""

    def __init__(
        self,
        qps: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / qps if qps else 0.0
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()
        self.waited = 0.0

    def reserve(self) -> float:
        """Take the next slot; return how long to wait before using it."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
            delay = start - now
            self.waited += delay
        return delay

    def wait(self) -> None:
        delay = self.reserve()
        if delay > 0:
            self.sleep(delay)

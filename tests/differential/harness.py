"""One proxy in front of the scripted backend, and the sessions run through it: each is compared
with what the backend produced (runner.py); the proxy must stay up and log no error."""

from __future__ import annotations

import time
import uuid

from tests.differential.backend import ScriptedBackend
from tests.differential.runner import Outcome, Registry, run_and_check
from tests.differential.spec import Session
from tests.support import ProxyProcess


class Harness:
    def __init__(self, backend: ScriptedBackend, proxy: ProxyProcess, variant: str) -> None:
        self.backend = backend
        self.proxy = proxy
        self.variant = variant
        self.registry = Registry()
        self.run_id = uuid.uuid4().hex[:6]
        self.count = 0
        self.seconds = 0.0
        self._log_seen = len(proxy.output())

    def run(self, session: Session) -> tuple[Outcome, list[str]]:
        self.count += 1
        started = time.monotonic()
        outcome, problems = run_and_check(self.backend, self.proxy.port, self.registry, session,
                                          self.run_id, self.count)  # fmt: skip
        process = self.proxy.process
        if process is not None and process.poll() is not None:
            problems.append(f"the proxy exited with {process.returncode}")
        log = self.proxy.output()
        new, self._log_seen = log[self._log_seen :], len(log)
        bad = [
            line for line in new.splitlines() if "ERROR" in line or "Traceback" in line or "CRITICAL" in line
        ]
        if bad:
            problems.append("the proxy logged:\n    " + "\n    ".join(bad[:20]))
        self.seconds += time.monotonic() - started
        return outcome, problems

    def check(self, session: Session) -> Outcome:
        """Run it and fail with every difference found (and the session, for the record)."""
        outcome, problems = self.run(session)
        if problems:
            raise AssertionError(
                f"[{self.variant} path] {len(problems)} difference(s):\n  - "
                + "\n  - ".join(problems)
                + f"\nsession: {session!r}\nclient: sent {outcome.sent} bytes, disconnected at "
                f"{outcome.disconnected_at}, closed by the proxy after {outcome.closed_by_proxy_after}"
            )
        return outcome

"""Health checks with a time bound: a blocked dependency makes ``/readyz`` say so, not hang.

A check that talks to Redis or PostgreSQL can block far longer than a probe waits (a Redis
that stopped answering holds a PING for the 15 s socket timeout; a frozen PostgreSQL holds a
query for ever). :class:`BoundedCheck` runs the check in a thread of its own and waits for it
only until the caller's deadline. At most one run is in flight: while one is still blocked,
later probes wait on that same run (and report how long it has been blocked) instead of
piling up threads and connections.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tpx.errors import first_line

#: a check returns None when healthy, else the problem in a few words; raising is a problem too
CheckFn = Callable[[], str | None]


class _Run:
    def __init__(self, name: str, fn: CheckFn) -> None:
        self.name = name
        self.started = time.monotonic()
        self.done = threading.Event()
        self.problem: str | None = None
        threading.Thread(target=self._run, args=(fn,), name=f"tpx-check-{name}", daemon=True).start()

    def _run(self, fn: CheckFn) -> None:
        try:
            self.problem = fn()
        except Exception as exc:  # whatever the check raised, it means "not ready"
            self.problem = first_line(exc)
        finally:
            self.done.set()

    def wait(self, deadline: float) -> str | None:
        """The run's problem ("name: ..."), or None; a run still blocked at the deadline is one."""
        if not self.done.wait(max(0.0, deadline - time.monotonic())):
            return f"{self.name}: no answer for {time.monotonic() - self.started:.1f}s"
        return None if self.problem is None else f"{self.name}: {self.problem}"


class BoundedCheck:
    def __init__(self, name: str, fn: CheckFn) -> None:
        self.name = name
        self.fn = fn
        self._lock = threading.Lock()
        self._run: _Run | None = None

    def begin(self) -> _Run:
        """A new run, or the one still in flight."""
        with self._lock:
            if self._run is None or self._run.done.is_set():
                self._run = _Run(self.name, self.fn)
            return self._run

"""Stop signals: the first SIGTERM/SIGINT asks for a graceful stop, a later one forces the exit.

The handler only records the time and writes one byte to a pipe (no lock, nothing that can
deadlock with the code it interrupted); the ``tpx-signals`` thread wakes on the pipe and acts.

Signals that arrive within :data:`SIGNAL_WINDOW_S` of the first are the same request: GNU
``timeout`` signals the process and then its process group, and ``docker stop`` through a shell
can do the same, so one stop often arrives as two SIGTERMs microseconds apart. Only a signal
after the window means "stop now" (an operator who insists).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType

log = logging.getLogger(__name__)

#: Seconds after the first stop signal during which further signals are the same request.
SIGNAL_WINDOW_S = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(
        self,
        on_stop: Callable[[], None],
        on_force: Callable[[], None],
        window: float = SIGNAL_WINDOW_S,
    ) -> None:
        self.on_stop = on_stop
        self.on_force = on_force
        self.window = window
        #: monotonic arrival time of every stop signal, appended by the handler
        self.received: list[float] = []
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self.thread = threading.Thread(target=self._watch, name="tpx-signals", daemon=True)

    def install(self, signums: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        """Take over the stop signals (from the main thread, as Python requires)."""
        for signum in signums:
            signal.signal(signum, self._handler)
        self.thread.start()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(time.monotonic())
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a wake-up
            os.write(self._write_fd, b"\0")

    def _watch(self) -> None:
        first: float | None = None
        seen = 0
        while True:
            os.read(self._read_fd, 64)
            while seen < len(self.received):  # the handler appended before it wrote the byte
                at = self.received[seen]
                seen += 1
                if first is None:
                    first = at
                    self.on_stop()
                elif at - first > self.window:
                    self.on_force()
                    return
                else:
                    log.debug("stop signal %.3fs after the first: the same stop", at - first)

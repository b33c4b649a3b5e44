"""Logging: JSON lines for machines, a readable line for people at a terminal.

Every record carries the thread name and this instance's consumer name, so the
logs of several instances (and of several threads in one) can be told apart.
Messages use lazy ``%s`` arguments; URLs with passwords never reach a log
because :func:`tpx.config.mask_url` is applied to every rendered message.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from tpx.config import mask_url
from tpx.format import ago

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s [%(threadName)s] %(name)s: %(message)s"
_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(threadName)s %(consumer)s %(message)s"


class _ContextFilter(logging.Filter):
    """Adds ``consumer`` to every record and masks secrets in the message."""

    def __init__(self, consumer: str) -> None:
        super().__init__()
        self.consumer = consumer

    def filter(self, record: logging.LogRecord) -> bool:
        record.consumer = self.consumer
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        message = str(record.msg)
        if "://" in message or "password" in message:
            record.msg = mask_url(message)
        return True


def setup(level: str = "INFO", fmt: str = "auto", consumer: str = "-", stream: TextIO | None = None) -> None:
    """Configure the root logger once per process (idempotent)."""
    out = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter
    if use_json:
        rename: dict[str, Any] = {
            "asctime": "time",
            "levelname": "level",
            "name": "logger",
            "threadName": "thread",
        }
        formatter = JsonFormatter(_JSON_FIELDS, rename_fields=rename)
    else:
        formatter = logging.Formatter(_TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(_ContextFilter(consumer))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # third-party chatter stays at WARNING unless we debug
    for noisy in ("psycopg.pool", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    collapse_pool_outages()


#: Recent WARNING+ lines an instance keeps for its heartbeat (`tpx top` shows them per instance).
RECENT_WARNINGS = 20
#: Characters kept of each of those lines: the heartbeat stays a small document.
RECENT_LINE_CHARS = 240
_RECENT_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"


class RecentWarnings(logging.Handler):
    """The last :data:`RECENT_WARNINGS` WARNING+ records as one-line texts, secrets masked.

    A ring (old lines fall out), safe to read from any thread; the first line of a message only
    (a traceback stays in the log, its last line is the exception's)."""

    def __init__(self, capacity: int = RECENT_WARNINGS) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=capacity)
        self.setFormatter(logging.Formatter(_RECENT_FORMAT, "%Y-%m-%dT%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = self.format(record).splitlines()[0] if record.msg else ""
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                first += f" ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
            line = mask_url(first)
            self.lines.append(line if len(line) <= RECENT_LINE_CHARS else line[: RECENT_LINE_CHARS - 1] + "…")
        except Exception:
            self.handleError(record)

    def recent(self) -> list[str]:
        return list(self.lines)


_recent: RecentWarnings | None = None


def keep_recent_warnings() -> RecentWarnings:
    """Install the process's :class:`RecentWarnings` on the root logger (once; idempotent)."""
    global _recent  # noqa: PLW0603 -- one ring per process, as logging's root is one per process
    if _recent is None:
        _recent = RecentWarnings()
    root = logging.getLogger()
    if _recent not in root.handlers:  # setup() replaces the root's handlers
        root.addHandler(_recent)
    return _recent


def recent_warnings() -> list[str]:
    """The recent WARNING+ lines of this process, oldest first (none until installed)."""
    return [] if _recent is None else _recent.recent()


# --- psycopg_pool's connection failures: one line per outage state change ------------------------

#: Seconds between the reminders logged while a pool still cannot connect: the first failure of
#: an outage is logged at once, its repeats (psycopg_pool retries every few seconds) are counted.
POOL_OUTAGE_REMINDER_S = 60.0
#: The logger psycopg_pool writes to, and the one tpx's outage lines come from.
POOL_LOGGER = "psycopg.pool"
OUTAGE_LOGGER = "tpx.connections"
#: psycopg_pool's messages for a failed connection attempt (psycopg_pool/pool.py, _add_connection).
_ATTEMPT_FAILED = "error connecting in %r: %s"
_GAVE_UP = "reconnection attempt in pool %r failed after %s sec"
#: The arguments of :data:`_ATTEMPT_FAILED`: the pool's name and the exception.
_ATTEMPT_ARGS = 2
#: Characters kept of a failure's reason in the outage line.
_REASON_CHARS = 300

_outage_log = logging.getLogger(OUTAGE_LOGGER)


def one_line_reason(text: str) -> str:
    """A multi-line libpq error on one line, secrets masked: its first line, and the line after
    when the first only announces a list (``All failures were:``)."""
    lines = [line.strip().removeprefix("- ") for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    reason = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    reason = mask_url(reason)
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"


@dataclass
class _Outage:
    started: float
    reminded: float
    attempts: int


class PoolOutages(logging.Filter):
    """On the ``psycopg.pool`` logger: its connection failures become one line per state change.

    psycopg_pool logs a multi-line WARNING ``error connecting in 'tpx-pg': …`` for every attempt
    (16 in 10 s while PostgreSQL is down), burying tpx's own retry lines. This filter drops them
    and logs instead, on ``tpx.connections``: the first failure of an outage (one line), a
    reminder at most every :data:`POOL_OUTAGE_REMINDER_S` while it lasts, and, when
    :meth:`connected` hears of the pool's next connection, that it is back. Every other message
    of psycopg_pool passes unchanged."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._outages: dict[str, _Outage] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if record.msg == _GAVE_UP and args:
            with self._lock:
                return str(args[0]) not in self._outages  # part of an outage already told
        if record.msg != _ATTEMPT_FAILED or len(args) != _ATTEMPT_ARGS:
            return True
        pool, exc = str(args[0]), args[1]
        reason = one_line_reason(str(exc))
        now = self._clock()
        with self._lock:
            outage = self._outages.get(pool)
            if outage is None:
                self._outages[pool] = _Outage(now, now, 1)
                told: tuple[Any, ...] | None = (
                    "pool %r cannot connect to PostgreSQL: %s; retrying (logged again when it "
                    "connects, or in %s)",
                    pool,
                    reason,
                    ago(POOL_OUTAGE_REMINDER_S),
                )
            else:
                outage.attempts += 1
                told = None
                if now - outage.reminded >= POOL_OUTAGE_REMINDER_S:
                    outage.reminded = now
                    told = (
                        "pool %r still cannot connect to PostgreSQL after %s (%d attempts): %s",
                        pool,
                        ago(now - outage.started),
                        outage.attempts,
                        reason,
                    )
        if told is not None:  # logged outside the lock: a handler may be slow
            _outage_log.warning(*told)
        return False

    def connected(self, pool: str) -> None:
        """The pool ``pool`` made a connection: an outage it was in is over (logged once)."""
        with self._lock:
            outage = self._outages.pop(pool, None)
        if outage is not None:  # a WARNING too: the instance's recent warnings (tpx top) show it ended
            _outage_log.warning(
                "pool %r connected to PostgreSQL again after %s (%d failed attempts)",
                pool,
                ago(self._clock() - outage.started),
                outage.attempts,
            )


_pool_outages = PoolOutages()


def collapse_pool_outages() -> PoolOutages:
    """Install the process's :class:`PoolOutages` on psycopg_pool's logger (once; idempotent)."""
    logger = logging.getLogger(POOL_LOGGER)
    if _pool_outages not in logger.filters:
        logger.addFilter(_pool_outages)
    return _pool_outages


def pool_connected(pool: str) -> None:
    """Tell the outage filter that ``pool`` connected (:func:`tpx.connections.pg_pool` does, for
    each new connection): cheap when no outage is on."""
    _pool_outages.connected(pool)

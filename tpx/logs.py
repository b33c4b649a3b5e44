"""Logging: JSON lines for machines, a readable line for people at a terminal.

Every record carries the thread name and this instance's consumer name, so the
logs of several instances (and of several threads in one) can be told apart.
Messages use lazy ``%s`` arguments; URLs with passwords never reach a log
because :func:`tpx.config.mask_url` is applied to every rendered message.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

from tpx.config import mask_url

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

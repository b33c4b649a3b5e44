"""Logging: JSON lines for machines, a readable line for people at a terminal.

Every record carries the thread name and this instance's consumer name, so the
logs of several instances (and of several threads in one) can be told apart.
Messages use lazy ``%s`` arguments; URLs with passwords never reach a log
because :func:`tpx.config.mask_url` is applied to every rendered message.
"""

from __future__ import annotations

import logging
import sys
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

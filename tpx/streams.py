"""Small facts about Redis streams that the engine, the ops commands and the dashboard share.

Redis hands back bytes (tpx's clients keep replies undecoded) and stream entry ids of the form
``<milliseconds>-<sequence>``; these helpers are the one place that reads them.
"""

from __future__ import annotations

from typing import Any


def as_text(value: Any) -> str:
    """A Redis reply value as text: bytes decoded as UTF-8 (undecodable bytes replaced)."""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def entry_ms(entry_id: bytes | str) -> int:
    """The epoch milliseconds a stream entry id starts with (when Redis added the entry)."""
    raw = entry_id.split(b"-", 1)[0] if isinstance(entry_id, bytes) else entry_id.split("-", 1)[0]
    return int(raw)


def dlq_stream(stream: str) -> str:
    """The dead-letter stream of ``stream`` (CONTRACT.md §3: the input key followed by ``:dlq``)."""
    return f"{stream}:dlq"


def entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence): the order Redis keeps, to sort ids by."""
    text = as_text(entry_id)
    _, _, seq = text.partition("-")
    return entry_ms(text), int(seq or 0)

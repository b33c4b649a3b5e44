"""Small facts about Redis streams that the engine, the ops commands and the dashboard share.

Redis hands back bytes (tpx's clients keep replies undecoded) and stream entry ids of the form
``<milliseconds>-<sequence>``; these helpers are the one place that reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def group_lag(group: Mapping[str, Any], last_generated_id: Any, stream_length: int) -> int | None:
    """The group's lag, unless the stream's ids contradict it; None when Redis cannot tell.

    Redis 7.0 computes ``lag`` from counters (entries-added - entries-read) that an AOF
    reload can leave stale: a lag of 1,620 with nothing left to deliver. When the group's
    last-delivered-id is the stream's last-generated-id the lag is 0, and it is never more
    than the entries the stream holds.
    """
    delivered = group.get("last-delivered-id")
    if (
        delivered is not None
        and last_generated_id is not None
        and as_text(delivered) == as_text(last_generated_id)
    ):
        return 0
    lag = group.get("lag")
    return None if lag is None else min(int(lag), stream_length)

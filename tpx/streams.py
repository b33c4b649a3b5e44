"""Small facts about Redis streams that the engine, the ops commands and the dashboard share.

Redis hands back bytes (tpx's clients keep replies undecoded) and stream entry ids of the form
``<milliseconds>-<sequence>``; these helpers are the one place that reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis


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


#: Entries counted on either side of a group's position when Redis reports no lag (before 7.0,
#: or after deletions): two bounded XRANGEs per call, never a walk over the whole stream.
LAG_COUNT_LIMIT = 1_000


class EstimatedLag(int):
    """A lag tpx counted itself because Redis reported none; ``at_least``: the count hit its bound.

    An ``int``, so every caller that shows or compares a lag keeps working; front ends that can
    say "estimated" (or "≥") check for this type."""

    at_least: bool

    def __new__(cls, value: int, at_least: bool = False) -> EstimatedLag:
        lag = super().__new__(cls, value)
        lag.at_least = at_least
        return lag


def estimate_lag(
    client: redis.Redis,
    stream: str,
    group: Mapping[str, Any],
    last_generated_id: Any,
    stream_length: int,
    limit: int = LAG_COUNT_LIMIT,
) -> int | None:
    """The group's lag: :func:`group_lag` when Redis tells it, else counted from the stream.

    Counts the entries after the group's last-delivered-id (up to ``limit``); when there are
    more, the entries up to it (the lag is then the stream's length minus those); when both
    sides hold ``limit`` or more, the lag is at least ``limit``."""
    exact = group_lag(group, last_generated_id, stream_length)
    delivered = group.get("last-delivered-id")
    if exact is not None or delivered is None:
        return exact
    ms, seq = entry_order(delivered)
    after = client.xrange(stream, min=f"{ms}-{seq + 1}", max="+", count=limit) or []
    if len(after) < limit:
        return EstimatedLag(len(after))
    upto = client.xrange(stream, min="-", max=f"{ms}-{seq}", count=limit) or []
    if len(upto) < limit:
        return EstimatedLag(max(limit, stream_length - len(upto)))
    return EstimatedLag(limit, at_least=True)

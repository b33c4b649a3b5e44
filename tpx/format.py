"""Plain-text renderings of times and states, shared by the command line and the dashboard.

Pure functions of values (no rich, no Textual), so each front end styles them its own way.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type only: the dashboard and the CLI hand in what tpx.ops.inspect returned
    from tpx.ops.inspect import ConsumerView

_MINUTE = 60
_HOUR = 3600
_DAY = 86_400


def ago(seconds: float | None) -> str:
    """3s, 4m05s, 2h10m, 3d04h; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < _MINUTE:
        return f"{s}s"
    if s < _HOUR:
        return f"{s // _MINUTE}m{s % _MINUTE:02d}s"
    if s < _DAY:
        return f"{s // _HOUR}h{s % _HOUR // _MINUTE:02d}m"
    return f"{s // _DAY}d{s % _DAY // _HOUR:02d}h"


def ms_time(ms: int) -> str:
    """Epoch milliseconds as a UTC time, ``2026-12-01 09:30:00``."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def us_time(us: int) -> str:
    """Epoch microseconds as a UTC time with milliseconds, ``2026-12-01 09:30:00.123``."""
    return dt.datetime.fromtimestamp(us / 1_000_000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


#: A consumer with pending entries and no heartbeat: its entries wait for a claim.
DEAD_WITH_PENDING = "DEAD, HAS PENDING"


def consumer_state(alive: bool, pending: int) -> str:
    """A consumer's state spelled out, readable without colour."""
    return "alive" if alive else (DEAD_WITH_PENDING if pending else "dead")


def short_us_time(us: int | None) -> str:
    """Epoch microseconds as a short UTC time for narrow columns, ``12-01 09:30:00``; '-' when unknown."""
    if not us:
        return "-"
    return dt.datetime.fromtimestamp(us / 1_000_000, dt.UTC).strftime("%m-%d %H:%M:%S")


def number(value: float | None, spec: str = ",") -> str:
    """A number with a format spec (``","`` thousands, ``".5f"``, ``",.0f"``); '-' when unknown."""
    return "-" if value is None else format(value, spec)


def fix_state(valid: bool | None) -> str:
    """A position's GPS validity spelled out, readable without colour; '-' when unknown."""
    return "-" if valid is None else ("valid" if valid else "no fix")


#: The consumer table's columns, in the command line's `tpx status` and the dashboard alike.
CONSUMER_COLUMNS = ("consumer", "state", "pending", "idle", "read/s", "written/s", "queue", "cache")


def consumer_cells(c: ConsumerView) -> tuple[str, ...]:
    """One consumer as the text of :data:`CONSUMER_COLUMNS`; '-' where it has no heartbeat."""
    i = c.instance
    return (
        c.name,
        consumer_state(c.alive, c.pending),
        f"{c.pending:,}",
        ago(c.idle_ms / 1000),
        f"{i.read_per_s:,.0f}" if i else "-",
        f"{i.written_per_s:,.0f}" if i else "-",
        str(i.queue_depth) if i else "-",
        f"{i.cache_size:,}" if i else "-",
    )

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
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


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


def us_iso(us: int) -> str:
    """Epoch microseconds as an ISO 8601 UTC time, exact (what ``--since`` takes back):
    ``2026-12-01T09:30:00.123456+00:00``."""
    return (_EPOCH + dt.timedelta(microseconds=us)).isoformat()


def local_time(when: dt.datetime) -> str:
    """An aware time in this machine's zone, to the millisecond, ``12-01 11:30:00.123``; the zone
    is :func:`local_zone` (said once, in a header, not in every cell)."""
    return when.astimezone().strftime("%m-%d %H:%M:%S.%f")[:-3]


def local_zone() -> str:
    """This machine's time zone as ``strftime`` names it now: ``EET``, ``UTC``, ``+0530``."""
    return dt.datetime.now().astimezone().strftime("%Z") or dt.datetime.now().astimezone().strftime("%z")


#: A consumer with pending entries, no heartbeat and no HTTP listener that answers: its entries
#: wait for a claim.
DEAD_WITH_PENDING = "DEAD, HAS PENDING"
#: A consumer with no heartbeat whose HTTP listener answers: it runs (it lost Redis?), holding
#: its queued batches; claiming its entries would write them twice over.
HEARTBEAT_MISSING = "HEARTBEAT MISSING"
#: An instance whose writers keep failing (its /readyz is 503): alive, but writing nothing.
WRITERS_FAILING = "WRITERS FAILING"


def consumer_state(
    alive: bool, pending: int, failing: tuple[float, str] | None = None, answers: bool | None = None
) -> str:
    """A consumer's state spelled out, readable without colour.

    ``failing``: (seconds, reason) of its failing writers, from its heartbeat; ``answers``:
    whether its HTTP listener answered, for one without a heartbeat (None: not known).
    """
    if alive:
        return "alive" if failing is None else f"alive, {WRITERS_FAILING} {ago(failing[0])}: {failing[1]}"
    if answers:
        return f"{HEARTBEAT_MISSING}, HAS PENDING" if pending else HEARTBEAT_MISSING
    return DEAD_WITH_PENDING if pending else "dead"


def consumer_view_state(c: ConsumerView) -> str:
    """:func:`consumer_state` of what tpx.ops.inspect learnt of a consumer."""
    return consumer_state(c.alive, c.pending, c.failing, c.answers)


def consumer_known(c: ConsumerView) -> str:
    """For a consumer without a heartbeat: what tpx knows of it, and what it cannot know."""
    probe = c.probe
    seen = probe.last_seen if probe else None
    parts = [
        f"last heartbeat {ago(seen.heartbeat_age_s)} ago" if seen else "no heartbeat in the last day",
        f"idle {ago(c.idle_ms / 1000)} in the group",
    ]
    if probe is None or not probe.url:
        parts.append("no HTTP address known")
    elif probe.answers:
        parts.append(f"{probe.url} answers: it still runs, holding what it read")
    else:
        parts.append(f"{probe.url} does not answer ({probe.error})")
    unknown = "whether it will come back" if not probe or not probe.answers else "why it stopped heartbeating"
    return f"{c.name}: {', '.join(parts)}; not known: {unknown}"


def claim_command(name: str) -> str:
    """The command that takes over a dead consumer's pending entries."""
    return f"tpx claim --dead-consumer {name}"


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
        consumer_view_state(c),
        f"{c.pending:,}",
        ago(c.idle_ms / 1000),
        f"{i.read_per_s:,.0f}" if i else "-",
        f"{i.written_per_s:,.0f}" if i else "-",
        str(i.queue_depth) if i else "-",
        f"{i.cache_size:,}" if i else "-",
    )

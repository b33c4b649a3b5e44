"""`tpx timing recompute`: replay positions for a window and replace the timing records in it.

No past, no event: a running stage never writes past events for a geofence that was added or
edited (it adopts it at each device's newest fix). An operator who wants them replays the window
here, for one geofence (every device with positions in the window) or for one device (every
geofence tpx uses now).

:func:`plan` finds the CMS's tables, the geofences to replay with and the devices concerned (one
query); :func:`run` then takes each device in one transaction of its own:

1. its lock (its row in ``tpx_domain_devices``), the stage's own
   :data:`~tpx.domainstage.stage.LOCK_SQL`: no writer changes the device's records meanwhile,
   and a writer that comes next sees what this wrote;
2. its valid fixes in the window, ordered by time, with the last one before ``since`` and the
   first one after ``until``: the replay starts at the fix before the window (where membership
   is set from where it is, without events, as for a device's first fix) so that an event on a
   segment across either edge is recomputed too;
3. :func:`tpx.domain.replay` of them; its events with a time in the window are the records the
   window should hold;
4. the tpx-written records of the device in the window, of the geofences replayed (a record
   tpx wrote has the id :func:`tpx.domain.event_id` gives its device, geofence, event and
   time; other rows are left alone): those the replay no longer has are deleted, and the
   replay's events that are new or differ are written with the stage's own upsert;
5. when anything changed, the device's version in ``tpx_domain_devices`` + 1: an instance holding
   the device in memory sees another version at its next batch and resumes from the stored
   state (a device never stored, version 0, is resumed from its records anyway).

Idempotent (the same replay gives the same ids and values: a second run changes nothing and
says so); ``dry_run`` counts the same without writing or locking (it holds up no writer).
Interrupted, it leaves each device either done or untouched: run it again.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from tpx.config import Settings
from tpx.connections import pg_connect, search_path
from tpx.domain import Event, Fix, Geofence, GeofenceSet, Invalid, event_id, parse_geofence, replay
from tpx.domain.geofences import GeofenceId
from tpx.domainstage.geofences import geofence_rows
from tpx.domainstage.stage import LOCK_SQL, timing_params, timing_statements
from tpx.domainstage.tables import CmsTables, inspect_tables
from tpx.schema import require_current

#: ``application_name`` of the connection (``pg_stat_activity``).
PG_PURPOSE = "tpx-recompute"
US_PER_MS = 1_000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: The columns the stage's upsert updates (the others are in the id): what "differs" compares.
COMPARED = ("latitude", "longitude", "speed", "direction", "uncertainty_s")

#: A device's valid fixes in the window, with the last one before it and the first one after.
FIXES_SQL = """
SELECT (extract(epoch FROM ts) * 1000000)::int8, latitude, longitude, speed FROM (
    (SELECT ts, latitude, longitude, speed FROM {positions}
     WHERE device_id = %(device)s AND valid AND ts < %(since)s ORDER BY ts DESC LIMIT 1)
    UNION ALL
    (SELECT ts, latitude, longitude, speed FROM {positions}
     WHERE device_id = %(device)s AND valid AND ts >= %(since)s
       AND (%(until)s::timestamptz IS NULL OR ts <= %(until)s))
    UNION ALL
    (SELECT ts, latitude, longitude, speed FROM {positions}
     WHERE device_id = %(device)s AND valid AND %(until)s::timestamptz IS NOT NULL AND ts > %(until)s
     ORDER BY ts LIMIT 1)
) AS p ORDER BY ts
"""
#: The devices with valid fixes in the window, and those with records of the geofence in it.
DEVICES_SQL = """
SELECT device_id FROM {positions}
WHERE valid AND ts >= %(since)s AND (%(until)s::timestamptz IS NULL OR ts <= %(until)s)
UNION
SELECT device_id::text FROM {timing}
WHERE geofence::text = %(geofence)s
  AND ts >= %(since)s AND (%(until)s::timestamptz IS NULL OR ts <= %(until)s)
ORDER BY 1
"""
#: A device's records in the window, of the geofences replayed.
RECORDS_SQL = """
SELECT id, geofence::text, event, (extract(epoch FROM ts) * 1000)::int8 FROM {timing}
WHERE device_id = %(device)s AND geofence::text = ANY(%(scope)s::text[])
  AND ts >= %(since)s AND (%(until)s::timestamptz IS NULL OR ts <= %(until)s)
"""
#: The lock's placeholder row (version 0: never stored), left only by a device no writer stored
#: (the repair makes its own when it takes the fixes of such a device that wait).
UNPLACE_SQL = "DELETE FROM {}.tpx_domain_devices WHERE device_id = %s AND version = 0"
BUMP_SQL = (
    "UPDATE {}.tpx_domain_devices SET version = version + 1, updated_at = now()"
    " WHERE device_id = %s AND version > 0"
)


#: A recompute that changed records leaves a row in tpx's own audit table (sql/004).
AUDIT_SQL = """
INSERT INTO tpx_domain_recomputes (geofence, device_id, since, until, devices, removed, written)
VALUES (%s, %s, %s, %s, %s, %s, %s)
"""


class TargetError(Exception):
    """The geofence given cannot be recomputed (no such row, invalid, inactive): one line."""


@dataclass(frozen=True, slots=True)
class Window:
    """``since`` to ``until`` (both included; ``until`` None: up to the newest fix)."""

    since: dt.datetime
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        if self.until is not None and self.until < self.since:
            raise ValueError(f"the window ends ({self.until.isoformat()}) before it starts ({self.since})")

    def holds(self, ts_ms: int) -> bool:
        """Whether a time in epoch milliseconds is in the window."""
        t = EPOCH + dt.timedelta(milliseconds=ts_ms)
        return self.since <= t and (self.until is None or t <= self.until)


@dataclass(frozen=True, slots=True)
class Plan:
    """What :func:`run` replays: with which geofences, whose records, for which devices."""

    window: Window
    tables: CmsTables
    #: The set to replay with: the one geofence, or every one tpx uses now.
    geofences: GeofenceSet
    #: The devices concerned, sorted.
    devices: tuple[str, ...]
    #: The --geofence or --device given (the other None).
    geofence: GeofenceId | None = None
    device: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceChange:
    device_id: str
    removed: int
    written: int


@dataclass(frozen=True, slots=True)
class RecomputeResult:
    window: Window
    #: The --geofence or --device of the plan (the other None).
    geofence: GeofenceId | None
    device: str | None
    devices: int
    #: Valid fixes replayed (those of the window and the one on each side).
    fixes: int
    removed: int
    written: int
    dry_run: bool
    #: The devices whose records changed (or would), with their counts.
    changed: tuple[DeviceChange, ...] = field(default=())

    def to_dict(self) -> dict[str, object]:
        until = self.window.until
        return {
            "geofence": self.geofence,
            "device": self.device,
            "since": self.window.since.isoformat(),
            "until": None if until is None else until.isoformat(),
            "devices": self.devices,
            "fixes": self.fixes,
            "removed": self.removed,
            "written": self.written,
            "dry_run": self.dry_run,
            "changed": [
                {"device_id": c.device_id, "removed": c.removed, "written": c.written} for c in self.changed
            ],
        }


def plan(
    settings: Settings, window: Window, *, geofence: str | None = None, device: str | None = None
) -> Plan:
    """The geofences and devices of a recompute: ``geofence`` (its id as text) or ``device``.

    Raises :class:`TargetError` for a geofence that is missing, invalid or inactive,
    :class:`~tpx.domainstage.tables.TablesMissing`, :class:`~tpx.schema.SchemaBehind` and
    :class:`psycopg.Error` as usual.
    """
    if (geofence is None) == (device is None):
        raise ValueError("recompute one geofence or one device")
    with pg_connect(settings.database_url, PG_PURPOSE, autocommit=True) as conn:
        conn.execute(search_path(settings))
        tables = inspect_tables(conn, settings)
        require_current(conn, settings.db_schema)
        rows = geofence_rows(conn, tables)
        if device is not None:
            return Plan(window, tables, GeofenceSet.from_rows(rows), (device,), device=device)
        assert geofence is not None  # noqa: S101 (checked above)
        chosen = _one_geofence(rows, geofence, tables)
        found = conn.execute(
            sql.SQL(DEVICES_SQL).format(positions=_positions(settings), timing=tables.timing_ident()),
            {"since": window.since, "until": window.until, "geofence": str(chosen.id)},
        ).fetchall()
    return Plan(window, tables, GeofenceSet([chosen]), tuple(str(d) for (d,) in found), geofence=chosen.id)


def run(
    settings: Settings,
    chosen: Plan,
    *,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> RecomputeResult:
    """Recompute each device of the plan in a transaction of its own; ``progress(1)`` after each."""
    fixes = removed = written = 0
    changed: list[DeviceChange] = []
    with pg_connect(settings.database_url, PG_PURPOSE) as conn:
        conn.execute(search_path(settings))
        types = _column_types(conn, chosen.tables)
        conn.commit()
        for device in chosen.devices:
            # a dry run writes nothing, not even the lock's row: it reads, counts, rolls back
            with conn.transaction(force_rollback=dry_run), conn.cursor() as cur:
                if not dry_run:
                    cur.execute(LOCK_SQL, (json.dumps([device]),))
                n, gone, new = _device(cur, settings, chosen, types, device, dry_run)
                if not dry_run:  # the lock's placeholder for a device never stored goes (the
                    # lock holds until COMMIT all the same)
                    cur.execute(sql.SQL(UNPLACE_SQL).format(sql.Identifier(settings.db_schema)), (device,))
            fixes += n
            removed += gone
            written += new
            if gone or new:
                changed.append(DeviceChange(device, gone, new))
            if progress is not None:
                progress(1)
        if not dry_run and (removed or written):
            conn.execute(
                AUDIT_SQL,
                (
                    None if chosen.geofence is None else str(chosen.geofence),
                    chosen.device,
                    chosen.window.since,
                    chosen.window.until,
                    len(chosen.devices),
                    removed,
                    written,
                ),
            )
            conn.commit()
    return RecomputeResult(
        chosen.window,
        chosen.geofence,
        chosen.device,
        len(chosen.devices),
        fixes,
        removed,
        written,
        dry_run,
        tuple(changed),
    )


def _device(
    cur: psycopg.Cursor[Any],
    settings: Settings,
    chosen: Plan,
    types: dict[str, str],
    device: str,
    dry_run: bool,
) -> tuple[int, int, int]:
    """One device, in the caller's transaction, its lock held: (fixes replayed, records removed,
    written)."""
    window, tables = chosen.window, chosen.tables
    bounds = {"device": device, "since": window.since, "until": window.until}
    fixes = [
        Fix(ts_us, lat, lon, True, speed)
        for ts_us, lat, lon, speed in cur.execute(
            sql.SQL(FIXES_SQL).format(positions=_positions(settings)), bounds
        ).fetchall()
    ]
    events = [
        e for e in replay(device, chosen.geofences, fixes, settings.max_speed_kmh) if window.holds(e.ts_ms)
    ]
    scope = [str(g) for g in chosen.geofences.by_id]
    existing = cur.execute(
        sql.SQL(RECORDS_SQL).format(timing=tables.timing_ident()), {**bounds, "scope": scope}
    ).fetchall()
    ours = {rid for rid, gid, kind, ts_ms in existing if rid == event_id(device, gid, kind, ts_ms)}
    stale = sorted(ours - {e.id for e in events})
    new = _differing(cur, tables, types, events)
    if dry_run or not (stale or new):
        return len(fixes), len(stale), len(new)
    upsert, delete = timing_statements(tables)
    if stale:
        cur.execute(delete, (stale,))
    if new:
        cur.execute(upsert, timing_params(new))
    cur.execute(sql.SQL(BUMP_SQL).format(sql.Identifier(settings.db_schema)), (device,))
    return len(fixes), len(stale), len(new)


def _differing(
    cur: psycopg.Cursor[Any], tables: CmsTables, types: dict[str, str], events: Sequence[Event]
) -> list[Event]:
    """The events whose record is missing or holds other values (compared as the columns store
    them: a latitude as its numeric(10,7), a speed as its real)."""
    if not events:
        return []
    columns = [c for c in COMPARED if c in tables.timing_columns]
    arrays = {"latitude": "float8", "longitude": "float8", "speed": "float8", "direction": "int4"}
    proposed = [sql.SQL("unnest(%(id)s::uuid[]) AS id")] + [
        sql.SQL("unnest(%({})s::{}[])::{} AS {}").format(
            sql.SQL(c), sql.SQL(arrays.get(c, "float8")), sql.SQL(types[c]), sql.Identifier(c)
        )
        for c in columns
    ]
    query = sql.SQL(
        "SELECT p.id FROM (SELECT {proposed}) AS p LEFT JOIN {timing} AS t ON t.id = p.id"
        " WHERE t.id IS NULL OR ({old}) IS DISTINCT FROM ({new})"
    ).format(
        proposed=sql.SQL(", ").join(proposed),
        timing=tables.timing_ident(),
        old=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in columns),
        new=sql.SQL(", ").join(sql.SQL("p.{}").format(sql.Identifier(c)) for c in columns),
    )
    differing: set[uuid.UUID] = {rid for (rid,) in cur.execute(query, timing_params(events)).fetchall()}
    return [e for e in events if e.id in differing]


def _one_geofence(rows: list[dict[str, object]], given: str, tables: CmsTables) -> Geofence:
    row = next((r for r in rows if str(r["id"]) == given), None)
    if row is None:
        raise TargetError(f"no geofence {given} in {tables.geofences}")
    parsed = parse_geofence(row)
    if isinstance(parsed, Invalid):
        raise TargetError(f"geofence {given} is invalid: {parsed.reason}")
    if not parsed.active:
        raise TargetError(f"geofence {given} is inactive: tpx writes no timing records for it")
    return parsed


def _column_types(conn: psycopg.Connection[Any], tables: CmsTables) -> dict[str, str]:
    """The timing table's columns and their types as PostgreSQL spells them."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped",
        (tables.timing_ident().as_string(conn),),
    ).fetchall()
    return {str(name): str(kind) for name, kind in rows}


def _positions(settings: Settings) -> sql.Identifier:
    return sql.Identifier(settings.db_schema, "positions")

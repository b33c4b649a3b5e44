"""Timing records and each device's membership, as the operator reads them (`tpx timing`, `tpx top`).

Read only. Each call opens one connection with tpx's search_path (as :mod:`tpx.ops.geofences`
does), finds and checks the CMS's tables as the stage does (a missing table or column raises
:class:`~tpx.domainstage.tables.TablesMissing`), and returns data: :class:`TimingRow` for the
records (newest first, with their geofence's name), :class:`DeviceTiming` for one device, its
records and the geofences it is inside now per its stored domain state (``tpx_domain_devices``:
what the next writer to see the device resumes from).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql

from tpx.config import Settings
from tpx.connections import pg_connect, search_path
from tpx.domain import state_from_json
from tpx.domain.geofences import GeofenceId
from tpx.domainstage.geofences import INTEGER_ID_TYPES
from tpx.domainstage.tables import CmsTables, inspect_tables
from tpx.schema import require_current

#: ``application_name`` of the connection (``pg_stat_activity``).
PG_PURPOSE = "tpx-timing"
#: Records returned when the caller names no limit.
DEFAULT_LIMIT = 50
#: Columns tpx fills where the table has them (read as None where it has not).
OPTIONAL_COLUMNS = ("speed", "direction", "uncertainty_s")

#: A device's stored state (version 0: a placeholder the stage's lock made, never stored; none:
#: no row), the oldest of its fixes whose timing records wait (a failed batch's, or a deferred
#: one's: moved to tpx_domain_missed, or still in its batch's row of tpx_domain_queue, lines
#: "device ts_us", found by a search for the device's line first) and how many wait: one row.
DEVICE_SQL = """
SELECT d.version, d.state, m.since, m.waiting
FROM (
    SELECT min(w.ts) AS since, count(*) AS waiting FROM (
        SELECT ts FROM {schema}.tpx_domain_missed WHERE device_id = %(d)s
        UNION ALL
        SELECT to_timestamp(0) + split_part(k, ' ', 2)::int8 * interval '1 microsecond'
        FROM {schema}.tpx_domain_queue AS q CROSS JOIN LATERAL string_to_table(q.fixes, E'\\n') AS k
        WHERE strpos(E'\\n' || q.fixes, E'\\n' || %(d)s || ' ') > 0 AND split_part(k, ' ', 1) = %(d)s
    ) AS w
) AS m
LEFT JOIN {schema}.tpx_domain_devices AS d ON d.device_id = %(d)s
"""


@dataclass(frozen=True, slots=True)
class TimingRow:
    """One timing record, with its geofence's name (None: no such geofence row any more)."""

    id: uuid.UUID
    device_id: str
    geofence: GeofenceId
    geofence_name: str | None
    event: str
    #: The event's time, in UTC.
    ts: dt.datetime
    latitude: float
    longitude: float
    #: None where the record has none, or the table has no such column.
    speed: float | None
    direction: int | None
    uncertainty_s: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": str(self.id),
            "device_id": self.device_id,
            "geofence": self.geofence,
            "geofence_name": self.geofence_name,
            "event": self.event,
            "ts": self.ts.isoformat(),
            "latitude": self.latitude,
            "longitude": self.longitude,
            "speed": self.speed,
            "direction": self.direction,
            "uncertainty_s": self.uncertainty_s,
        }


@dataclass(frozen=True, slots=True)
class Inside:
    """A geofence a device is inside now (its name None: no such geofence row any more)."""

    id: GeofenceId
    name: str | None


@dataclass(frozen=True, slots=True)
class DeviceTiming:
    """One device: its timing records (newest first) and its membership per its stored state."""

    device_id: str
    records: tuple[TimingRow, ...]
    #: Whether the domain has a stored state for the device; False: not seen by the domain.
    seen: bool = False
    #: The stored state's version (bumped by every transaction that changes it).
    version: int | None = None
    #: The newest valid fix time the domain has seen (µs since the epoch).
    newest_us: int | None = None
    #: The zones and circles it is inside, by id.
    inside: tuple[Inside, ...] = ()
    #: Why the stored state could not be read ("" when it could; ``inside`` is then empty).
    state_error: str = ""
    #: The oldest fix whose timing records a failed batch missed, waiting for the repair thread.
    missed_since: dt.datetime | None = None
    #: How many fixes wait for the repair.
    missed_fixes: int = 0

    @property
    def last_fix(self) -> dt.datetime | None:
        """:attr:`newest_us` as a UTC time."""
        if self.newest_us is None:
            return None
        return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=self.newest_us)

    def to_dict(self) -> dict[str, object]:
        last = self.last_fix
        return {
            "device_id": self.device_id,
            "seen": self.seen,
            "version": self.version,
            "last_fix": None if last is None else last.isoformat(),
            "newest_us": self.newest_us,
            "inside": [{"id": i.id, "name": i.name} for i in self.inside],
            "state_error": self.state_error or None,
            "missed_since": None if self.missed_since is None else self.missed_since.isoformat(),
            "missed_fixes": self.missed_fixes,
            "records": [r.to_dict() for r in self.records],
        }


def latest_records(
    settings: Settings,
    limit: int = DEFAULT_LIMIT,
    device: str | None = None,
    since: dt.datetime | None = None,
) -> list[TimingRow]:
    """The newest timing records (of ``device``, at or after ``since``), newest first.

    Raises :class:`~tpx.domainstage.tables.TablesMissing` when the CMS's tables are not there
    (or lack a column tpx needs), :class:`psycopg.Error` as usual.
    """
    with pg_connect(settings.database_url, PG_PURPOSE, autocommit=True) as conn:
        conn.execute(search_path(settings))
        tables = inspect_tables(conn, settings)
        return _records(conn, tables, limit, device, since)


def device_timing(
    settings: Settings, device: str, since: dt.datetime | None = None, limit: int = DEFAULT_LIMIT
) -> DeviceTiming:
    """One device's records (newest first) and its membership now, per its stored domain state.

    Raises as :func:`latest_records`, and :class:`~tpx.schema.SchemaBehind` when tpx's schema
    (which holds ``tpx_domain_devices``) awaits ``tpx migrate``.
    """
    with pg_connect(settings.database_url, PG_PURPOSE, autocommit=True) as conn:
        conn.execute(search_path(settings))
        tables = inspect_tables(conn, settings)
        require_current(conn, settings.db_schema)
        records = tuple(_records(conn, tables, limit, device, since))
        row = conn.execute(
            sql.SQL(DEVICE_SQL).format(schema=sql.Identifier(settings.db_schema)), {"d": device}
        ).fetchone()
        assert row is not None  # noqa: S101 (an aggregate: one row)
        version, stored, missed, waiting = row
        waiting = int(waiting)
        if version is None or version == 0:  # no row, or the lock's placeholder: never stored
            return DeviceTiming(device, records, missed_since=missed, missed_fixes=waiting)
        try:
            state = state_from_json(stored, device_id=device)
        except (ValueError, KeyError, TypeError) as exc:  # as the stage: it starts such a device afresh
            error = f"unreadable state: {exc}"
            marked = {"missed_since": missed, "missed_fixes": waiting}
            return DeviceTiming(device, records, True, int(version), state_error=error, **marked)
        ids = sorted(state.inside, key=repr)
        names = _names(conn, tables, ids)
    return DeviceTiming(
        device,
        records,
        seen=True,
        version=int(version),
        newest_us=state.newest_us,
        inside=tuple(Inside(gid, names.get(str(gid))) for gid in ids),
        missed_since=missed,
        missed_fixes=waiting,
    )


def _geofence_id(tables: CmsTables, column: sql.Composable) -> sql.Composable:
    """A geofence id as :mod:`tpx.domainstage.geofences` reads it: an int, or its text."""
    return column if tables.geofence_id_type in INTEGER_ID_TYPES else sql.SQL("{}::text").format(column)


def _records(
    conn: psycopg.Connection[Any],
    tables: CmsTables,
    limit: int,
    device: str | None,
    since: dt.datetime | None,
) -> list[TimingRow]:
    optional = [
        sql.SQL("t.{}").format(sql.Identifier(c)) if c in tables.timing_columns else sql.SQL("NULL")
        for c in OPTIONAL_COLUMNS
    ]
    where = [sql.SQL("TRUE")]
    if device is not None:
        where.append(sql.SQL("t.device_id = %(device)s"))
    if since is not None:
        where.append(sql.SQL("t.ts >= %(since)s"))
    query = sql.SQL(
        "SELECT t.id, t.device_id, {gid}, g.name, t.event, t.ts, t.latitude, t.longitude, {optional}"
        " FROM {timing} AS t LEFT JOIN {geofences} AS g ON g.id = t.geofence"
        " WHERE {where} ORDER BY t.ts DESC, t.id DESC LIMIT %(limit)s"
    ).format(
        gid=_geofence_id(tables, sql.SQL("t.geofence")),
        optional=sql.SQL(", ").join(optional),
        timing=tables.timing_ident(),
        geofences=tables.geofences_ident(),
        where=sql.SQL(" AND ").join(where),
    )
    rows = conn.execute(query, {"device": device, "since": since, "limit": limit}).fetchall()
    return [
        TimingRow(
            id=rid,
            device_id=str(device_id),
            geofence=gid,
            geofence_name=None if name is None else str(name),
            event=str(event),
            ts=ts.astimezone(dt.UTC),
            latitude=float(lat),
            longitude=float(lon),
            speed=_float(speed),
            direction=None if direction is None else int(direction),
            uncertainty_s=_float(uncertainty),
        )
        for rid, device_id, gid, name, event, ts, lat, lon, speed, direction, uncertainty in rows
    ]


def _names(conn: psycopg.Connection[Any], tables: CmsTables, ids: list[GeofenceId]) -> dict[str, str]:
    """Geofence names by id (as text) for ``ids``; a missing row is left out."""
    if not ids:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT id::text, name FROM {} WHERE id::text = ANY(%s::text[])").format(
            tables.geofences_ident()
        ),
        ([str(i) for i in ids],),
    ).fetchall()
    return {str(gid): str(name) for gid, name in rows}


def _float(value: float | Decimal | None) -> float | None:
    return None if value is None else float(value)

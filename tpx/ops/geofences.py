"""`tpx geofences`: every row of the CMS's geofences table, and whether tpx uses it (or why not).

The same reading and parsing as the running stage (:mod:`tpx.domainstage.geofences`), so what
this lists as ``invalid`` is what the stage skips, with the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from tpx.config import Settings
from tpx.connections import pg_connect, search_path
from tpx.domain import Invalid, parse_geofence
from tpx.domainstage.geofences import Row, geofence_rows
from tpx.domainstage.tables import inspect_tables

#: ``application_name`` of the connection (``pg_stat_activity``).
PG_PURPOSE = "tpx-geofences"

Status: TypeAlias = Literal["loaded", "inactive", "invalid"]


@dataclass(frozen=True, slots=True)
class GeofenceStatus:
    """One geofence row: ``loaded`` (in use), ``inactive`` (valid, switched off) or ``invalid``
    (skipped whether active or not; ``reason`` says why)."""

    id: int | str | None
    name: str
    kind: str
    active: bool
    status: Status
    reason: str = ""


def list_geofences(settings: Settings) -> list[GeofenceStatus]:
    """Every geofence, by id. Raises :class:`~tpx.domainstage.tables.TablesMissing` when the
    CMS's tables are not there (or lack a column tpx needs), :class:`psycopg.Error` as usual."""
    with pg_connect(settings.database_url, PG_PURPOSE, autocommit=True) as conn:
        conn.execute(search_path(settings))
        tables = inspect_tables(conn, settings)
        rows = geofence_rows(conn, tables)
    return [_status(row) for row in rows]


def _status(row: Row) -> GeofenceStatus:
    gid, name, kind, active = row["id"], row["name"], row["kind"], row["active"]
    parsed = parse_geofence(row)
    if isinstance(parsed, Invalid):
        status: Status = "invalid"
        reason = parsed.reason
    else:
        status, reason = ("loaded" if parsed.active else "inactive"), ""
    return GeofenceStatus(
        id=gid if isinstance(gid, int | str) else None,
        name="" if name is None else str(name),
        kind="" if kind is None else str(kind),
        active=True if active is None else bool(active),
        status=status,
        reason=reason,
    )

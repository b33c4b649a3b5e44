"""Geofences from the CMS's table: read in one SELECT, parsed, and reloaded when they change.

:func:`geofence_rows` reads every row (inactive ones too: :class:`~tpx.domain.GeofenceSet` keeps
the active ones, ``tpx geofences`` lists them all) with the geometry as GeoJSON text, whichever
way it is stored; :func:`load_geofences` parses them. :class:`GeofenceSource` holds the current
set for the stage and reloads it every ``TPX_GEOFENCES_RELOAD_S`` or when asked: a bad row is an
:class:`~tpx.domain.Invalid` to log once, a database error a line in the log, and neither ever
takes the current set away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Any, TypeAlias

import psycopg
from psycopg import sql

from tpx.config import mask_url
from tpx.domain import GeofenceSet
from tpx.domainstage.tables import CmsTables
from tpx.errors import first_line

log = logging.getLogger(__name__)

#: A row as :func:`tpx.domain.parse_geofence` reads it.
Row: TypeAlias = dict[str, object]
#: Gives a connection with tpx's search_path for one load, and takes it back (a pool's
#: ``connection``, or a function around :func:`tpx.connections.pg_connect`).
Connect: TypeAlias = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]

#: The columns of a row, in the order the SELECT reads them.
ROW_FIELDS = ("id", "name", "kind", "geometry", "radius_m", "exit_margin_m", "active", "date_updated")
#: ``geofences.id`` types read as Python ints; any other (uuid...) is read as its text.
INTEGER_ID_TYPES = frozenset({"smallint", "integer", "bigint"})
#: Columns that may be numeric (psycopg: Decimal), which the parser wants as floats.
METRE_FIELDS = ("radius_m", "exit_margin_m")


def _select(tables: CmsTables) -> sql.Composed:
    geometry = sql.Identifier("geometry")
    gid = sql.Identifier("id")
    has = tables.geofence_columns
    return sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
        sql.SQL(", ").join(
            [
                gid if tables.geofence_id_type in INTEGER_ID_TYPES else sql.SQL("{}::text").format(gid),
                sql.Identifier("name"),
                sql.Identifier("kind"),
                sql.SQL("ST_AsGeoJSON({})" if tables.geometry == "postgis" else "{}::text").format(geometry),
                sql.Identifier("radius_m"),
                sql.Identifier("exit_margin_m") if "exit_margin_m" in has else sql.SQL("0"),
                sql.Identifier("active"),
                sql.Identifier("date_updated") if "date_updated" in has else sql.SQL("NULL::timestamptz"),
            ]
        ),
        tables.geofences_ident(),
        gid,
    )


def geofence_rows(conn: psycopg.Connection[Any], tables: CmsTables) -> list[Row]:
    """Every row of the geofences table, by id, geometry as GeoJSON text, numbers as floats."""
    rows = conn.execute(_select(tables)).fetchall()
    out = []
    for values in rows:
        row: Row = dict(zip(ROW_FIELDS, values, strict=True))
        for name in METRE_FIELDS:
            value = row[name]
            if isinstance(value, Decimal):
                row[name] = float(value)
        out.append(row)
    return out


def load_geofences(conn: psycopg.Connection[Any], tables: CmsTables) -> GeofenceSet:
    """All the geofences, parsed: the active valid ones indexed, the invalid ones with why."""
    return GeofenceSet.from_rows(geofence_rows(conn, tables))


class GeofenceSource:
    """The current :class:`GeofenceSet` for the stage's threads, reloaded when due.

    :meth:`load` once at start-up (a database error raises: there is no set to keep yet); then
    :meth:`maybe_reload` from any thread, cheap when nothing is due. A reload is due
    ``reload_s`` after the last attempt, or at once after :meth:`request_reload` (a control
    message). One thread reloads; the others meanwhile get the current set without waiting.
    Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, connect: Connect, tables: CmsTables, reload_s: float) -> None:
        self.connect = connect
        self.tables = tables
        self.reload_s = reload_s
        self._current: GeofenceSet | None = None
        self._rows: list[Row] | None = None
        self._attempted_at = float("-inf")
        self._requested = threading.Event()
        self._lock = threading.Lock()
        #: The invalid geofences already logged: id -> reason (logged again if the reason changes).
        self._warned: dict[object, str] = {}
        #: Reloads that failed (a database error), for the metrics.
        self.failed_reloads = 0
        #: When the last read that succeeded started (``time.monotonic()``): the current set is
        #: the table as it was then, or newer.
        self.read_at = float("-inf")

    @property
    def current(self) -> GeofenceSet:
        if self._current is None:
            raise RuntimeError("geofences not loaded yet: call load() first")
        return self._current

    def request_reload(self) -> None:
        """Reload at the next :meth:`maybe_reload`, whenever the last one was (thread-safe)."""
        self._requested.set()

    def load(self, now: float | None = None) -> GeofenceSet:
        """Read the table now (raises :class:`psycopg.Error` when the database fails)."""
        with self._lock:
            return self._load(time.monotonic() if now is None else now)

    def maybe_reload(self, now: float) -> GeofenceSet:
        """The current set, reloaded first if due; a failed reload keeps it (logged, never raised)."""
        if self._current is not None and not self._due(now):
            return self._current
        if self._current is None:  # nothing to hand out meanwhile: wait for the first load
            self._lock.acquire()
        elif not self._lock.acquire(blocking=False):
            return self._current  # another thread is reloading
        try:
            current = self._current
            if current is not None and not self._due(now):  # it reloaded while we looked
                return current
            try:
                return self._load(now)
            except psycopg.Error as exc:
                if current is None:
                    raise
                self.failed_reloads += 1
                log.warning(
                    "geofences: reload failed, keeping the %d loaded (generation %s): %s",
                    len(current),
                    current.generation,
                    mask_url(first_line(exc)),
                )
                return current
        finally:
            self._lock.release()

    def _due(self, now: float) -> bool:
        return self._requested.is_set() or now - self._attempted_at >= self.reload_s

    def _load(self, now: float) -> GeofenceSet:
        # cleared before reading: a request arriving during the read is served by the next reload
        self._requested.clear()
        self._attempted_at = now
        with self.connect() as conn:
            rows = geofence_rows(conn, self.tables)
        if self._current is not None and rows == self._rows:
            self.read_at = now
            return self._current  # unchanged: no parsing, no index to rebuild
        loaded = GeofenceSet.from_rows(rows)
        previous, self._current, self._rows = self._current, loaded, rows
        self.read_at = now
        if previous is None or previous.generation != loaded.generation:
            log.info(
                "geofences: %d loaded, %d invalid (generation %s)",
                len(loaded),
                len(loaded.invalid),
                loaded.generation,
            )
        for bad in loaded.invalid:
            if self._warned.get(bad.id) != bad.reason:
                log.warning("geofence %s is invalid, skipped: %s", bad.id, bad.reason)
        self._warned = {bad.id: bad.reason for bad in loaded.invalid}
        return loaded

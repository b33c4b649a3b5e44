"""The CMS's two tables as this database has them: found, checked and described once, at start-up.

Directus owns ``geofences`` and ``timing_records`` (issue 16): tpx never creates or alters them,
so before using them it checks that they exist and have the columns it reads and writes, and
records what varies between deployments: how ``geofences.geometry`` is stored (a PostGIS
``geometry`` column, or json/jsonb GeoJSON where the database has no PostGIS), the type of
``geofences.id`` (integer or uuid), and which optional ``timing_records`` columns exist.

Names are resolved with ``to_regclass`` on the caller's connection, whose ``search_path`` is
tpx's schema, then ``public`` (:func:`tpx.connections.search_path`): an unqualified name is
looked for there, a ``schema.table`` name exactly there. The same names, quoted the same way
(:meth:`CmsTables.geofences_ident`), are then used in every statement on such a connection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import psycopg
from psycopg import sql

from tpx.config import Settings, env_name

GeometryStorage: TypeAlias = Literal["postgis", "json"]

#: What tpx reads from geofences; ``exit_margin_m`` (default 0) and ``date_updated`` may be absent.
GEOFENCE_REQUIRED = ("id", "name", "kind", "geometry", "radius_m", "active")
GEOFENCE_OPTIONAL = ("exit_margin_m", "date_updated")
#: What tpx writes into timing_records; it fills the optional ones where the table has them.
TIMING_REQUIRED = ("id", "device_id", "geofence", "event", "ts", "latitude", "longitude")
TIMING_OPTIONAL = ("speed", "direction", "uncertainty_s", "date_created")

#: ``pg_class.relkind`` of what tpx can read geofences from, and insert timing records into.
READABLE_KINDS = frozenset("rpvmf")
WRITABLE_KINDS = frozenset("rpvf")
RELKIND_NAMES = {
    "r": "a table",
    "p": "a partitioned table",
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "i": "an index",
    "I": "a partitioned index",
    "S": "a sequence",
    "c": "a composite type",
    "t": "a TOAST table",
}
#: GeoJSON is longitude/latitude on WGS84: a PostGIS column with another SRID is not.
GEOJSON_SRID = 4326
_SRID_RE = re.compile(r",\s*(\d+)\)$")


class TablesMissing(Exception):  # noqa: N818 (the stage and the CLI catch it by this name)
    """A CMS table or one of its columns is missing or unusable: one line naming exactly what."""


def _ident(name: str) -> sql.Identifier:
    schema, dot, table = name.partition(".")
    return sql.Identifier(schema, table) if dot else sql.Identifier(name)


@dataclass(frozen=True, slots=True)
class CmsTables:
    """The two tables as found: their names (as configured) and what varies between deployments."""

    #: ``TPX_GEOFENCES_TABLE`` / ``TPX_TIMING_TABLE``, as configured (``table`` or ``schema.table``).
    geofences: str
    timing: str
    #: How ``geofences.geometry`` is stored: a PostGIS geometry column, or json/jsonb GeoJSON.
    geometry: GeometryStorage
    #: The columns ``timing_records`` has (the required ones and those optional ones it has).
    timing_columns: frozenset[str]
    #: The type of ``geofences.id`` as PostgreSQL names it (``integer``, ``uuid``...).
    geofence_id_type: str
    #: The columns ``geofences`` has (default: all that tpx reads, required and optional).
    geofence_columns: frozenset[str] = frozenset(GEOFENCE_REQUIRED + GEOFENCE_OPTIONAL)

    def geofences_ident(self) -> sql.Identifier:
        """The geofences table, quoted (``"schema"."table"`` or ``"table"``)."""
        return _ident(self.geofences)

    def timing_ident(self) -> sql.Identifier:
        """The timing records table, quoted."""
        return _ident(self.timing)


@dataclass(frozen=True, slots=True)
class _Column:
    type_name: str  # pg_type.typname: geometry, jsonb, int4...
    formatted: str  # format_type(): geometry(Geometry,4326), integer, character varying(255)...


def _columns(
    conn: psycopg.Connection[Any], name: str, setting: str, kinds: frozenset[str]
) -> dict[str, _Column]:
    quoted = _ident(name).as_string(conn)
    found = conn.execute(
        "SELECT c.oid, c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)", (quoted,)
    ).fetchone()
    if found is None:
        raise TablesMissing(f"table {name} not found ({env_name(setting)})")
    oid, relkind = found
    if relkind not in kinds:
        what = RELKIND_NAMES.get(relkind, f"a relation of kind {relkind!r}")
        raise TablesMissing(f"{name} is {what}, not a table ({env_name(setting)})")
    rows = conn.execute(
        "SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (oid,),
    ).fetchall()
    return {str(col): _Column(str(typname), str(formatted)) for col, typname, formatted in rows}


def _require(name: str, columns: dict[str, _Column], required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        noun = "column" if len(missing) == 1 else "columns"
        raise TablesMissing(f"{name} has no {noun} {', '.join(missing)}")


def _geometry_storage(name: str, column: _Column) -> GeometryStorage:
    if column.type_name in ("json", "jsonb"):
        return "json"
    if column.type_name == "geometry":
        srid = _SRID_RE.search(column.formatted)
        if srid is not None and int(srid.group(1)) != GEOJSON_SRID:
            raise TablesMissing(
                f"{name}.geometry is {column.formatted}: expected SRID {GEOJSON_SRID} (longitude/latitude)"
            )
        return "postgis"
    raise TablesMissing(f"{name}.geometry is {column.formatted}: expected a PostGIS geometry or json/jsonb")


#: What tpx does to timing records: reads (a cold device's newest), inserts, updates (an upsert of
#: a record a late fix moved) and deletes (a record a late fix withdrew).
TIMING_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


def _check_types(name: str, timing: dict[str, _Column], geofence_id: _Column) -> None:
    """The columns whose type tpx relies on: a uuid id it derives, a timestamptz time, a
    geofence reference of the geofences' id type (else every batch's insert would fail)."""
    expected = {"id": ("uuid",), "ts": ("timestamptz",)}
    for column, types in expected.items():
        if timing[column].type_name not in types:
            raise TablesMissing(
                f"{name}.{column} is {timing[column].formatted}: expected {' or '.join(types)}"
            )
    if timing["geofence"].type_name != geofence_id.type_name:
        raise TablesMissing(
            f"{name}.geofence is {timing['geofence'].formatted}: expected {geofence_id.formatted}, "
            "the type of the geofences' id"
        )


def _check_privileges(conn: psycopg.Connection[Any], name: str, privileges: tuple[str, ...]) -> None:
    quoted = _ident(name).as_string(conn)
    missing = []
    for privilege in privileges:
        row = conn.execute("SELECT has_table_privilege(%s, %s)", (quoted, privilege)).fetchone()
        if row is None or not row[0]:
            missing.append(privilege)
    if missing:
        raise TablesMissing(
            f"tpx's role may not {', '.join(missing)} on {name} (GRANT it, or TPX_DOMAIN=off)"
        )


def inspect_tables(conn: psycopg.Connection[Any], settings: Settings) -> CmsTables:
    """Find and check both tables on ``conn`` (tpx's search_path); raises :class:`TablesMissing`.

    Reads the catalogue only; the caller owns the connection and its transaction.
    """
    geofences = _columns(conn, settings.geofences_table, "geofences_table", READABLE_KINDS)
    _require(settings.geofences_table, geofences, GEOFENCE_REQUIRED)
    storage = _geometry_storage(settings.geofences_table, geofences["geometry"])
    timing = _columns(conn, settings.timing_table, "timing_table", WRITABLE_KINDS)
    _require(settings.timing_table, timing, TIMING_REQUIRED)
    _check_types(settings.timing_table, timing, geofences["id"])
    _check_privileges(conn, settings.geofences_table, ("SELECT",))
    _check_privileges(conn, settings.timing_table, TIMING_PRIVILEGES)
    return CmsTables(
        geofences=settings.geofences_table,
        timing=settings.timing_table,
        geometry=storage,
        timing_columns=frozenset(c for c in TIMING_REQUIRED + TIMING_OPTIONAL if c in timing),
        geofence_id_type=geofences["id"].formatted,
        geofence_columns=frozenset(c for c in GEOFENCE_REQUIRED + GEOFENCE_OPTIONAL if c in geofences),
    )


def decide(conn: psycopg.Connection[Any], settings: Settings) -> tuple[CmsTables | None, str]:
    """Whether the domain runs, per ``TPX_DOMAIN``, and the start-up log line that says why.

    ``off``: never. ``auto``: when both tables check out, else off, naming what is missing.
    ``on``: the tables must check out, else :class:`TablesMissing` (the caller exits 2).
    """
    if settings.domain == "off":
        return None, "domain off (TPX_DOMAIN=off)"
    try:
        tables = inspect_tables(conn, settings)
    except TablesMissing as exc:
        if settings.domain == "on":
            raise
        return None, f"domain off: {exc}; set TPX_DOMAIN=on to require it"
    return tables, describe(tables)


def describe(tables: CmsTables) -> str:
    """One line: what the domain reads and writes."""
    storage = "PostGIS geometry" if tables.geometry == "postgis" else "GeoJSON in json"
    return (
        f"domain on: geofences from {tables.geofences} ({storage}, id {tables.geofence_id_type}), "
        f"timing records to {tables.timing}"
    )

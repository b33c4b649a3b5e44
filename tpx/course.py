"""The demo's course: the CMS's two tables in the demo's own database, and a few geofences on them.

`tpx demo` on its embedded PostgreSQL creates ``geofences`` and ``timing_records`` from
``deploy/directus/no-postgis.sql`` (the Directus columns, GeoJSON in jsonb: the embedded server
has no PostGIS; the wheel carries the file as ``tpx/cms/no-postgis.sql``, as it carries ``sql/``
as ``tpx/sql``) and puts a small course in :data:`AREA`, where the demo's fleet drives
(:class:`tpx.fleet.Area`): a depot and a customer site (zones), a gate across the main road and
a fuel station (a circle). With 200 devices wandering 1.2 km around the depot at 0-160 km/h,
timing records arrive within seconds and keep arriving (about two a second).

Never run against a configured database: those tables belong to the CMS (issue 16). There the
demo's domain runs only if the tables already exist (``TPX_DOMAIN=auto``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from psycopg import sql

from tpx.config import Settings
from tpx.connections import pg_connect
from tpx.fleet import Area

#: Where the demo's fleet drives and its course lies (Vilnius, where the tests' fixes are too).
AREA = Area(lat=54.6872, lon=25.2797, radius_m=1200)
#: The DDL, as the wheel carries it (``pyproject.toml``: force-include) and as a checkout has it.
PACKAGED_DDL = "cms/no-postgis.sql"
CHECKOUT_DDL = Path(__file__).resolve().parent.parent / "deploy" / "directus" / "no-postgis.sql"
#: GeoJSON coordinates to this many decimals (1e-7 degree: about a centimetre).
DECIMALS = 7


@dataclass(frozen=True)
class CourseGeofence:
    """One geofence row, as the CMS holds it (geometry: GeoJSON, longitude first)."""

    id: int
    name: str
    kind: str
    geometry: dict[str, Any]
    radius_m: float | None = None
    exit_margin_m: float = 0.0


def _point(east_m: float, north_m: float) -> list[float]:
    lat, lon = AREA.at(east_m, north_m)
    return [round(lon, DECIMALS), round(lat, DECIMALS)]


def _box(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    """A rectangle (metres from the centre), as a GeoJSON Polygon with a closed ring."""
    ring = [(west, south), (east, south), (east, north), (west, north), (west, south)]
    return {"type": "Polygon", "coordinates": [[_point(x, y) for x, y in ring]]}


#: The course, in metres east and north of :data:`AREA`'s centre (the devices start all over it).
COURSE: tuple[CourseGeofence, ...] = (
    CourseGeofence(1, "Depot", "zone", _box(-150, -100, 150, 100), exit_margin_m=10),
    CourseGeofence(2, "Customer site", "zone", _box(450, 250, 750, 550), exit_margin_m=10),
    CourseGeofence(
        3,
        "Main road gate",
        "gate",
        {"type": "LineString", "coordinates": [_point(-450, -1100), _point(-450, 1100)]},
    ),
    CourseGeofence(4, "Fuel station", "circle", {"type": "Point", "coordinates": _point(-150, 650)}, 120, 10),
)

UPSERT_SQL = """
INSERT INTO geofences (id, name, kind, geometry, radius_m, exit_margin_m, active)
VALUES (%s, %s, %s, %s, %s, %s, true)
ON CONFLICT (id) DO UPDATE
SET name = EXCLUDED.name, kind = EXCLUDED.kind, geometry = EXCLUDED.geometry,
    radius_m = EXCLUDED.radius_m, exit_margin_m = EXCLUDED.exit_margin_m, active = true,
    date_updated = now()
WHERE (geofences.name, geofences.kind, geofences.geometry, geofences.radius_m,
       geofences.exit_margin_m, geofences.active)
  IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.kind, EXCLUDED.geometry, EXCLUDED.radius_m,
       EXCLUDED.exit_margin_m, true)
"""
#: Rows added later by hand (``INSERT`` without an id) must not collide with the course's ids.
SEQUENCE_SQL = "SELECT setval(pg_get_serial_sequence('geofences', 'id'), (SELECT max(id) FROM geofences))"


def cms_ddl() -> str:
    """The CMS tables' DDL without PostGIS (idempotent), from the wheel or the checkout."""
    packaged = resources.files("tpx").joinpath(PACKAGED_DDL)
    if packaged.is_file():
        return packaged.read_text()
    return CHECKOUT_DDL.read_text()


def create_course(settings: Settings) -> int:
    """The CMS tables in ``settings.db_schema`` (created when absent) with :data:`COURSE` in them
    (restored where edited); returns how many geofences the course has. For the demo's own
    database only."""
    with pg_connect(settings.database_url, "tpx-demo-course") as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.db_schema)))
        conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(settings.db_schema)))
        conn.execute(cms_ddl())
        for g in COURSE:
            conn.execute(
                UPSERT_SQL,
                (g.id, g.name, g.kind, json.dumps(g.geometry), g.radius_m, g.exit_margin_m),
            )
        conn.execute(SEQUENCE_SQL)
    return len(COURSE)

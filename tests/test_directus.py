"""deploy/directus/: the schema snapshot on a real Directus 11 + PostGIS, and the no-PostGIS DDL.

The `directus` fixture (tests/conftest.py) bootstraps Directus into a fresh PostGIS database and
applies the committed snapshot with ``directus schema apply --yes``; these tests check what that
created in PostgreSQL, and that rows cross between Directus's REST API and SQL intact.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from tests.directus import NO_POSTGIS_DDL, Directus, fresh_database

#: The first test here also pays for the session's Directus (bootstrap, schema apply, start):
#: ~11 s on an idle machine, ~55 s measured with other sessions loading both cores.
pytestmark = pytest.mark.timeout(300)

#: What issue 16 says Directus 11 creates on PostgreSQL: column -> (type, NOT NULL, default).
GEOFENCES = {
    "id": ("integer", True, "nextval('geofences_id_seq'::regclass)"),
    "name": ("character varying(255)", True, None),
    "kind": ("character varying(255)", True, None),
    "geometry": ("geometry(Geometry,4326)", True, None),
    "radius_m": ("real", False, None),
    "exit_margin_m": ("real", True, "'0'::real"),
    "active": ("boolean", True, "true"),
    "date_updated": ("timestamp with time zone", False, None),
}
TIMING_RECORDS = {
    "id": ("uuid", True, None),  # no default: tpx fills it
    "device_id": ("character varying(255)", True, None),
    "event": ("character varying(255)", True, None),
    "ts": ("timestamp with time zone", True, None),
    # Not Directus `float` (PostgreSQL real, 24 bits: ~1e-5 degree at 180): exact to 1e-7 degree.
    "latitude": ("numeric(10,7)", True, None),
    "longitude": ("numeric(10,7)", True, None),
    "speed": ("real", False, None),
    "direction": ("integer", False, None),
    "uncertainty_s": ("real", False, None),
    "date_created": ("timestamp with time zone", False, None),
    "geofence": ("integer", True, None),
}

COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
FOREIGN_KEYS_SQL = """
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
WHERE conrelid = 'timing_records'::regclass AND contype = 'f'
"""


def columns(conn: psycopg.Connection[Any], table: str) -> dict[str, tuple[str, bool, str | None]]:
    """column -> (type, NOT NULL, default); Directus's ``DEFAULT NULL::<type>`` counts as no default."""
    return {
        name: (typ, notnull, None if default and default.startswith("NULL::") else default)
        for name, typ, notnull, default in conn.execute(COLUMNS_SQL, (table,))
    }


def foreign_keys(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return dict(conn.execute(FOREIGN_KEYS_SQL).fetchall())


SQUARE = {
    "type": "Polygon",
    # lon, lat; 1e-7 degree digits so a swapped or rounded axis shows.
    "coordinates": [
        [[7.6861234, 45.0701234], [7.6871234, 45.0701234], [7.6871234, 45.0711234], [7.6861234, 45.0701234]]
    ],
}


@pytest.mark.slow
def test_snapshot_applies_with_the_column_types_of_the_issue(directus: Directus) -> None:
    with psycopg.connect(directus.db_url) as conn:
        assert columns(conn, "geofences") == GEOFENCES
        assert columns(conn, "timing_records") == TIMING_RECORDS
        assert foreign_keys(conn) == {
            "timing_records_geofence_foreign": (
                "FOREIGN KEY (geofence) REFERENCES geofences(id) ON DELETE RESTRICT"
            )
        }


@pytest.mark.slow
def test_geofence_posted_through_rest_reads_back_from_postgis_lon_lat(directus: Directus) -> None:
    name = f"square-{uuid.uuid4().hex[:8]}"
    created = directus.post("geofences", {"name": name, "kind": "zone", "geometry": SQUARE})
    assert created["active"] is True
    assert created["exit_margin_m"] == 0

    with psycopg.connect(directus.db_url) as conn:
        row = conn.execute(
            "SELECT ST_AsGeoJSON(geometry), ST_SRID(geometry), active, date_updated"
            " FROM geofences WHERE id = %s",
            (created["id"],),
        ).fetchone()
    assert row is not None
    geojson, srid, active, date_updated = row
    assert json.loads(geojson) == SQUARE
    assert (srid, active, date_updated) == (4326, True, None)


@pytest.mark.slow
def test_geofence_kind_outside_the_choices_is_refused_by_directus(directus: Directus) -> None:
    with pytest.raises(AssertionError, match="HTTP 400") as refused:
        directus.post("geofences", {"name": "bad", "kind": "square", "geometry": SQUARE})
    assert "FAILED_VALIDATION" in str(refused.value)


@pytest.mark.slow
def test_timing_record_inserted_in_sql_reads_back_through_rest(directus: Directus) -> None:
    device = f"dev-{uuid.uuid4().hex[:8]}"
    fence = directus.post(
        "geofences",
        {
            "name": device,
            "kind": "gate",
            "geometry": {"type": "LineString", "coordinates": [[7.0, 45.0], [7.001, 45.0]]},
        },
    )
    record_id = uuid.uuid4()
    ts = dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)
    with psycopg.connect(directus.db_url) as conn:
        conn.execute(
            "INSERT INTO timing_records (id, device_id, geofence, event, ts, latitude, longitude, speed,"
            " direction, uncertainty_s, date_created)"
            " VALUES (%s, %s, %s, 'cross', %s, %s, %s, 42.5, -1, 1.5, now())",
            (record_id, device, fence["id"], ts, 45.0000001, 7.0005432),
        )

    [item] = directus.items("timing_records", device_id=device)
    assert item["id"] == str(record_id)
    assert item["geofence"] == fence["id"]
    assert (item["event"], item["direction"], item["speed"], item["uncertainty_s"]) == (
        "cross",
        -1,
        42.5,
        1.5,
    )
    assert dt.datetime.fromisoformat(item["ts"]) == ts
    # Directus returns decimals as strings, digit for digit: the 1e-7 degree survives.
    assert (Decimal(item["latitude"]), Decimal(item["longitude"])) == (
        Decimal("45.0000001"),
        Decimal("7.0005432"),
    )


@pytest.mark.slow
def test_timing_record_for_an_unknown_geofence_is_refused_by_the_foreign_key(directus: Directus) -> None:
    with psycopg.connect(directus.db_url) as conn, pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "INSERT INTO timing_records (id, device_id, geofence, event, ts, latitude, longitude)"
            " VALUES (%s, 'dev', -1, 'enter', now(), 0, 0)",
            (uuid.uuid4(),),
        )


@pytest.mark.slow
def test_no_postgis_ddl_matches_the_snapshot_but_geometry_is_jsonb(
    directus: Directus, pg_server_url: str
) -> None:
    with fresh_database(pg_server_url, postgis=False) as url, psycopg.connect(url) as conn:
        conn.execute(NO_POSTGIS_DDL.read_text())
        assert columns(conn, "geofences") == {**GEOFENCES, "geometry": ("jsonb", True, None)}
        assert columns(conn, "timing_records") == TIMING_RECORDS
    with psycopg.connect(directus.db_url) as conn:
        indexes = {
            r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'timing_records'")
        }
    assert {"timing_records_device_id_index", "timing_records_ts_index"} <= indexes
    with fresh_database(pg_server_url, postgis=False) as url, psycopg.connect(url) as conn:
        conn.execute(NO_POSTGIS_DDL.read_text())
        plain = {
            r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'timing_records'")
        }
    assert {"timing_records_device_id_index", "timing_records_ts_index"} <= plain


def test_no_postgis_ddl_applies_twice_on_a_plain_server_and_keeps_geojson(pg_server_url: str) -> None:
    with fresh_database(pg_server_url, postgis=False) as url, psycopg.connect(url) as conn:
        conn.execute(NO_POSTGIS_DDL.read_text())
        conn.execute(NO_POSTGIS_DDL.read_text())  # idempotent
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'postgis'").fetchone() == (0,)
        [(fence_id, active, margin)] = conn.execute(
            "INSERT INTO geofences (name, kind, geometry) VALUES ('sq', 'zone', %s)"
            " RETURNING id, active, exit_margin_m",
            (json.dumps(SQUARE),),
        ).fetchall()
        conn.execute(
            "INSERT INTO timing_records (id, device_id, geofence, event, ts, latitude, longitude)"
            " VALUES (%s, 'dev', %s, 'enter', now(), 45.0701234, 7.6861234)",
            (uuid.uuid4(), fence_id),
        )
        assert (active, margin) == (True, 0)
        assert conn.execute("SELECT geometry FROM geofences WHERE id = %s", (fence_id,)).fetchone() == (
            SQUARE,
        )
        assert conn.execute("SELECT latitude, longitude FROM timing_records").fetchone() == (
            Decimal("45.0701234"),
            Decimal("7.6861234"),
        )

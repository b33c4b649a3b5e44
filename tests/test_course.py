"""The demo's course (tpx/course.py) and the fleet that drives it: valid geofences, placed where the
fleet drives, so a minute of the demo's traffic gives every kind of timing record; a fleet
without an area is the one it always was."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import asdict

import psycopg
from psycopg import sql

from tpx.config import Settings
from tpx.course import AREA, COURSE, cms_ddl, create_course
from tpx.domain import Fix, GeofenceSet, replay
from tpx.fleet import Fleet
from tpx.simulate import paced_interval_ms

#: sha256 of the JSON of the first 2,000 entries of Fleet(devices=20, seed=5, ...) below, as the
#: fleet made them before it had areas: the benchmarks' and tests' fleets must not change.
UNCHANGED_FLEET = "3c9ebf4f22d01ae443be90c83647d829f5269575a49420a94d7f1d01a77c0b83"


def demo_fleet(seed: int, devices: int = 200) -> Fleet:
    """The fleet `tpx demo` runs by default: 200 devices at 1,000 records/s (a fix every 200 ms
    each), in the course's area."""
    return Fleet(
        devices=devices,
        seed=seed,
        start_ms=1_796_000_000_000,
        interval_ms=paced_interval_ms(200, 1000),
        area=AREA,
    )


def test_a_fleet_without_an_area_is_unchanged() -> None:
    fleet = Fleet(
        devices=20,
        seed=5,
        start_ms=1_700_000_000_000,
        duplicate_fraction=0.05,
        late_fraction=0.05,
        poison_fraction=0.05,
    )
    digest = hashlib.sha256(json.dumps(list(fleet.entries(2000))).encode()).hexdigest()
    assert digest == UNCHANGED_FLEET


def test_the_demo_fleet_stays_in_its_area() -> None:
    fleet = demo_fleet(seed=3, devices=20)
    farthest = 0.0
    for entry in fleet.entries(20 * 300 * 5):  # five minutes of driving each
        r = json.loads(entry["record"])
        if r["satellites"]:
            east, north = AREA.offset(r["lat"], r["lon"])
            farthest = max(farthest, math.hypot(east, north))
    # outside the area a device turns back at once: out by at most a few steps at 160 km/h
    assert AREA.radius_m * 0.9 < farthest < AREA.radius_m + 150, farthest


def test_a_minute_of_the_demo_drives_the_whole_course() -> None:
    geofences = GeofenceSet.from_rows([{**asdict(g), "active": True} for g in COURSE])
    assert len(geofences) == len(COURSE) and not geofences.invalid
    tracks: dict[str, list[Fix]] = {}
    for entry in demo_fleet(seed=1).entries(200 * 300):  # 60 s: each device every 200 ms
        r = json.loads(entry["record"])
        fix = Fix(r["ts"] * 1000, r["lat"], r["lon"], r["satellites"] > 0, r["speed"])
        tracks.setdefault(entry["device_id"], []).append(fix)
    events = [e for device, fixes in tracks.items() for e in replay(device, geofences, fixes)]
    kinds = Counter((int(e.geofence), e.event) for e in events)
    want = {(1, "enter"), (1, "exit"), (2, "enter"), (2, "exit"), (3, "cross"), (4, "enter"), (4, "exit")}
    assert set(kinds) == want, kinds
    assert len(events) > 100, kinds  # about two a second, from the first seconds
    first_s = (min(e.ts_ms for e in events) - 1_796_000_000_000) / 1000
    assert first_s < 10


def test_create_course_is_idempotent_and_restores_an_edit(settings: Settings) -> None:
    assert "CREATE TABLE IF NOT EXISTS geofences" in cms_ddl()
    create_course(settings)
    table = sql.Identifier(settings.db_schema, "geofences")
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET name = 'edited', active = false WHERE id = 1").format(table))
    create_course(settings)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        rows = conn.execute(sql.SQL("SELECT id, name, active FROM {} ORDER BY id").format(table)).fetchall()
        # a geofence added by hand gets the next id, not one of the course's
        added = conn.execute(
            sql.SQL(
                "INSERT INTO {} (name, kind, geometry) VALUES ('mine', 'gate', '{{}}') RETURNING id"
            ).format(table)
        ).fetchone()
    assert rows == [(g.id, g.name, True) for g in COURSE]
    assert added is not None and added[0] == len(COURSE) + 1

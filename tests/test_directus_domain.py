"""The domain stage end to end through a real Directus 11: geofences created and edited through
its REST API (PostGIS geometry), fixes through a real `tpx serve`, timing records read back
through the REST API and compared with `tpx.domain.replay` of the same fixes and geofences.

The `directus` fixture is session-scoped and shared: each test drives its own course, kilometres
from the others' geofences (and from tests/test_directus.py's), with its own device ids, and
`tpx serve` gets a tpx schema of its own in the Directus database (positions, its domain state);
the CMS tables are Directus's, in ``public``, which tpx's search_path reaches after its schema.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from tests.directus import Directus
from tests.helpers import Serve, add_entries, drained, record, row_count, wait_for
from tpx.config import Settings
from tpx.domain import Event, Fix, GeofenceSet, replay
from tpx.domain.shapes import Frame

#: The first Directus test of a session also pays for the shared Directus (~25-55 s).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Fix times start an hour back, well inside TPX_LATE_WINDOW and clear of the future limit.
T0_MS = int(time.time() * 1000) - 3_600_000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Directus returns numeric(10,7) as strings with 7 decimals: replay's floats round to within this.
DEGREE_TOLERANCE = 1e-7
#: Seconds between a device's fixes on the courses below.
STEP_S = 5


class Course:
    """Positions in metres (east, north) around an origin, as GeoJSON lon/lat with 7 decimals.

    Seven decimals survive PostGIS (``ST_AsGeoJSON`` writes up to 9) and Directus's GeoJSON
    unchanged, so tpx and the replay here read the very same coordinates.
    """

    def __init__(self, lon: float, lat: float) -> None:
        self.frame = Frame.at(lon, lat)

    def at(self, east_m: float, north_m: float) -> list[float]:
        f = self.frame
        return [round(f.lon0 + east_m / f.kx, 7), round(f.lat0 + north_m / f.ky, 7)]

    def square(self, x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
        ring = [self.at(x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
        return {"type": "Polygon", "coordinates": [ring]}

    def line(self, a: tuple[float, float], b: tuple[float, float]) -> dict[str, Any]:
        return {"type": "LineString", "coordinates": [self.at(*a), self.at(*b)]}

    def point(self, x: float, y: float) -> dict[str, Any]:
        return {"type": "Point", "coordinates": self.at(x, y)}

    def fix(self, t_s: float, east_m: float, north_m: float, speed: float = 36.0) -> Fix:
        lon, lat = self.at(east_m, north_m)
        return Fix((T0_MS + round(t_s * 1000)) * 1000, lat, lon, True, speed)


def drive(
    course: Course, x0: float, x1: float, t0_s: float = 0.0, speed_mps: float = 10.0, wiggle_m: float = 0.0
) -> list[Fix]:
    """Fixes every STEP_S seconds from x0 to x1 (either way) along the course's road."""
    rng = random.Random(f"{x0},{x1},{t0_s},{wiggle_m}")
    steps = int(abs(x1 - x0) / (speed_mps * STEP_S))
    sign = 1 if x1 >= x0 else -1
    return [
        course.fix(t0_s + i * STEP_S, x0 + sign * i * speed_mps * STEP_S, rng.uniform(-wiggle_m, wiggle_m))
        for i in range(steps + 1)
    ]


def park(course: Course, x: float, t0_s: float, t1_s: float) -> list[Fix]:
    """A parked device: fixes every STEP_S seconds from t0_s to t1_s, jittering under a metre."""
    rng = random.Random(f"{x},{t0_s}")
    return [
        course.fix(t, x + rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), speed=0.0)
        for t in range(int(t0_s), int(t1_s) + 1, STEP_S)
    ]


def entries(tracks: dict[str, list[Fix]], seed: int = 0) -> list[dict[str, str]]:
    """Every fix as a stream entry, devices interleaved and each one's fixes shuffled."""
    out = [
        record(device, ts=f.ts_us // 1000, lat=f.lat, lon=f.lon, speed=f.speed)
        for device, fixes in tracks.items()
        for f in fixes
    ]
    random.Random(seed).shuffle(out)
    return out


# --- Directus's REST API ---


def post_geofence(directus: Directus, name: str, kind: str, geometry: dict[str, Any], **extra: Any) -> int:
    created = directus.post("geofences", {"name": name, "kind": kind, "geometry": geometry, **extra})
    assert created["geometry"] == geometry  # as posted: no axis swapped, no digit lost
    return int(created["id"])


def geofence_set(directus: Directus) -> GeofenceSet:
    """Every geofence of the shared table, as Directus's REST API gives them (what tpx loads too)."""
    return GeofenceSet.from_rows(directus.items("geofences"))


def records_of(directus: Directus, prefix: str) -> list[dict[str, Any]]:
    """The timing records of the devices whose id starts with ``prefix``, through REST."""
    query = {
        "limit": "-1",
        "sort": "ts,id",
        "filter": json.dumps({"device_id": {"_starts_with": prefix}}),
    }
    found: list[dict[str, Any]] = directus.request(
        "GET", f"/items/timing_records?{urllib.parse.urlencode(query)}"
    )
    return found


def ts_ms(item: dict[str, Any]) -> int:
    return (dt.datetime.fromisoformat(item["ts"]) - EPOCH) // dt.timedelta(milliseconds=1)


def brief(item: dict[str, Any]) -> tuple[str, str, int, str, int]:
    return (item["id"], item["device_id"], item["geofence"], item["event"], ts_ms(item))


def brief_event(e: Event) -> tuple[str, str, int, str, int]:
    return (str(e.id), e.device_id, int(e.geofence), e.event, e.ts_ms)


def expected(geofences: GeofenceSet, tracks: dict[str, list[Fix]]) -> list[Event]:
    return [e for device, fixes in tracks.items() for e in replay(device, geofences, fixes)]


def assert_records_are(got: list[dict[str, Any]], want: Sequence[Event]) -> None:
    """Same records (id, device, geofence, event, time to the ms), each once, same values."""
    assert sorted(map(brief, got)) == sorted(map(brief_event, want))
    by_id = {str(e.id): e for e in want}
    for item in got:
        e = by_id[item["id"]]
        assert abs(float(item["latitude"]) - e.latitude) <= DEGREE_TOLERANCE, (item, e)
        assert abs(float(item["longitude"]) - e.longitude) <= DEGREE_TOLERANCE, (item, e)
        assert item["direction"] == e.direction, (item, e)
        assert item["uncertainty_s"] == pytest.approx(e.uncertainty_s), (item, e)
        assert item["speed"] == pytest.approx(e.speed, rel=1e-6), (item, e)
        assert item["date_created"] is not None  # tpx fills what Directus's API would have


# --- tpx serve on the Directus database ---


@dataclass
class Run:
    """One test's `tpx serve` on Directus's database: a tpx schema of its own, its stream, a tag."""

    directus: Directus
    settings: Settings
    env: dict[str, str]
    client: redis.Redis
    logs: Path
    #: In this test's geofence names and device ids (the Directus tables are shared).
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


@pytest.fixture
def run(
    directus: Directus, settings: Settings, serve_env: dict[str, str], rclient: redis.Redis, tmp_path: Path
) -> Iterator[Run]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    env = {
        **serve_env,
        "TPX_DATABASE_URL": directus.db_url,
        "TPX_DB_SCHEMA": schema,
        "TPX_DOMAIN": "on",
        "TPX_GEOFENCES_RELOAD_S": "0.5",
    }
    s = settings.model_copy(update={"database_url": directus.db_url, "db_schema": schema})
    yield Run(directus, s, env, rclient, tmp_path)
    with psycopg.connect(directus.db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def generations(s: Settings) -> int:
    """How many geofence sets the stage has used (it records each one when it loads it)."""
    with psycopg.connect(s.database_url) as conn:
        query = sql.SQL("SELECT count(*) FROM {}.tpx_domain_generations").format(sql.Identifier(s.db_schema))
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def all_written(client: redis.Redis, s: Settings, rows: int) -> bool:
    """``rows`` rows in positions and nothing pending (False before `tpx serve` has migrated)."""
    try:
        return drained(client, s, rows)
    except psycopg.errors.UndefinedTable:
        return False


def serve_until_drained(env: dict[str, str], log: Path, client: redis.Redis, s: Settings, rows: int) -> None:
    serve = Serve(env, log).start()
    try:
        wait_for(
            lambda: all_written(client, s, rows), timeout=90, what=f"{rows} rows written and acknowledged"
        )
    finally:
        assert serve.stop() == 0, serve.logs()[-3000:]


# --- the tests ---


def test_timing_records_through_rest_are_the_replay_of_geofences_made_through_rest(run: Run) -> None:
    directus, s, env, rclient = run.directus, run.settings, run.env, run.client
    course = Course(24.0, 56.95)
    tag = run.tag
    zone = post_geofence(directus, f"depot-{tag}", "zone", course.square(100, -50, 300, 50))
    gate = post_geofence(directus, f"gate-{tag}", "gate", course.line((500, -100), (500, 100)))
    circle = post_geofence(
        directus, f"pump-{tag}", "circle", course.point(800, 0), radius_m=40, exit_margin_m=5
    )
    prefix = f"rest-{tag}-"
    tracks = {
        **{f"{prefix}east-{i}": drive(course, 0, 1000, t0_s=i, wiggle_m=3.0 * i) for i in range(3)},
        f"{prefix}west": drive(course, 1000, 0, wiggle_m=2.0),
        # switched on inside the depot: no enter (no past, no event), but leaving it is an exit
        f"{prefix}inside": drive(course, 150, 1000),
    }
    add_entries(rclient, s.stream, entries(tracks, seed=1))

    serve_until_drained(env, run.logs / "serve.log", rclient, s, sum(map(len, tracks.values())))

    got = records_of(directus, prefix)
    want = expected(geofence_set(directus), tracks)
    assert_records_are(got, want)
    kinds = {(r["device_id"].removeprefix(prefix), r["geofence"], r["event"], r["direction"]) for r in got}
    for i in range(3):
        east = f"east-{i}"
        assert {k for k in kinds if k[0] == east} == {
            (east, zone, "enter", None),
            (east, zone, "exit", None),
            (east, gate, "cross", 1),  # from the left of the gate's south→north line to its right
            (east, circle, "enter", None),
            (east, circle, "exit", None),
        }
    assert {k for k in kinds if k[0] == "west"} == {
        ("west", circle, "enter", None),
        ("west", circle, "exit", None),
        ("west", gate, "cross", -1),
        ("west", zone, "enter", None),
        ("west", zone, "exit", None),
    }
    assert ("inside", zone, "exit", None) in kinds
    assert ("inside", zone, "enter", None) not in kinds
    assert len(got) == 3 * 5 + 5 + 4
    assert {r["uncertainty_s"] for r in got} == {STEP_S}


def test_a_geofence_moved_through_rest_while_devices_are_inside_gives_no_event_for_the_move(run: Run) -> None:
    directus, s, env, rclient = run.directus, run.settings, run.env, run.client
    course = Course(24.1, 56.95)
    tag = run.tag
    yard = post_geofence(directus, f"yard-{tag}", "zone", course.square(0, -50, 200, 50))
    prefix = f"edit-{tag}-"
    left, stays = f"{prefix}left-behind", f"{prefix}still-inside"
    # both parked inside the yard; the yard then moves east, leaving one outside
    before = {left: park(course, 50, 0, 60), stays: park(course, 175, 0, 60)}
    after = {
        left: park(course, 50, 65, 120) + drive(course, 50, 450, t0_s=125),
        stays: park(course, 175, 65, 120) + drive(course, 175, 450, t0_s=125),
    }
    add_entries(rclient, s.stream, entries(before, seed=2))
    serve = Serve(env, run.logs / "serve.log").start()
    try:
        rows = sum(map(len, before.values()))
        wait_for(lambda: all_written(rclient, s, rows), timeout=90, what="the parked fixes written")
        assert records_of(directus, prefix) == []  # switched on inside: no past, no event
        assert generations(s) == 1

        moved = course.square(150, -50, 350, 50)
        directus.request("PATCH", f"/items/geofences/{yard}", {"geometry": moved})
        wait_for(lambda: generations(s) == 2, timeout=30, what="the edited yard reloaded")

        add_entries(rclient, s.stream, entries(after, seed=3))
        rows += sum(map(len, after.values()))
        wait_for(lambda: all_written(rclient, s, rows), timeout=90, what="the fixes after the edit written")
    finally:
        assert serve.stop() == 0, serve.logs()[-3000:]

    got = records_of(directus, prefix)
    # the edited yard is adopted at each device's newest fix before the edit, without an event:
    # the records are the replay of the new shape from there on
    edited = geofence_set(directus)
    want = expected(edited, {d: [before[d][-1], *after[d]] for d in before})
    assert_records_are(got, want)
    events = [(r["device_id"], r["event"]) for r in got]
    assert events == [(left, "enter"), (stays, "exit"), (left, "exit")]
    moved_at_ms = after[left][0].ts_us // 1000
    assert all(ts_ms(r) > moved_at_ms + 60_000 for r in got)  # none for the move: all from driving
    # leaving the new shape, not the old: the exit is at its east edge (x = 350 m)
    for r in got:
        if r["event"] == "exit":
            assert float(r["longitude"]) == pytest.approx(course.at(350, 0)[0], abs=DEGREE_TOLERANCE)


def test_kill_9_while_a_backlog_drains_leaves_each_timing_record_once(run: Run) -> None:
    directus, s, env, rclient = run.directus, run.settings, run.env, run.client
    course = Course(24.2, 56.95)
    tag = run.tag
    for i in range(4):  # a depot, a gate and a pump every 1.2 km
        x = 1200 * i
        post_geofence(directus, f"depot-{tag}-{i}", "zone", course.square(x + 100, -60, x + 300, 60))
        post_geofence(directus, f"gate-{tag}-{i}", "gate", course.line((x + 500, -100), (x + 500, 100)))
        post_geofence(
            directus, f"pump-{tag}-{i}", "circle", course.point(x + 800, 0), radius_m=40, exit_margin_m=5
        )
    prefix = f"kill-{tag}-"
    rng = random.Random(9)
    # 100 devices, ~36 fixes each: some drive east, some west, at their own speeds and offsets
    tracks: dict[str, list[Fix]] = {}
    for i in range(100):
        x0 = rng.uniform(0, 2000)
        x1 = x0 + rng.choice((-1, 1)) * rng.uniform(1800, 2400)
        tracks[f"{prefix}{i}"] = drive(
            course, x0, x1, t0_s=rng.uniform(0, 30), speed_mps=rng.uniform(10, 14), wiggle_m=20.0
        )
    total = sum(map(len, tracks.values()))
    assert total > 3000
    add_entries(rclient, s.stream, entries(tracks, seed=4))

    env = {**env, "TPX_BATCH_SIZE": "100", "TPX_READ_COUNT": "100", "TPX_WRITERS": "2"}
    kills = random.Random(5)
    for life, target in enumerate((total // 5, total // 2, 4 * total // 5)):
        serve = Serve(env, run.logs / f"serve-{life}.log").start()

        def grown(t: int = target) -> bool:
            try:
                return row_count(s.database_url, s.db_schema) >= t
            except psycopg.errors.UndefinedTable:  # the first `tpx serve` has not migrated yet
                return False

        try:
            wait_for(grown, timeout=90, what=f"{target} rows", every=0.01)
            time.sleep(kills.uniform(0, 0.1))  # a random moment inside a batch's transaction or ack
        finally:
            serve.kill()
        assert row_count(s.database_url, s.db_schema) < total, "killed after the backlog drained"
    serve_until_drained(env, run.logs / "serve-last.log", rclient, s, total)

    got = records_of(directus, prefix)
    want = expected(geofence_set(directus), tracks)
    assert len(got) == len(want) > 500
    assert_records_are(got, want)

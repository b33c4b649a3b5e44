"""The domain stage in the engine, against real Redis and PostgreSQL: timing records commit with
the positions they come from, exactly the sequential replay's, whatever the arrival order, the
number of instances or the crashes.

The CMS tables are created from deploy/directus/no-postgis.sql in the test's own schema (the same
columns Directus creates; tests/test_directus.py checks the two stay the same).
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client import CollectorRegistry
from psycopg import sql

from tests.helpers import NOW_MS, Serve, add_entries, drained, record, wait_for
from tests.test_pipeline import running as engine_running
from tpx.config import Settings
from tpx.connections import search_path
from tpx.domain import DeviceState, Event, Fix, GeofenceSet, advance, replay
from tpx.domain.shapes import Frame
from tpx.domainstage.stage import LOCK_SQL, MARK_SQL, DomainStage
from tpx.engine.service import Engine, StartupError
from tpx.schema import migrate

ROOT = Path(__file__).resolve().parent.parent
NO_POSTGIS_DDL = ROOT / "deploy" / "directus" / "no-postgis.sql"
#: The course sits around this point (lon, lat), where tests.helpers.record puts its fixes.
ORIGIN = (25.2797, 54.6872)
LOCAL = Frame.at(*ORIGIN)
#: Fix times start an hour back (the stream's records are an hour old in tests.helpers).
T0_MS = NOW_MS - 3_600_000


def at(east_m: float, north_m: float) -> tuple[float, float]:
    return ORIGIN[0] + east_m / LOCAL.kx, ORIGIN[1] + north_m / LOCAL.ky


def square(gid: int, name: str, x0: float, y0: float, x1: float, y1: float, **extra: Any) -> dict[str, Any]:
    ring = [list(at(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    return {
        "id": gid,
        "name": name,
        "kind": "zone",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        **extra,
    }


#: A zone, a gate across the road and a circle with a margin.
COURSE = [
    square(1, "depot", 100, -50, 300, 50),
    {
        "id": 2,
        "name": "gate",
        "kind": "gate",
        "geometry": {"type": "LineString", "coordinates": [list(at(500, -100)), list(at(500, 100))]},
    },
    {
        "id": 3,
        "name": "pump",
        "kind": "circle",
        "geometry": {"type": "Point", "coordinates": list(at(800, 0))},
        "radius_m": 40,
        "exit_margin_m": 5,
    },
]


def cms_tables(dsn: str, schema: str, geofences: Sequence[dict[str, Any]] = COURSE) -> None:
    """The Directus tables in ``schema``, with ``geofences`` in them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(NO_POSTGIS_DDL.read_text())
        for g in geofences:
            conn.execute(
                "INSERT INTO geofences (id, name, kind, geometry, radius_m, exit_margin_m)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    g["id"],
                    g["name"],
                    g["kind"],
                    json.dumps(g["geometry"]),
                    g.get("radius_m"),
                    g.get("exit_margin_m") or 0,
                ),
            )


def drive(
    device: str, seconds: int, step_s: int = 5, speed_mps: float = 10.0, wiggle: float = 0.0, seed: int = 0
) -> list[Fix]:
    """A device driving east along the course, one fix every ``step_s`` seconds."""
    rng = random.Random(seed)
    out = []
    for i in range(0, seconds, step_s):
        lon, lat = at(i * speed_mps, rng.uniform(-wiggle, wiggle))
        out.append(Fix((T0_MS + i * 1000) * 1000, round(lat, 7), round(lon, 7), True, 36.0))
    return out


def entries(device: str, fixes: Sequence[Fix]) -> list[dict[str, str]]:
    return [record(device, ts=f.ts_us // 1000, lat=f.lat, lon=f.lon, speed=f.speed) for f in fixes]


def expected(
    devices: dict[str, list[Fix]], geofences: Sequence[dict[str, Any]] = COURSE
) -> set[tuple[Any, ...]]:
    gs = GeofenceSet.from_rows(geofences)
    return {brief(e) for device, fixes in devices.items() for e in replay(device, gs, fixes)}


def brief(e: Event) -> tuple[Any, ...]:
    return (str(e.id), e.device_id, int(e.geofence), e.event, e.ts_ms)


def stored(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(
            "SELECT id::text, device_id, geofence, event,"
            " (extract(epoch FROM ts) * 1000)::int8 FROM timing_records ORDER BY ts, id"
        ).fetchall()


def wait_stored(s: Settings, want: set[Any], what: str, timeout: float = 20.0) -> None:
    """Until the timing records are exactly ``want`` (the repair runs on its own clock)."""

    def now() -> set[tuple[Any, ...]]:
        return {tuple(r) for r in stored(s.database_url, s.db_schema)}

    wait_for(lambda: now() == want, timeout=timeout, what=what)


@pytest.fixture
def domain_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"domain": "on", "geofences_reload_s": 0.5})


def running(settings: Settings) -> contextlib.AbstractContextManager[Engine]:
    """The engine in-process with the domain stage (tests.test_pipeline's helper)."""
    return engine_running(settings, tx_stage=DomainStage(settings))


@pytest.mark.timeout(60)
def test_timing_records_are_the_sequential_replay(domain_settings: Settings, rclient: redis.Redis) -> None:
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    devices = {f"dev-{i}": drive(f"dev-{i}", 120, seed=i, wiggle=3.0) for i in range(3)}
    for device, fixes in devices.items():
        add_entries(rclient, s.stream, entries(device, fixes))
    with running(s):
        wait_for(lambda: drained(rclient, s, sum(map(len, devices.values()))), what="every record written")
    got = stored(s.database_url, s.db_schema)
    want = expected(devices)
    assert {tuple(r) for r in got} == want
    assert len(got) == len(want) == 3 * 5  # depot enter+exit, gate cross, pump enter+exit
    assert {r[3] for r in got} == {"enter", "exit", "cross"}


@pytest.mark.timeout(90)
def test_newest_first_backlog_split_across_two_instances(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    devices = {f"dev-{i}": drive(f"dev-{i}", 150, step_s=3, seed=i, wiggle=5.0) for i in range(4)}
    mixed = [(d, f) for d, fixes in devices.items() for f in fixes]
    random.Random(7).shuffle(mixed)
    mixed[: len(mixed) // 3] = sorted(mixed[: len(mixed) // 3], key=lambda x: -x[1].ts_us)  # newest first
    add_entries(rclient, s.stream, [entries(d, [f])[0] for d, f in mixed])
    # small batches, two writers each: a device's fixes are split between four transactions
    small = s.model_copy(update={"batch_size": 7, "read_count": 7, "writers": 2})
    with running(small), running(small.model_copy(update={"consumer": "second"})):
        wait_for(lambda: drained(rclient, s, len(mixed)), timeout=60, what="every record written")
    assert {tuple(r) for r in stored(s.database_url, s.db_schema)} == expected(devices)


def test_domain_on_without_the_tables_is_one_line(domain_settings: Settings) -> None:
    migrate(domain_settings.database_url, domain_settings.db_schema)
    engine = Engine(domain_settings, tx_stage=DomainStage(domain_settings))
    with pytest.raises(StartupError) as caught:
        engine.start()
    assert caught.value.code == 2
    assert str(caught.value) == "table geofences not found (TPX_GEOFENCES_TABLE) (TPX_DOMAIN=on)"


def _wipe_bookkeeping(s: Settings) -> None:
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DELETE FROM {}.tpx_domain_devices").format(sql.Identifier(s.db_schema)))


@pytest.mark.timeout(60)
def test_a_device_without_stored_state_resumes_from_its_timing_records(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    # the device is in the depot; tpx's bookkeeping is lost; its next fix is past the depot: the
    # exit is still recorded (membership from its newest timing records, the segment from its
    # last fix); started afresh, it would be outside with no exit
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    track = drive("dev-r", 300, step_s=5)
    first, rest = track[:5], track[8:]  # 0..200 m (inside the depot, 100..300 m), then from 400 m
    fixes = first + rest
    add_entries(rclient, s.stream, entries("dev-r", first))
    with running(s):
        wait_for(lambda: drained(rclient, s, len(first)), what="the first fixes written")
    assert [r[3] for r in stored(s.database_url, s.db_schema)] == ["enter"]
    _wipe_bookkeeping(s)
    add_entries(rclient, s.stream, entries("dev-r", rest))
    with running(s):
        wait_for(lambda: drained(rclient, s, len(fixes)), what="every fix written")
    assert {tuple(r) for r in stored(s.database_url, s.db_schema)} == expected({"dev-r": fixes})


@pytest.mark.timeout(60)
def test_a_device_seen_before_the_domain_ran_is_inside_where_it_is(
    settings: Settings, domain_settings: Settings, rclient: redis.Redis
) -> None:
    # positions written with the domain off put the device in the depot; with the domain on, it
    # is inside from there without an enter (no past), and its next fix, past the depot, exits
    track = drive("dev-p", 300, step_s=5)
    first, rest = track[:5], track[8:]
    fixes = first + rest
    add_entries(rclient, settings.stream, entries("dev-p", first))
    with running(settings.model_copy(update={"domain": "off"})):
        wait_for(lambda: drained(rclient, settings, len(first)), what="the first fixes written")
    cms_tables(settings.database_url, settings.db_schema)
    add_entries(rclient, settings.stream, entries("dev-p", rest))
    with running(domain_settings):
        wait_for(lambda: drained(rclient, settings, len(fixes)), what="every fix written")
    events = [(r[2], r[3]) for r in stored(settings.database_url, settings.db_schema)]
    assert events[0] == (1, "exit")
    assert (1, "enter") not in events


@pytest.mark.timeout(90)
def test_a_changed_timing_table_costs_positions_nothing_and_its_records_come_later(
    domain_settings: Settings, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # someone drops a column tpx writes: PostgreSQL answers 42703 (UndefinedColumn: column
    # "direction" of relation "timing_records" does not exist) on every batch; the positions are
    # written all the same, the failure is counted and reported once; once the column is back,
    # the timing records of the batches that failed are written too: those of a device that
    # stopped (dev-1, parked since) and of one that drove on (dev-2)
    s = domain_settings.model_copy(update={"batch_size": 3, "read_count": 3})  # many batches
    cms_tables(s.database_url, s.db_schema)
    before, during, later = (drive(f"dev-{i}", 150, seed=i) for i in range(3))
    split = len(later) // 2  # dev-2: the depot and the gate in the outage, the pump after it

    def alter(statement: str) -> None:
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(sql.Identifier(s.db_schema)))

    total = len(before) + len(during) + len(later)
    with running(s) as engine:
        add_entries(rclient, s.stream, entries("dev-0", before))
        wait_for(lambda: drained(rclient, s, len(before)), what="the first device written")
        alter("ALTER TABLE {}.timing_records DROP COLUMN direction")
        add_entries(rclient, s.stream, entries("dev-1", during) + entries("dev-2", later[:split]))
        wait_for(lambda: drained(rclient, s, total - len(later) + split), what="positions written anyway")
        failures = engine.metrics.count(engine.metrics.stage_errors, stage="domain")
        assert failures >= 1
        assert {r[1] for r in stored(s.database_url, s.db_schema)} == {"dev-0"}
        alter("ALTER TABLE {}.timing_records ADD COLUMN direction integer")
        add_entries(rclient, s.stream, entries("dev-2", later[split:]))
        wait_for(lambda: drained(rclient, s, total), what="all written")
        want = expected({"dev-0": before, "dev-1": during, "dev-2": later})
        wait_stored(s, want, "the failed batches' timing records written", timeout=30)
    assert len(stored(s.database_url, s.db_schema)) == len(want)  # each once
    errors = [r.getMessage() for r in caplog.records if "domain stage failed" in r.getMessage()]
    assert errors and 'column "direction" of relation "timing_records" does not exist' in errors[0]
    assert len(errors) <= domain_settings.writers  # once per writer, not once per batch


def _column(s: Settings, change: str) -> None:
    """``ALTER TABLE timing_records`` ``change`` (DROP/ADD COLUMN direction), as a CMS admin would."""
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE {}.timing_records {}").format(sql.Identifier(s.db_schema), sql.SQL(change))
        )


def east_fix(t_s: float, east_m: float) -> Fix:
    """A fix ``t_s`` seconds after T0 on the course's road, ``east_m`` metres along it."""
    lon, lat = at(east_m, 0)
    return Fix(int((T0_MS + t_s * 1000) * 1000), round(lat, 7), round(lon, 7), True, 36.0)


#: Through the depot (100..300 m) at an uneven speed, a fix every 5 s: the third to the sixth
#: inside it, so that a segment from the second to the seventh crosses it at other times. The
#: gate is at 500 m.
UNEVEN = [east_fix(i * 5, x) for i, x in enumerate([0, 50, 150, 160, 170, 180, 400, 450])]


def through_outage(s: Settings, rclient: redis.Redis, device: str, fixes: Sequence[Fix]) -> None:
    """``fixes[:2]`` written, then ``fixes[2:6]`` while the timing table lacks a column (their
    batches fail and are marked), then ``fixes[6:]`` with the column back; each step waited for."""
    add_entries(rclient, s.stream, entries(device, fixes[:2]))
    wait_for(lambda: drained(rclient, s, 2), what="before the outage")
    _column(s, "DROP COLUMN direction")
    add_entries(rclient, s.stream, entries(device, fixes[2:6]))
    wait_for(lambda: drained(rclient, s, 6), what="the outage's fixes")
    _column(s, "ADD COLUMN direction integer")
    add_entries(rclient, s.stream, entries(device, fixes[6:]))
    wait_for(lambda: drained(rclient, s, len(fixes)), what="after the outage")


def repair_pass(s: Settings, stage: DomainStage) -> None:
    """One pass of ``stage``'s repair, on a connection of the test's, that leaves nothing after."""
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(search_path(s))
        assert stage.repair.run(conn) == ""


@pytest.mark.timeout(60)
def test_another_instance_repairs_from_the_stored_state_and_withdraws_what_was_computed_without(
    domain_settings: Settings, rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the device enters the depot in the batches that fail, and a later batch, written without
    # them, computes its enter and exit on the segment from before the outage to after it (other
    # times: the speed is not even). The repair is another instance's, which holds nothing of the
    # device in memory: it reads the stored state (checkpoints, never the fixes) and must still
    # withdraw those two records, leaving the sequential replay's, each once
    monkeypatch.setattr("tpx.domainstage.repair.REPAIR_EVERY_S", 3600.0)  # only the repair below
    s = domain_settings.model_copy(update={"batch_size": 2, "read_count": 2})
    cms_tables(s.database_url, s.db_schema)
    with running(s) as engine:
        through_outage(s, rclient, "dev-s", UNEVEN)
        assert engine.metrics.count(engine.metrics.stage_errors, stage="domain") >= 1
        assert len(stored(s.database_url, s.db_schema)) == 2  # the enter and exit of the long segment
    other, stop = DomainStage(s), threading.Event()
    other.open(CollectorRegistry(), stop)
    try:
        repair_pass(s, other)
    finally:
        stop.set()
    got = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in got} == expected({"dev-s": UNEVEN})
    assert len(got) == 2


@pytest.mark.timeout(60)
def test_a_late_fix_replayed_before_the_repair_leaves_the_missed_fixes_to_it(
    domain_settings: Settings, rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the depot's fixes fail; the device drives on (from its stored state: no fix in memory);
    # then a late fix older than that state's fixes comes, and is replayed from positions, which
    # hold the missed fixes too. Taken into that replay's history, they would be duplicates to
    # the repair later: the depot's enter and exit never written, those of the long segment kept
    monkeypatch.setattr("tpx.domainstage.repair.REPAIR_EVERY_S", 3600.0)  # only the repair below
    # one writer: two writers can commit the last two fixes newest first, a replay of their own
    s = domain_settings.model_copy(update={"batch_size": 2, "read_count": 2, "writers": 1})
    cms_tables(s.database_url, s.db_schema)
    late = east_fix(2.5, 25)  # between the first two: older than the state's checkpoint
    stage = DomainStage(s)
    with engine_running(s, tx_stage=stage) as engine:
        through_outage(s, rclient, "dev-l", UNEVEN)
        add_entries(rclient, s.stream, entries("dev-l", [late]))
        wait_for(lambda: drained(rclient, s, 9), what="the late fix")
        assert engine.metrics.registry.get_sample_value("tpx_domain_replays_total") == 1
        repair_pass(s, stage)
    got = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in got} == expected({"dev-l": [*UNEVEN, late]})
    assert len(got) == 2


@pytest.mark.timeout(30)
def test_a_missed_fix_gone_from_positions_is_dropped_from_the_mark_and_said(
    domain_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # a retention policy dropped the positions of a fix before its repair ran: nothing to give
    # back; the mark must not wait for it forever, and the log names the recompute
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    gone_us = (T0_MS + 5000) * 1000
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(search_path(s))
        conn.execute(MARK_SQL, (json.dumps([["dev-g", gone_us]]),))
    stage, stop = DomainStage(s), threading.Event()
    stage.open(CollectorRegistry(), stop)
    try:
        repair_pass(s, stage)
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(search_path(s))
            left = conn.execute("SELECT count(*) FROM tpx_domain_missed").fetchone()
    finally:
        stop.set()
    assert left == (0,)
    warned = [r.getMessage() for r in caplog.records if "no longer in positions" in r.getMessage()]
    assert warned and warned[0].startswith("1 missed fixes of 1 devices are no longer in positions")


@pytest.mark.timeout(60)
def test_an_outage_longer_than_the_late_window_loses_no_record(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    # every batch fails for 140 s of fix time, five times the late window (20 s here); the
    # device stops after. Given to the step all at once, every missed fix but the last 20 s
    # would be refused as too late: the depot, the gate and the pump lost
    s = domain_settings.model_copy(update={"batch_size": 3, "read_count": 3, "domain_late_window": "20s"})
    cms_tables(s.database_url, s.db_schema)
    track = drive("dev-o", 150, wiggle=15.0)  # off the straight line: a long segment misses the pump
    with running(s) as engine:
        add_entries(rclient, s.stream, entries("dev-o", track[:2]))
        wait_for(lambda: drained(rclient, s, 2), what="before the outage")
        _column(s, "DROP COLUMN direction")
        add_entries(rclient, s.stream, entries("dev-o", track[2:]))
        wait_for(lambda: drained(rclient, s, len(track)), what="the outage's fixes")
        assert engine.metrics.count(engine.metrics.stage_errors, stage="domain") >= 1
        _column(s, "ADD COLUMN direction integer")
        want = expected({"dev-o": track})
        wait_stored(s, want, "the outage's records written by the repair")
        assert engine.metrics.registry.get_sample_value("tpx_domain_late_fixes_total") == 0


def _marked(s: Settings) -> int:
    """Devices with fixes whose records wait: marked (tpx_domain_missed) or queued by a deferred
    batch (tpx_domain_queue, lines "device ts_us")."""
    with psycopg.connect(s.database_url) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(DISTINCT d) FROM (SELECT device_id FROM {0}.tpx_domain_missed"
                " UNION ALL SELECT split_part(k, ' ', 1)"
                " FROM {0}.tpx_domain_queue, string_to_table(fixes, E'\\n') AS k) AS w(d)"
            ).format(sql.Identifier(s.db_schema))
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(150)
def test_kill_9_in_the_middle_of_the_repair_loses_and_doubles_nothing(
    domain_settings: Settings, serve_env: dict[str, str], rclient: redis.Redis, tmp_path: Path
) -> None:
    # 3,000 devices drive through the depot while the timing table lacks a column: every batch
    # fails and marks its devices. The column comes back; `tpx serve` is killed (SIGKILL) once the
    # repair has done some of its passes (500 devices each), and started again: every record is
    # the sequential replay's, each once
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    tracks = {f"dev-{i:04d}": drive(f"dev-{i:04d}", 45, seed=i, wiggle=3.0) for i in range(3000)}  # 0..400 m
    env = {**serve_env, "TPX_DOMAIN": "on", "TPX_GEOFENCES_RELOAD_S": "0.5"}
    total = sum(map(len, tracks.values()))
    serve = Serve(env, tmp_path / "serve-0.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, timeout=30, what="ready")
        _column(s, "DROP COLUMN direction")
        add_entries(
            rclient, s.stream, [e for device, fixes in tracks.items() for e in entries(device, fixes)]
        )
        wait_for(lambda: drained(rclient, s, total), timeout=60, what="every position written")
        assert _marked(s) == len(tracks)
        _column(s, "ADD COLUMN direction integer")
        wait_for(lambda: 0 < _marked(s) < len(tracks), timeout=30, every=0.01, what="the repair under way")
    finally:
        serve.kill()
    left = _marked(s)
    assert 0 < left < len(tracks), "killed after the repair was done"
    again = Serve(env, tmp_path / "serve-1.log").start()
    try:
        wait_for(lambda: _marked(s) == 0, timeout=60, what="the repair finished after the restart")
    finally:
        assert again.stop() == 0, again.logs()[-3000:]
    got = stored(s.database_url, s.db_schema)
    want = expected(tracks)
    assert len(got) == len(want) == 2 * len(tracks)  # the depot's enter and exit, each once
    assert {tuple(r) for r in got} == want


@pytest.mark.timeout(60)
def test_a_device_whose_step_failed_gets_its_records_from_the_repair(
    domain_settings: Settings, rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a bug in one device's step (here a ZeroDivisionError while ``broken`` is set) costs that
    # device its records for the batches it hit, and no other device anything; once the step
    # works again, the repair writes them: every record is the sequential replay's, each once
    s = domain_settings.model_copy(update={"batch_size": 4, "read_count": 4})
    cms_tables(s.database_url, s.db_schema)
    broken = threading.Event()
    broken.set()

    def buggy(state: Any, geofences: Any, fixes: Any, config: Any) -> Any:
        if broken.is_set() and state.device_id == "dev-1":
            raise ZeroDivisionError("a bug in the step")
        return advance(state, geofences, fixes, config)

    monkeypatch.setattr("tpx.domainstage.stage.advance", buggy)
    devices = {d: drive(d, 150, seed=i) for i, d in enumerate(("dev-0", "dev-1"))}
    a, b = (entries(d, fixes) for d, fixes in devices.items())
    with running(s) as engine:
        add_entries(rclient, s.stream, [e for pair in zip(a, b, strict=True) for e in pair])
        wait_for(lambda: drained(rclient, s, len(a) + len(b)), what="every fix written")
        assert engine.metrics.registry.get_sample_value("tpx_domain_device_errors_total")
        got = {tuple(r) for r in stored(s.database_url, s.db_schema)}
        assert got == expected({"dev-0": devices["dev-0"]})  # dev-0 lost nothing, dev-1 all
        broken.clear()
        want = expected(devices)
        wait_stored(s, want, "dev-1's records written by the repair")
        wait_for(
            lambda: engine.metrics.registry.get_sample_value("tpx_domain_missed_devices") == 0,
            timeout=10,
            what="no device left waiting",
        )
        assert engine.metrics.registry.get_sample_value("tpx_domain_repaired_total") == 1
    assert len(stored(s.database_url, s.db_schema)) == len(want)


def switched(device: str, fixes: Sequence[Fix], before: GeofenceSet, after: GeofenceSet, at: int) -> set[Any]:
    """The records of one process that replays ``fixes`` in time order, one by one, with
    ``before`` for the first ``at`` of them and ``after`` from there on (an edit picked up)."""
    state = DeviceState(device)
    records: dict[Any, Event] = {}
    for i, fix in enumerate(sorted(fixes, key=lambda f: f.ts_us)):
        state, changes = advance(state, before if i < at else after, [fix])
        for e in changes.deleted:
            records.pop(e.id, None)
        records.update((e.id, e) for e in changes.added)
    return {brief(e) for e in records.values()}


class Feed:
    """Two instances, each on a stream of its own, so that a test says which takes which fix:
    a reloads the geofences every 0.5 s, b's reload is an hour away (it is behind on an edit)."""

    def __init__(self, s: Settings, rclient: redis.Redis, device: str) -> None:
        self.a = s.model_copy(update={"consumer": "a"})
        self.b = s.model_copy(
            update={"consumer": "b", "stream": f"{s.stream}-b", "geofences_reload_s": 3600.0}
        )
        self.rclient, self.device, self.written = rclient, device, 0

    def __call__(self, settings: Settings, fixes: list[Fix]) -> None:
        """``fixes`` to the instance of ``settings``, and wait until they are written."""
        self.written += len(fixes)
        add_entries(self.rclient, settings.stream, entries(self.device, fixes))
        wait_for(lambda: drained(self.rclient, settings, self.written), what="the fixes written")

    def hand_over(self, by_a: list[Fix], by_b: list[Fix], rest: list[Fix]) -> None:
        """``by_a`` to a, then ``by_b`` to b (behind on the edit a took), then ``rest`` to a."""
        self(self.a, by_a)
        self(self.b, by_b)
        self(self.a, rest)

    def close(self) -> None:
        self.rclient.delete(self.b.stream)


def set_depot(s: Settings, geometry: dict[str, Any]) -> None:
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {}.geofences SET geometry = %s WHERE id = 1").format(sql.Identifier(s.db_schema)),
            (json.dumps(geometry),),
        )


@pytest.mark.timeout(60)
def test_an_instance_behind_on_an_edit_never_takes_a_device_back_to_the_old_geofence(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    # the depot moves from 100..300 m to 1,000..1,200 m along the road. Instance a reloads it
    # (every 0.5 s), instance b not yet (its reload is an hour away). Once a has moved the device
    # on with the new depot, b must not take it back to the old one: b's fix at 1,050 m, computed
    # with the old depot, would put the device outside, and a, adopting the new depot again at
    # its newest fix, inside without an enter: the enter lost. Each instance reads a stream of its
    # own here, so that the test says which instance takes which fix.
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    moved = [square(1, "depot", 1000, -50, 1200, 50), *COURSE[1:]]
    track = drive("dev-e", 150)  # 0..1,490 m, a fix every 50 m
    first, by_a, by_b, rest = track[:18], track[18:20], track[20:22], track[22:]  # by_b: 1,000..1,050 m
    feed = Feed(s, rclient, "dev-e")
    stage_a = DomainStage(feed.a)
    try:
        with engine_running(feed.a, tx_stage=stage_a), running(feed.b) as b:
            feed(feed.a, first)  # up to 850 m: the old depot's enter and exit
            before = stage_a.geofences()
            set_depot(s, moved[0]["geometry"])
            wait_for(lambda: stage_a.geofences().generation != before.generation, what="a reloaded")
            feed.hand_over(by_a, by_b, rest)
            want = switched("dev-e", track, before, GeofenceSet.from_rows(moved), len(first))
            wait_stored(s, want, "the records of one process that took the edit at the 900 m fix")
            assert b.metrics.count(b.metrics.stage_errors, stage="domain") == 0
    finally:
        feed.close()


@pytest.mark.timeout(60)
def test_an_instance_behind_on_a_reverted_edit_never_takes_a_device_back_either(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    # the depot moves out to 1,000..1,200 m and both instances take it; then the edit is
    # reverted (the depot back at 100..300 m: the first geofence set again, an old digest).
    # Instance a takes the revert, b not yet. b must see that a's states are under a set adopted
    # after its own, although that set is the older one: b's fix at 150 m, computed with the
    # moved depot, would put the device outside and lose the depot's enter
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    moved = [square(1, "depot", 1000, -50, 1200, 50), *COURSE[1:]]
    track = drive("dev-v", 60)  # 0..590 m, a fix every 50 m
    first, by_a, by_b, rest = track[:2], track[2:3], track[3:4], track[4:]  # by_b: 150 m, in the depot
    feed = Feed(s, rclient, "dev-v")
    stage_a, stage_b = DomainStage(feed.a), DomainStage(feed.b)
    try:
        with engine_running(feed.a, tx_stage=stage_a), engine_running(feed.b, tx_stage=stage_b):
            original = stage_a.geofences()
            set_depot(s, moved[0]["geometry"])
            wait_for(lambda: stage_a.geofences().generation != original.generation, what="a took the edit")
            stage_b.request_reload()
            wait_for(lambda: stage_b.geofences().generation != original.generation, what="b took the edit")
            edited = stage_b.geofences()
            feed(feed.a, first)  # 0 and 50 m: outside both depots
            set_depot(s, COURSE[0]["geometry"])  # reverted
            wait_for(lambda: stage_a.geofences().generation == original.generation, what="a took the revert")
            feed.hand_over(by_a, by_b, rest)
            want = switched("dev-v", track, edited, original, len(first))
            wait_stored(s, want, "the records of one process that took the revert at the 100 m fix")
    finally:
        feed.close()


@pytest.mark.timeout(60)
def test_a_repair_after_an_edit_says_which_records_it_cannot_redo(
    domain_settings: Settings,
    rclient: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the enter and exit of the depot fall in failed batches; a later batch computes them on
    # the long segment; then the depot is edited (its margin) and reloaded before the repair
    # runs. The edit is taken at the newest fix, after the missed ones: the depot's records
    # there are its past, which an edit never rewrites. The repair says so, and names the
    # recompute that does it
    monkeypatch.setattr("tpx.domainstage.repair.REPAIR_EVERY_S", 3600.0)  # only the repair below
    s = domain_settings.model_copy(update={"batch_size": 2, "read_count": 2})
    cms_tables(s.database_url, s.db_schema)
    stage = DomainStage(s)
    with engine_running(s, tx_stage=stage):
        through_outage(s, rclient, "dev-m", UNEVEN)
        before = stage.geofences().generation
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {}.geofences SET exit_margin_m = 5 WHERE id = 1").format(
                    sql.Identifier(s.db_schema)
                )
            )
        wait_for(lambda: stage.geofences().generation != before, what="the edit reloaded")
        repair_pass(s, stage)
    warned = [r.getMessage() for r in caplog.records if "before an edit of geofences" in r.getMessage()]
    assert warned and warned[0].startswith("1 devices missed fixes before an edit of geofences 1 was taken")
    assert "tpx timing recompute --geofence ID --since 20" in warned[0]


@pytest.mark.timeout(60)
def test_tpx_geofences_reload_makes_the_instances_reload_at_once(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    from typer.testing import CliRunner

    from tpx.cli.app import app

    s = domain_settings.model_copy(update={"geofences_reload_s": 3600.0})  # never by the clock here
    cms_tables(s.database_url, s.db_schema)
    env = {
        "TPX_REDIS_URL": s.redis_url,
        "TPX_DATABASE_URL": s.database_url,
        "TPX_DB_SCHEMA": s.db_schema,
        "TPX_STREAM": s.stream,
        "COLUMNS": "200",
    }
    stage = DomainStage(s)
    hook = threading.excepthook
    engine = Engine(s, tx_stage=stage)
    engine.start()
    try:
        before = stage.geofences().generation
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {}.geofences SET exit_margin_m = 25 WHERE id = 1").format(
                    sql.Identifier(s.db_schema)
                )
            )
        result = CliRunner().invoke(app, ["geofences", "--reload"], env=env)
        assert result.exit_code == 0, result.output
        assert "geofences reloading now in test-consumer" in result.output
        wait_for(lambda: stage.geofences().generation != before, timeout=10, what="the edit reloaded")
        result = CliRunner().invoke(app, ["geofences", "--reload", "--json"], env=env)
        answer = json.loads(result.stdout)
        assert answer["reload"]["confirmed"] == ["test-consumer"]
        assert [g["id"] for g in answer["geofences"]] == [1, 2, 3]
    finally:
        engine.shutdown()
        threading.excepthook = hook


@pytest.mark.timeout(60)
def test_recomputes_are_counted_from_the_audit_table(domain_settings: Settings) -> None:
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    with running(s) as engine:
        assert engine.metrics.registry.get_sample_value("tpx_timing_recomputes") == 0
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.tpx_domain_recomputes (geofence, since, devices, removed, written)"
                    " VALUES ('1', now(), 3, 6, 6)"
                ).format(sql.Identifier(s.db_schema))
            )
        wait_for(
            lambda: engine.metrics.registry.get_sample_value("tpx_timing_recomputes") == 1,
            timeout=10,
            what="the recompute counted",
        )


@pytest.mark.timeout(60)
def test_a_geofence_deleted_before_the_reload_costs_only_the_devices_that_met_it(
    domain_settings: Settings, rclient: redis.Redis
) -> None:
    # the pump is deleted in the CMS while tpx still has it loaded: the record of the device that
    # drives through it breaks the foreign key (23503, ForeignKeyViolation: insert or update on
    # table "timing_records" violates foreign key constraint "timing_records_geofence_foreign");
    # the device that never reached it keeps its records, in the same batch
    s = domain_settings.model_copy(update={"geofences_reload_s": 3600.0})
    cms_tables(s.database_url, s.db_schema)
    through = drive("dev-a", 120)  # 0..1,190 m: depot, gate and pump
    short = drive("dev-b", 60, seed=1)  # 0..590 m: depot and gate only
    a, b = entries("dev-a", through), entries("dev-b", short)
    both = [e for pair in zip(a, b, strict=False) for e in pair] + a[len(b) :]
    with running(s) as engine:  # the geofences are loaded, the pump among them
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DELETE FROM {}.geofences WHERE id = 3").format(sql.Identifier(s.db_schema)))
        add_entries(rclient, s.stream, both)  # one pipeline: the batches hold both devices
        wait_for(lambda: drained(rclient, s, len(through) + len(short)), what="every fix written")
        assert engine.metrics.count(engine.metrics.stage_errors, stage="domain") >= 1
    got = {tuple(r) for r in stored(s.database_url, s.db_schema)}
    assert {r for r in got if r[1] == "dev-b"} == expected({"dev-b": short})
    assert not any(r[2] == 3 for r in got)


def test_a_writer_holding_a_batch_holds_up_no_other_device(domain_settings: Settings) -> None:
    """Two writers wait for each other only on a device both have: a transaction holding the
    locks of a 2,000-device batch leaves every other device free (1,024 lock buckets used to
    make nearly any two batches wait for each other)."""
    s = domain_settings
    migrate(s.database_url, s.db_schema)
    batch = [f"dev-{i:04d}" for i in range(2000)]
    with psycopg.connect(s.database_url) as holder, psycopg.connect(s.database_url) as other:
        for conn in (holder, other):
            conn.execute(search_path(s))
        holder.execute(LOCK_SQL, (json.dumps(batch),))
        other.execute("SET lock_timeout TO '2s'")
        for free in ("other-device", "dev-2000", "dev-0042x"):
            other.execute(LOCK_SQL, (json.dumps([free]),))  # granted at once
        other.rollback()  # (and its settings with it)
        other.execute(search_path(s))
        other.execute("SET lock_timeout TO '200ms'")
        # "canceling statement due to lock timeout": a device the holder has waits for it
        with pytest.raises(psycopg.errors.LockNotAvailable, match="lock timeout"):
            other.execute(LOCK_SQL, (json.dumps(["dev-0042"]),))


class _RefusesBatchesOfMany:
    """A transaction stage whose batch of several devices the server refuses with a row's
    error (22012 division_by_zero, a real ERROR, not a FATAL): the writer then runs it device
    by device; it records the order of those."""

    name = "order-probe"

    def __init__(self) -> None:
        #: each retried batch's devices, in the order the writer ran them
        self.retries: list[list[str]] = []

    def open(self, registry: Any, stop: threading.Event) -> str:
        return "order-probe on"

    def threads(self) -> Sequence[threading.Thread]:
        return ()

    def in_transaction(self, conn: psycopg.Connection[Any], inserted: Sequence[Any]) -> None:
        devices = {p.device_id for p in inserted}
        if len(devices) > 1:
            self.retries.append([])
            conn.execute("SELECT 1 / 0")
        if self.retries:
            self.retries[-1].extend(devices)

    def health(self) -> str | None:
        return None

    def request_reload(self) -> bool:
        return False

    def failed(self, conn: psycopg.Connection[Any], inserted: Sequence[Any], reason: str) -> None:
        pass


def test_a_batch_retried_device_by_device_goes_in_device_order(
    settings: Settings, rclient: redis.Redis
) -> None:
    """The writer's retry keeps each device's locks until COMMIT: in stream order, two writers
    retrying batches of the same devices would lock them in opposite orders and deadlock; the
    stage locks a batch in device-id order, and the retry follows it."""
    stage = _RefusesBatchesOfMany()
    devices = ["dev-9", "dev-10", "dev-1", "dev-b", "dev-A"]
    with engine_running(settings, tx_stage=stage):
        add_entries(rclient, settings.stream, [record(d, ts=NOW_MS - 1000) for d in devices])
        wait_for(lambda: drained(rclient, settings, len(devices)), what="the batch written")
    assert stage.retries and sum(map(len, stage.retries)) >= 2
    assert all(retried == sorted(retried) for retried in stage.retries)

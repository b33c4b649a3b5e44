"""`tpx timing DEVICE` and `tpx timing recompute`, against real PostgreSQL (and Redis where the
engine runs, in-process with the domain stage, as in tests/test_domain_stage.py).

The CMS tables come from deploy/directus/no-postgis.sql in the test's own schema, with the course
of tests/test_domain_stage.py (a depot zone, a gate, a pump circle). What a recompute must leave
is :func:`tpx.domain.replay` of the stored positions with the geofences as they are now.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql
from typer.testing import CliRunner

from tests.helpers import add_entries, drained, wait_for
from tests.test_domain_stage import (
    COURSE,
    T0_MS,
    cms_tables,
    drive,
    entries,
    expected,
    square,
    stored,
)
from tests.test_domain_stage import running as domain_running
from tpx import exitcodes
from tpx.cli import app
from tpx.config import Settings
from tpx.connections import search_path
from tpx.domain import Fix, GeofenceSet, replay
from tpx.domainstage.stage import LOCK_SQL, MARK_SQL, QUEUE_SQL, DomainStage
from tpx.ops import recompute as ops
from tpx.ops.timing import device_timing, latest_records
from tpx.schema import latest_version, migrate

pytestmark = pytest.mark.timeout(60)

runner = CliRunner()
#: Where the depot goes when an operator moves it: 250 m further east, over the gate's road.
MOVED_DEPOT = square(1, "depot", 350, -50, 450, 50)
#: A window that holds every fix of :func:`tests.test_domain_stage.drive`.
SINCE = dt.datetime.fromtimestamp(T0_MS / 1000 - 60, dt.UTC)


@pytest.fixture
def s(settings: Settings) -> Settings:
    return settings.model_copy(update={"domain": "on", "geofences_reload_s": 0.5})


@pytest.fixture
def env(s: Settings) -> dict[str, str]:
    return {"TPX_DATABASE_URL": s.database_url, "TPX_DB_SCHEMA": s.db_schema}


def tpx(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={**env, "COLUMNS": "200"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@contextlib.contextmanager
def running(settings: Settings) -> Iterator[DomainStage]:
    """tests.test_domain_stage's engine with the domain stage; yields the stage."""
    with domain_running(settings) as engine:
        assert isinstance(engine.tx_stage, DomainStage)
        yield engine.tx_stage


def ingest(s: Settings, rclient: redis.Redis, devices: dict[str, list[Fix]], already: int = 0) -> None:
    """Publish every fix and wait until the engine wrote them (records commit with them)."""
    for device, fixes in devices.items():
        add_entries(rclient, s.stream, entries(device, fixes))
    total = already + sum(map(len, devices.values()))
    wait_for(lambda: drained(rclient, s, total), what="every record written")


def stored_with_engine(s: Settings, rclient: redis.Redis, devices: dict[str, list[Fix]]) -> None:
    cms_tables(s.database_url, s.db_schema)
    with running(s):
        ingest(s, rclient, devices)


def sql_conn(s: Settings) -> psycopg.Connection[Any]:
    conn = psycopg.connect(s.database_url, autocommit=True)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(s.db_schema)))
    return conn


def move_depot(s: Settings) -> None:
    with sql_conn(s) as conn:
        conn.execute(
            "UPDATE geofences SET geometry = %s, date_updated = now() WHERE id = 1",
            (json.dumps(MOVED_DEPOT["geometry"]),),
        )


def versions(s: Settings) -> dict[str, int]:
    with sql_conn(s) as conn:
        return dict(conn.execute("SELECT device_id, version FROM tpx_domain_devices").fetchall())


def of_geofence(records: Any, gid: int) -> set[tuple[Any, ...]]:
    return {tuple(r) for r in records if r[2] == gid}


# --- tpx timing DEVICE -------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_records_newest_first_with_names_and_membership_after_driving_into_a_zone(
    s: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    # dev-park drives into the depot and parks there; dev-pump drives the course to the pump
    devices = {"dev-park": drive("dev-park", 25), "dev-pump": drive("dev-pump", 85)}
    stored_with_engine(s, rclient, devices)
    want = expected(devices)

    code, out, err = tpx(env, "timing", "dev-pump", "--json")
    assert (code, err) == (0, "")
    got = json.loads(out)
    records = got["records"]
    times = [r["ts"] for r in records]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)
    assert [(r["event"], r["geofence_name"]) for r in reversed(records)] == [
        ("enter", "depot"),
        ("exit", "depot"),
        ("cross", "gate"),
        ("enter", "pump"),
    ]
    assert {(r["id"], r["device_id"], r["geofence"], r["event"], _ms(r["ts"])) for r in records} == {
        w for w in want if w[1] == "dev-pump"
    }
    assert got["inside"] == [{"id": 3, "name": "pump"}]
    assert got["seen"] is True and got["version"] >= 1
    assert got["newest_us"] == devices["dev-pump"][-1].ts_us
    assert got["last_fix"] == _iso(devices["dev-pump"][-1].ts_us)
    assert (got["missed_since"], got["missed_fixes"]) == (None, 0)  # nothing missed: no repair waits
    assert set(got) == {"device_id", "seen", "version", "last_fix", "newest_us", "inside", "state_error"} | {
        "records",
        "missed_since",
        "missed_fixes",
    }
    assert set(records[0]) == {
        "id",
        "device_id",
        "geofence",
        "geofence_name",
        "event",
        "ts",
        "latitude",
        "longitude",
        "speed",
        "direction",
        "uncertainty_s",
    }
    cross = next(r for r in records if r["event"] == "cross")
    assert cross["direction"] == 1 and cross["uncertainty_s"] == 5.0 and cross["speed"] == 36.0

    parked = device_timing(s, "dev-park")
    assert [(i.id, i.name) for i in parked.inside] == [(1, "depot")]
    assert [(r.event, r.geofence_name) for r in parked.records] == [("enter", "depot")]

    # the human form: the membership line, then the table, newest first
    code, out, err = tpx(env, "timing", "show", "dev-pump")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("dev-pump: inside pump (3); last fix ")
    assert lines[0].endswith(f"state version {got['version']}")
    shown = [
        re.findall(r"\b(depot \(1\)|gate \(2\)|pump \(3\)) .* (enter|exit|cross)\b", line)
        for line in lines[1:]
    ]
    assert [found[0] for found in shown if found] == [
        ("pump (3)", "enter"),
        ("gate (2)", "cross"),
        ("depot (1)", "exit"),
        ("depot (1)", "enter"),
    ]

    # every device's newest records (the dashboard's tab), newest first
    latest = latest_records(s, limit=3)
    assert [r.ts for r in latest] == sorted((r.ts for r in latest), reverse=True)
    assert [str(r.id) for r in latest] == [
        w[0] for w in sorted(want, key=lambda w: (w[4], w[0]), reverse=True)[:3]
    ]


def _ms(iso: str) -> int:
    return round(dt.datetime.fromisoformat(iso).timestamp() * 1000)


def _iso(ts_us: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=ts_us)).isoformat()


@pytest.mark.timeout(90)
def test_since_takes_a_duration_or_a_time(s: Settings, rclient: redis.Redis, env: dict[str, str]) -> None:
    devices = {"dev-1": drive("dev-1", 85)}
    stored_with_engine(s, rclient, devices)
    events = sorted(w[4] for w in expected(devices))
    middle = dt.datetime.fromtimestamp(events[2] / 1000, dt.UTC)
    code, out, _ = tpx(env, "timing", "dev-1", "--json", "--since", middle.isoformat())
    assert code == 0
    assert sorted(_ms(r["ts"]) for r in json.loads(out)["records"]) == events[2:]
    # the fixes are an hour old: 2h back holds them all, 30m none
    assert len(json.loads(tpx(env, "timing", "dev-1", "--json", "--since", "2h")[1])["records"]) == 4
    code, out, _ = tpx(env, "timing", "dev-1", "--since", "30m")
    assert code == 0 and out.splitlines()[-1].startswith("no timing records since ")
    code, out, err = tpx(env, "timing", "dev-1", "--since", "yesterday")
    assert (code, out) == (exitcodes.USAGE, "")
    assert err.startswith("tpx: --since 'yesterday': give a duration back from now") and err.count("\n") == 1


def test_a_device_the_domain_never_saw(s: Settings, env: dict[str, str]) -> None:
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    code, out, err = tpx(env, "timing", "nobody")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["nobody: not seen by the domain (no stored state)", "no timing records"]
    got = json.loads(tpx(env, "timing", "nobody", "--json")[1])
    assert (got["seen"], got["version"], got["inside"], got["records"]) == (False, None, [], [])


def test_a_device_waiting_for_the_repair_says_since_when(s: Settings, env: dict[str, str]) -> None:
    # a batch whose domain step failed marked the device (the stage's own statement), and a
    # deferred batch, not taken yet, queued it beside a device whose id starts with the same
    # letters; it was never stored, so only its placeholder holds the mark; a recompute leaves
    # the marks alone
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    at_us = 1_780_000_000_123_456  # 2026-05-28 20:26:40.123456 UTC
    with sql_conn(s) as conn:
        conn.execute(MARK_SQL, (json.dumps([["parked", at_us + 5_000_000], ["parked", at_us]]),))
        conn.execute(QUEUE_SQL, (f"parked-2 {at_us - 9_000_000}\nparked {at_us + 9_000_000}",))
    code, out, err = tpx(env, "timing", "parked")
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == [
        "parked: not seen by the domain (no stored state)",
        "3 fixes waiting, the oldest from 2026-05-28 20:26:40 UTC (a batch failed, or left them for"
        " later or for tpx domain): their timing records wait for the repair or for tpx domain",
    ]
    assert tpx(env, "timing", "recompute", "--device", "parked", "--since", "2026-05-28T00:00:00Z")[0] == 0
    got = json.loads(tpx(env, "timing", "parked", "--json")[1])
    assert (got["missed_since"], got["missed_fixes"]) == ("2026-05-28T20:26:40.123456+00:00", 3)
    got = json.loads(tpx(env, "timing", "parked-2", "--json")[1])
    assert (got["missed_since"], got["missed_fixes"]) == ("2026-05-28T20:26:31.123456+00:00", 1)


def test_columns_the_table_lacks_read_as_none(s: Settings, env: dict[str, str]) -> None:
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    with sql_conn(s) as conn:
        conn.execute("ALTER TABLE timing_records DROP COLUMN uncertainty_s, DROP COLUMN direction")
        conn.execute(
            "INSERT INTO timing_records (id, device_id, event, ts, latitude, longitude, speed, geofence)"
            " VALUES (%s, 'dev-1', 'cross', '2026-12-01T09:30:00.123Z', 54.6872001, 25.2797002, 12.5, 2)",
            (uuid.uuid4(),),
        )
    [row] = latest_records(s, device="dev-1")
    assert (row.direction, row.uncertainty_s, row.speed) == (None, None, 12.5)
    assert (row.latitude, row.longitude) == (54.6872001, 25.2797002)
    assert row.ts == dt.datetime(2026, 12, 1, 9, 30, 0, 123000, tzinfo=dt.UTC)
    assert row.geofence_name == "gate"


# --- tpx timing recompute -------------------------------------------------------------------------


def recompute(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return tpx(env, "timing", "recompute", *args)


@pytest.mark.timeout(90)
def test_recompute_after_a_geofence_was_moved_equals_the_replay_and_is_idempotent(
    s: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    devices = {f"dev-{i}": drive(f"dev-{i}", 120, seed=i, wiggle=3.0) for i in range(3)}
    stored_with_engine(s, rclient, devices)
    before = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in before} == expected(devices)
    move_depot(s)
    versions_before = versions(s)
    moved = [MOVED_DEPOT, *COURSE[1:]]

    # --dry-run: the counts of the real run, and nothing written
    code, out, err = recompute(env, "--geofence", "1", "--since", SINCE.isoformat(), "--dry-run", "--json")
    assert (code, err) == (0, "")
    dry = json.loads(out)
    assert stored(s.database_url, s.db_schema) == before and versions(s) == versions_before

    code, out, err = recompute(env, "--geofence", "1", "--since", SINCE.isoformat())
    assert (code, err) == (0, "")
    # depot: 2 records per device moved (enter/exit at other times): 6 removed, 6 written
    assert out == "recomputed 3 devices: 6 records removed, 6 written\n"
    assert (dry["devices"], dry["removed"], dry["written"], dry["dry_run"]) == (3, 6, 6, True)
    after = stored(s.database_url, s.db_schema)
    assert of_geofence(after, 1) == of_geofence(expected(devices, moved), 1)
    assert of_geofence(after, 1).isdisjoint(of_geofence(before, 1))
    assert {tuple(r) for r in after if r[2] != 1} == {tuple(r) for r in before if r[2] != 1}
    assert versions(s) == {d: v + 1 for d, v in versions_before.items()}

    # again: nothing to change, nothing written, no version moved
    code, out, _ = recompute(env, "--geofence", "1", "--since", SINCE.isoformat(), "--json")
    assert code == 0
    again = json.loads(out)
    assert (again["devices"], again["removed"], again["written"], again["changed"]) == (3, 0, 0, [])
    assert stored(s.database_url, s.db_schema) == after
    assert versions(s) == {d: v + 1 for d, v in versions_before.items()}
    assert set(again) == {"geofence", "device", "since", "until", "devices", "fixes"} | {
        "removed",
        "written",
        "dry_run",
        "changed",
    }
    assert (again["geofence"], again["device"], again["until"]) == (1, None, None)
    assert again["fixes"] == sum(map(len, devices.values()))
    # one audit row: the run that changed records (not the dry run, not the idempotent one)
    with psycopg.connect(s.database_url) as conn:
        audit = conn.execute(
            sql.SQL(
                "SELECT geofence, device_id, devices, removed, written FROM {}.tpx_domain_recomputes"
            ).format(sql.Identifier(s.db_schema))
        ).fetchall()
    assert audit == [("1", None, 3, 6, 6)]


@pytest.mark.timeout(90)
def test_recompute_a_device_writes_the_events_of_the_window_only_and_leaves_other_rows(
    s: Settings, rclient: redis.Redis, env: dict[str, str]
) -> None:
    devices = {"dev-a": drive("dev-a", 120), "dev-b": drive("dev-b", 120, seed=1, wiggle=3.0)}
    stored_with_engine(s, rclient, devices)
    want = expected(devices)
    dev_a = {w for w in want if w[1] == "dev-a"}
    enter_ms = next(w[4] for w in dev_a if (w[2], w[3]) == (3, "enter"))
    exit_ms = next(w[4] for w in dev_a if (w[2], w[3]) == (3, "exit"))
    foreign = uuid.uuid4()  # a row someone wrote through Directus, in the window: not tpx's to replace
    with sql_conn(s) as conn:
        conn.execute("DELETE FROM timing_records WHERE event <> 'cross'")
        conn.execute(
            "INSERT INTO timing_records (id, device_id, event, ts, latitude, longitude, geofence)"
            " VALUES (%s, 'dev-a', 'exit', to_timestamp(%s / 1000.0), 54.6872, 25.2797, 1)",
            (foreign, enter_ms + 200),
        )

    def at_ms(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat()

    # from just after the pump's enter: its exit; the enter, on the segment the replay starts
    # with, is before the window
    code, out, err = recompute(env, "--device", "dev-a", "--since", at_ms(enter_ms + 100))
    assert (code, err) == (0, "")
    assert out == "recomputed 1 device: 0 records removed, 1 written\n"
    # a second around the enter, between two fixes: the fix before and the one after find it
    assert not [f for f in devices["dev-a"] if enter_ms - 500 <= f.ts_us // 1000 <= enter_ms + 500]
    code, out, _ = recompute(
        env, "--device", "dev-a", "--since", at_ms(enter_ms - 500), "--until", at_ms(enter_ms + 500)
    )
    assert (code, out) == (0, "recomputed 1 device: 0 records removed, 1 written\n")
    got = {tuple(r) for r in stored(s.database_url, s.db_schema)}
    assert {g for g in got if g[1] == "dev-a" and g[0] != str(foreign)} == {
        w for w in dev_a if w[3] == "cross" or w[2] == 3
    }
    assert str(foreign) in {g[0] for g in got}  # in the window, of a geofence replayed: left alone
    assert {g for g in got if g[1] == "dev-b"} == {w for w in want if w[1] == "dev-b" and w[3] == "cross"}
    assert exit_ms > enter_ms + 500


@pytest.mark.timeout(120)
def test_a_running_engine_resumes_from_the_stored_state_after_a_recompute(
    s: Settings, rclient: redis.Redis
) -> None:
    cms_tables(s.database_url, s.db_schema)
    fixes = drive("dev-1", 120)
    inside_new_depot = next(i for i, f in enumerate(fixes) if f.ts_us >= (T0_MS + 40_000) * 1000)
    first, second = fixes[: inside_new_depot + 1], fixes[inside_new_depot + 1 :]
    with running(s) as stage:
        ingest(s, rclient, {"dev-1": first})
        old_generation = stage.geofences().generation
        move_depot(s)
        wait_for(lambda: stage.geofences().generation != old_generation, what="the moved depot loaded")
        chosen = ops.plan(s, ops.Window(SINCE), geofence="1")
        result = ops.run(s, chosen)
        assert (result.devices, result.removed, result.written) == (1, 2, 1)  # the new depot: enter only
        ingest(s, rclient, {"dev-1": second}, already=len(first))
        # its next batches started from the stored state, not from the memory of the first half:
        # the history in memory holds none of the first half's fixes (the second half may have
        # come in two batches on two writers, the later one resuming from the store in turn)
        held = stage.cache.get("dev-1")
        assert held is not None
        history = [e.fix.ts_us for e in held[1].history]
        assert history and set(history) <= {f.ts_us for f in second}
        assert history[-1] == second[-1].ts_us
    want = expected({"dev-1": fixes}, [MOVED_DEPOT, *COURSE[1:]])
    assert {tuple(r) for r in stored(s.database_url, s.db_schema)} == want
    assert [w[3] for w in sorted(want, key=lambda w: w[4]) if w[2] == 1] == ["enter", "exit"]


def test_recompute_waits_for_the_lock_the_stage_takes_on_the_device(s: Settings) -> None:
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    chosen = ops.plan(s, ops.Window(SINCE), device="dev-1")
    results: list[ops.RecomputeResult] = []
    with psycopg.connect(s.database_url) as writer:  # a writer's transaction, holding dev-1
        writer.execute(search_path(s))
        writer.execute(LOCK_SQL, (json.dumps(["dev-1"]),))
        worker = threading.Thread(target=lambda: results.append(ops.run(s, chosen)), name="test-recompute")
        worker.start()
        try:
            holder = writer.info.backend_pid
            wait_for(lambda: blocked_by(s, holder, ops.PG_PURPOSE), what="recompute waiting")
            assert not results
            # a dry run takes no lock: it counts while the writer holds the device
            dry = ops.run(s, chosen, dry_run=True)
            assert (dry.devices, dry.removed, dry.written) == (1, 0, 0)
        finally:
            writer.rollback()
            worker.join(timeout=10)
    assert [(r.devices, r.removed, r.written) for r in results] == [(1, 0, 0)]
    # the lock's placeholder for a device never stored does not outlive the recompute, dry or not
    ops.run(s, chosen, dry_run=True)
    assert versions(s) == {}


def blocked_by(s: Settings, holder: int, application: str) -> bool:
    """Whether a session of ``application`` waits for a lock the backend ``holder`` holds (asked
    on a connection of its own: pg_stat_activity stays as first read within a transaction)."""
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = %s AND %s = ANY(pg_blocking_pids(pid))",
            (application, holder),
        ).fetchone()
    return row is not None and row[0] == 1


def test_moving_the_depot_moves_its_records() -> None:
    """The fixture itself: the moved depot's records are others (else the tests above prove little)."""
    fixes = drive("dev-1", 120)
    old = [(e.event, e.ts_ms) for e in replay("dev-1", GeofenceSet.from_rows(COURSE[:1]), fixes)]
    new = [(e.event, e.ts_ms) for e in replay("dev-1", GeofenceSet.from_rows([MOVED_DEPOT]), fixes)]
    assert [k for k, _ in old] == [k for k, _ in new] == ["enter", "exit"]
    assert not set(old) & set(new)


# --- one line and an exit code -------------------------------------------------------------------

UNREACHABLE = {"TPX_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"}
#: Each command once, with valid flags.
BOTH_COMMANDS = pytest.mark.parametrize(
    "args",
    [["timing", "dev-1"], ["timing", "recompute", "--device", "dev-1", "--since", "2h"]],
    ids=["show", "recompute"],
)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--since", "2h"], "give --geofence ID (every device) or --device D (every geofence)"),
        (["--geofence", "1", "--device", "d", "--since", "2h"], "give --geofence ID or --device D, not both"),
        (["--geofence", "1"], "give --since T, where the window starts: a duration back from now"),
        (["--device", "d", "--since", "1h", "--until", "2h"], "--until 2h is before --since 1h"),
        (["--device", "d", "--since", "soon"], "--since 'soon': give a duration back from now"),
        (["--device", "d", "--since", "2h", "--until", "later"], "--until 'later': give a duration"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2_before_any_connection(args: list[str], line: str) -> None:
    code, out, err = recompute(UNREACHABLE, *args)
    assert (code, out) == (exitcodes.USAGE, "")
    assert err.startswith(f"tpx: {line}") and err.count("\n") == 1, err


@BOTH_COMMANDS
def test_missing_tables_and_schema_are_one_line_and_exit_2(
    s: Settings, env: dict[str, str], args: list[str]
) -> None:
    code, out, err = tpx(env, *args)
    assert (code, out, err) == (exitcodes.USAGE, "", "tpx: table geofences not found (TPX_GEOFENCES_TABLE)\n")
    cms_tables(s.database_url, s.db_schema)  # the CMS's tables, but tpx never migrated its schema
    code, out, err = tpx(env, *args, "--json")
    needs = latest_version()
    line = f"schema {s.db_schema} is at version 0, this tpx needs {needs}: run `tpx migrate` (TPX_DB_SCHEMA)"
    assert (code, err) == (exitcodes.USAGE, f"tpx: {line}\n")
    assert json.loads(out) == {"error": line, "exit_code": exitcodes.USAGE}


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ("SELECT 1", "no geofence 99 in geofences"),
        ("UPDATE geofences SET active = false WHERE id = 99", "geofence 99 is inactive: tpx writes no"),
        ("UPDATE geofences SET radius_m = NULL WHERE id = 99", "geofence 99 is invalid: radius_m is missing"),
    ],
    ids=["missing", "inactive", "invalid"],
)
def test_a_geofence_that_cannot_be_replayed_is_one_line_and_exit_2(
    s: Settings, env: dict[str, str], change: str, line: str
) -> None:
    pump = {**COURSE[2], "id": 99}
    cms_tables(s.database_url, s.db_schema, [] if change == "SELECT 1" else [pump])
    migrate(s.database_url, s.db_schema)
    with sql_conn(s) as conn:
        conn.execute(change)
    code, out, err = recompute(env, "--geofence", "99", "--since", "2h")
    assert (code, out) == (exitcodes.USAGE, "")
    assert err.startswith(f"tpx: {line}") and err.count("\n") == 1, err


@BOTH_COMMANDS
def test_an_unreachable_server_is_one_line_and_exit_3(args: list[str]) -> None:
    code, out, err = tpx(UNREACHABLE, *args)
    assert (code, out) == (exitcodes.UNAVAILABLE, "")
    assert err.startswith("tpx: cannot reach PostgreSQL at") and err.count("\n") == 1, err


def test_timing_help_names_both_forms() -> None:
    code, out, _ = tpx({}, "timing", "--help")
    assert code == 0
    assert "COMMAND [ARGS]..." in out and "tpx timing DEVICE is short for tpx timing show DEVICE" in out
    assert "show" in out and "recompute" in out

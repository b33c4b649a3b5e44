"""`tpx domain` and TPX_DOMAIN_DEFER: the writers only queue each batch's fixes, a process of its
own writes their timing records; exact, each once, whatever is killed when."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from prometheus_client import CollectorRegistry
from psycopg import sql

from tests.helpers import Serve, add_entries, drained, free_port, wait_for
from tests.test_domain_stage import (
    UNEVEN,
    _column,
    _marked,
    cms_tables,
    domain_settings,  # noqa: F401 (a fixture)
    drive,
    east_fix,
    entries,
    expected,
    repair_pass,
    running,
    stored,
    wait_stored,
)
from tests.test_pipeline import running as engine_running
from tpx.cli.render import domain_line
from tpx.config import Settings
from tpx.connections import search_path
from tpx.domain import Fix
from tpx.domainstage.stage import MARK_SQL, QUEUE_SQL, DomainStage
from tpx.domainstage.worker import Backlog, DomainWorker
from tpx.ops.inspect import status
from tpx.schema import migrate


@contextlib.contextmanager
def worker_running(settings: Settings) -> Iterator[DomainWorker]:
    """`tpx domain`'s worker in this process (its main loop in a thread)."""
    worker = DomainWorker(settings)
    worker.start()
    codes: list[int] = []
    main = threading.Thread(target=lambda: codes.append(worker.run()), name="test-domain-worker")
    main.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        main.join(15)
    assert codes == [0]


@pytest.fixture
def deferred(domain_settings: Settings) -> Settings:  # noqa: F811 (the fixture above)
    # no nice in the tests' own process: it is the worker's, and a nice never comes back
    return domain_settings.model_copy(update={"domain_defer": True, "domain_nice": 0})


@pytest.mark.timeout(90)
def test_a_deferred_newest_first_backlog_is_the_sequential_replay(
    deferred: Settings, rclient: redis.Redis
) -> None:
    # serve writes the positions and queues their fixes, nothing else; the worker, started only
    # after, writes exactly what a sequential replay gives (the backlog arrived newest first)
    s = deferred
    cms_tables(s.database_url, s.db_schema)
    tracks = {f"dev-{i}": drive(f"dev-{i}", 120, seed=i, wiggle=3.0) for i in range(4)}
    for device, fixes in tracks.items():
        add_entries(rclient, s.stream, entries(device, fixes[::-1]))
    total = sum(map(len, tracks.values()))
    with running(s):
        wait_for(lambda: drained(rclient, s, total), what="every position written")
        assert stored(s.database_url, s.db_schema) == []  # serve wrote no timing record
        assert _marked(s) == len(tracks)
        with worker_running(s) as worker:
            wait_stored(s, expected(tracks), "the worker's records")
            wait_for(lambda: _marked(s) == 0, what="the queue taken")
            lag = worker.registry.get_sample_value("tpx_domain_lag_seconds_count")
            assert lag is not None and lag >= 1
    got = stored(s.database_url, s.db_schema)
    assert len(got) == len(expected(tracks)) == 4 * 5  # each once


@pytest.mark.timeout(180)
def test_kill_9_of_serve_and_of_tpx_domain_loses_and_doubles_no_record(
    domain_settings: Settings,  # noqa: F811 (the fixture above)
    serve_env: dict[str, str],
    rclient: redis.Redis,
    tmp_path: Path,
) -> None:
    # 3,000 devices drive through the depot; `tpx serve` (TPX_DOMAIN_DEFER) is killed while it
    # writes, `tpx domain` once some of its passes (500 devices each) have committed; both start
    # again: every record is the sequential replay's, each once, and nothing is left queued
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    tracks = {f"dev-{i:04d}": drive(f"dev-{i:04d}", 45, seed=i, wiggle=3.0) for i in range(3000)}
    total = sum(map(len, tracks.values()))
    env = {**serve_env, "TPX_DOMAIN": "on", "TPX_DOMAIN_DEFER": "true", "TPX_GEOFENCES_RELOAD_S": "0.5"}
    slow = {**env, "TPX_BATCH_SIZE": "100", "TPX_READ_COUNT": "100", "TPX_WRITERS": "1"}  # to be caught
    serve = Serve(slow, tmp_path / "serve-0.log").start()
    try:
        wait_for(lambda: serve.get("/readyz")[0] == 200, timeout=30, what="serve ready")
        add_entries(rclient, s.stream, [e for d, fixes in tracks.items() for e in entries(d, fixes)])
        wait_for(lambda: 0 < _positions(s) < total, timeout=30, every=0.01, what="serve under way")
    finally:
        serve.kill()
    assert _positions(s) < total, "killed after serve was done"
    serve = Serve(env, tmp_path / "serve-1.log").start()
    try:
        wait_for(lambda: drained(rclient, s, total), timeout=60, what="every position written")
        assert stored(s.database_url, s.db_schema) == []
        assert _queued(s) == _positions(s) == total  # every fix queued once, the killed batches' too
        worker_env = {**env, "TPX_HTTP_ADDR": f"127.0.0.1:{free_port()}"}
        worker = Serve(worker_env, tmp_path / "domain-0.log", command="domain").start()
        try:
            wait_for(lambda: worker.get("/readyz")[0] == 200, timeout=30, what="tpx domain ready")
            wait_for(lambda: 0 < _marked(s) < len(tracks), timeout=60, every=0.01, what="worker under way")
        finally:
            worker.kill()
        left = _marked(s)
        assert 0 < left < len(tracks), "killed after the worker was done"
        worker = Serve(worker_env, tmp_path / "domain-1.log", command="domain").start()
        try:
            wait_for(lambda: _marked(s) == 0, timeout=60, what="the queue taken after the restart")
            metrics = worker.get("/metrics")[1]
            assert "tpx_domain_lag_seconds_count" in metrics
        finally:
            assert worker.stop() == 0, worker.logs()[-3000:]
    finally:
        assert serve.stop() == 0, serve.logs()[-3000:]
    got = stored(s.database_url, s.db_schema)
    want = expected(tracks)
    assert len(got) == len(want) == 2 * len(tracks)  # the depot's enter and exit, each once
    assert {tuple(r) for r in got} == want


def _rows(s: Settings, table: str) -> int:
    with psycopg.connect(s.database_url) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(s.db_schema), sql.Identifier(table))
        ).fetchone()
    assert row is not None
    return int(row[0])


def _queued(s: Settings) -> int:
    """Fixes whose records wait: a row each in tpx_domain_missed, a line each in tpx_domain_queue."""
    with psycopg.connect(s.database_url) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {0}.tpx_domain_missed)"
                " + (SELECT count(*) FROM {0}.tpx_domain_queue, string_to_table(fixes, E'\\n'))"
            ).format(sql.Identifier(s.db_schema))
        ).fetchone()
    assert row is not None
    return int(row[0])


def _positions(s: Settings) -> int:
    return _rows(s, "positions")


def _domain(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tpx", "domain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(120)
def test_tpx_domain_with_nothing_to_do_says_why_in_one_line(
    settings: Settings, serve_env: dict[str, str]
) -> None:
    import os

    env = {**os.environ, **serve_env, "TPX_HTTP_ADDR": "off"}
    done = _domain(env)  # the schema not migrated yet: the worker never migrates
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"tpx: schema {settings.db_schema} is at version 0, this tpx needs 10: run `tpx migrate`"
        " (tpx domain never migrates)"
    ]
    migrate(settings.database_url, settings.db_schema)
    done = _domain(env)  # TPX_DOMAIN=auto and no CMS tables
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(": tpx domain has nothing to do"), done.stderr
    done = _domain({**env, "TPX_DOMAIN": "off"})
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (
        2,
        "tpx: TPX_DOMAIN=off: tpx domain has nothing to do",
    )
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_tpx_geofences_reload_reaches_tpx_domain(deferred: Settings) -> None:
    s = deferred.model_copy(update={"geofences_reload_s": 3600.0})  # never by the clock here
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    env = {
        "TPX_REDIS_URL": s.redis_url,
        "TPX_DATABASE_URL": s.database_url,
        "TPX_DB_SCHEMA": s.db_schema,
        "TPX_STREAM": s.stream,
        "COLUMNS": "200",
    }
    with worker_running(s) as worker, running(s):  # a serve that only queues holds no geofences
        before = worker.stage.geofences().generation
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("UPDATE {}.geofences SET exit_margin_m = 25 WHERE id = 1").format(
                    sql.Identifier(s.db_schema)
                )
            )
        wait_for(lambda: len(_replies(env)) == 2, timeout=20, what="both answer")
        assert _replies(env) == {"test-consumer": False, "test-consumer:domain": True}  # who reloads
        wait_for(lambda: worker.stage.geofences().generation != before, timeout=10, what="the edit reloaded")


def _replies(env: dict[str, str]) -> dict[str, bool]:
    """Who answered a `tpx geofences --reload`, and whether each reloads (the worker subscribes in
    its own thread: it may not listen yet at the first ask)."""
    from typer.testing import CliRunner

    from tpx.cli.app import app

    result = CliRunner().invoke(app, ["geofences", "--reload", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return {r["consumer"]: r["reloaded"] for r in json.loads(result.stdout)["reload"]["replies"]}


@pytest.mark.timeout(60)
def test_a_fix_queued_twice_costs_the_batch_nothing_and_gets_its_records_once(
    deferred: Settings, rclient: redis.Redis
) -> None:
    # a fix still waiting when its positions row went (a retention policy) and came again: its
    # batch queues it a second time, which fails nothing (the positions and the queue commit);
    # the worker moves its key once and writes the sequential replay's records, each once
    s = deferred.model_copy(update={"batch_size": 10, "read_count": 10})
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    fixes = drive("dev-q", 30)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(s.db_schema)))
        conn.execute(MARK_SQL, (json.dumps([["dev-q", fixes[2].ts_us]]),))
    add_entries(rclient, s.stream, entries("dev-q", fixes))
    with running(s) as engine:
        wait_for(lambda: drained(rclient, s, len(fixes)), what="every position written")
        assert engine.metrics.count(engine.metrics.stage_errors, stage="domain") == 0
    assert _positions(s) == len(fixes)
    assert _queued(s) == len(fixes) + 1
    with worker_running(s):
        wait_for(lambda: _queued(s) == 0, what="the queue taken")
    got = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in got} == expected({"dev-q": fixes})
    assert len(got) == 1  # the depot's enter, once


@pytest.fixture
def switching(
    domain_settings: Settings,  # noqa: F811 (the fixture above)
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Settings, Settings]:
    """A switch to TPX_DOMAIN_DEFER under way: the settings of an instance that computes the domain
    and of one that defers, two fixes a batch, one writer (two can commit a device's last two
    fixes newest first, a replay of their own), the CMS's tables, no repair but the test's."""
    monkeypatch.setattr("tpx.domainstage.repair.REPAIR_EVERY_S", 3600.0)
    s = domain_settings.model_copy(update={"batch_size": 2, "read_count": 2, "writers": 1})
    cms_tables(s.database_url, s.db_schema)
    return s, s.model_copy(update={"domain_defer": True, "domain_nice": 0})


def _send(rclient: redis.Redis, s: Settings, device: str, fixes: list[Fix], total: int, what: str) -> None:
    """``fixes`` into the stream, and wait until ``total`` entries are written."""
    add_entries(rclient, s.stream, entries(device, fixes))
    wait_for(lambda: drained(rclient, s, total), what=what)


@pytest.mark.timeout(90)
def test_a_late_fix_replayed_while_a_deferred_batch_waits_leaves_its_fixes_to_the_worker(
    switching: tuple[Settings, Settings], rclient: redis.Redis
) -> None:
    # the depot's fixes come through a deferring instance (queued, one row a batch), the rest
    # through one that computes the domain; a late fix older than all comes to the latter, which
    # replays positions, the queued fixes' rows among them. Taken into that history, they would
    # be duplicates to the repair later: the depot's enter and exit never written, those of the
    # long segment from before it to after it kept
    s, deferring = switching
    late = east_fix(2.5, 25)  # between the first two
    with running(s):
        _send(rclient, s, "dev-l", UNEVEN[:2], 2, "the first fixes")
    with running(deferring):
        _send(rclient, s, "dev-l", UNEVEN[2:6], 6, "the depot's fixes queued")
    stage = DomainStage(s)
    with engine_running(s, tx_stage=stage) as engine:
        _send(rclient, s, "dev-l", UNEVEN[6:], 8, "after the depot")
        _send(rclient, s, "dev-l", [late], 9, "the late fix")
        assert engine.metrics.registry.get_sample_value("tpx_domain_replays_total") == 1
        assert _queued(s) == 4  # still in their batches' rows
        repair_pass(s, stage)
    got = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in got} == expected({"dev-l": [*UNEVEN, late]})
    assert len(got) == 2
    assert _queued(s) == 0


@pytest.mark.timeout(90)
def test_a_device_first_seen_by_a_computing_instance_resumes_from_before_what_waits_in_the_queue(
    switching: tuple[Settings, Settings], rclient: redis.Redis
) -> None:
    # the depot's fixes come through a deferring instance (queued: no device state stored), the
    # rest through one that computes the domain and has never seen the device: it resumes from
    # positions, from before the oldest fix that waits. Resumed from the newest fix before its
    # own, a queued one, the device would be inside the depot without its enter, and the repair
    # would find the queued fixes behind its state (duplicates): the enter never written
    s, deferring = switching
    with running(deferring):
        _send(rclient, s, "dev-c", UNEVEN[:6], 6, "the first fixes queued")
    stage = DomainStage(s)
    with engine_running(s, tx_stage=stage):
        _send(rclient, s, "dev-c", UNEVEN[6:], 8, "after the depot")
        assert _queued(s) == 6
        repair_pass(s, stage)
    got = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in got} == expected({"dev-c": UNEVEN})
    assert len(got) == 2
    assert _queued(s) == 0


@pytest.mark.timeout(90)
def test_a_batch_queued_while_a_repair_round_runs_is_taken_in_that_round(
    switching: tuple[Settings, Settings], rclient: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a round takes a device a pass (in device order); a batch of dev-z queued after its first
    # pass is moved by the next one, so the round's later passes take it, as a serve under load
    # queues batches while `tpx domain` works (moved once a round, they would wait a round more:
    # the lag at 5,000 rec/s went from p99 <= 1 s to <= 5 s)
    monkeypatch.setattr("tpx.domainstage.repair.REPAIR_DEVICES", 1)
    s, deferring = switching
    devices = ["dev-a", "dev-b", "dev-z"]
    with running(deferring):
        for n, device in enumerate(devices, 1):
            _send(rclient, s, device, UNEVEN, n * len(UNEVEN), f"{device}'s fixes queued")
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(search_path(s))
        later = conn.execute(
            "DELETE FROM tpx_domain_queue WHERE fixes LIKE 'dev-z %' RETURNING fixes"
        ).fetchall()
    assert sum(len(fixes.split()) // 2 for (fixes,) in later) == len(UNEVEN)
    passes: list[float] = []

    class QueueLater:  # after each pass: dev-z's batches come after the first
        def busy(self) -> bool:
            return False

        def give_way(self, spent: float, stop: threading.Event) -> None:
            passes.append(spent)
            if len(passes) == 1:
                with psycopg.connect(s.database_url, autocommit=True) as conn:
                    conn.execute(search_path(s))
                    for (fixes,) in later:
                        conn.execute(QUEUE_SQL, (fixes,))

    stage, stop = DomainStage(s), threading.Event()
    stage.open(CollectorRegistry(), stop)
    stage.repair.yields_to = QueueLater()
    try:
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(search_path(s))
            stage.repair.drain(conn, stop)
    finally:
        stop.set()
    assert _queued(s) == 0
    got = stored(s.database_url, s.db_schema)
    assert {tuple(r) for r in got} == expected(dict.fromkeys(devices, UNEVEN))
    assert len(got) == 2 * len(devices)
    assert len(passes) == len(devices) + 1  # the last finds nothing after dev-z


@pytest.mark.timeout(60)
def test_while_serve_has_a_backlog_a_pass_takes_a_tenth(
    domain_settings: Settings,  # noqa: F811 (the fixture above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 60 devices wait; with serve behind, a pass takes 50 of them (BUSY_REPAIR_DEVICES), so that
    # serve never loses the CPU for long; with serve caught up, the next takes the rest. A device
    # with more fixes than a pass takes (BUSY_REPAIR_FIXES) takes them in several
    monkeypatch.setattr("tpx.domainstage.repair.REPAIR_EVERY_S", 3600.0)  # only the passes below
    s = domain_settings
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute(search_path(s))
        conn.execute(MARK_SQL, (json.dumps([[f"dev-{i:02d}", 1_796_000_000_000_000] for i in range(60)]),))

    class Serve:
        behind = True

        def busy(self) -> bool:
            return self.behind

        def give_way(self, spent: float, stop: threading.Event) -> None:
            pass

    serve = Serve()
    stage, stop = DomainStage(s), threading.Event()
    stage.open(CollectorRegistry(), stop)
    stage.repair.yields_to = serve
    try:
        with psycopg.connect(s.database_url, autocommit=True) as conn:
            conn.execute(search_path(s))
            assert stage.repair.run(conn) == "dev-49"
            assert _marked(s) == 10
            serve.behind = False
            assert stage.repair.run(conn, "dev-49") == ""
            assert _marked(s) == 0
            # one device with 2,500 fixes waiting: 2,000 of them a pass (BUSY_REPAIR_FIXES)
            conn.execute(MARK_SQL, (json.dumps([["dev-m", 1_796_000_000_000_000 + i] for i in range(2500)]),))
            serve.behind = True
            stage.repair.run(conn)
            assert _queued(s) == 500
    finally:
        stop.set()


@pytest.mark.timeout(30)
def test_tpx_domain_gives_way_while_serve_has_a_backlog(settings: Settings, rclient: redis.Redis) -> None:
    # the group's lag above a batch: a pass of 1 s is followed by 9 s of waiting (a tenth of the
    # time to the domain), cut short once serve has caught up; once serve has read everything, none
    s = settings.model_copy(update={"batch_size": 10})
    add_entries(rclient, s.stream, entries("dev-b", drive("dev-b", 250)))  # 50 entries
    rclient.xgroup_create(s.stream, s.group, id="0")
    assert Backlog(s, rclient).pause(1.0) == pytest.approx(9.0)
    waiting, stop = Backlog(s, rclient), threading.Event()
    waiter = threading.Thread(target=waiting.give_way, args=(10.0, stop), name="test-give-way", daemon=True)
    waiter.start()  # 90 s to wait while the backlog lasts
    try:
        wait_for(Backlog(s, rclient).busy, what="the backlog there")  # (its own look)
        waiter.join(0.6)  # a look of the waiter's since: still behind
        assert waiter.is_alive()
        rclient.xreadgroup(s.group, "serve-1", {s.stream: ">"}, count=45)
        waiter.join(5)  # serve caught up: the wait ends at its next look, not 90 s later
        assert not waiter.is_alive()
    finally:
        stop.set()
    assert Backlog(s, rclient).pause(1.0) == 0.0  # 5 left: under a batch
    assert Backlog(s.model_copy(update={"group": "nobody"}), rclient).pause(1.0) == 0.0
    # a stale counter (as an AOF reload leaves Redis 7.0's): at the stream's end, lag 50 reported
    rclient.execute_command("XGROUP", "SETID", s.stream, s.group, "$", "ENTRIESREAD", "0")  # type: ignore[no-untyped-call]
    assert rclient.xinfo_groups(s.stream)[0]["lag"] == 50
    assert Backlog(s, rclient).pause(1.0) == 0.0


@pytest.mark.timeout(60)
def test_tpx_status_says_whether_a_tpx_domain_takes_what_serve_defers(
    deferred: Settings, rclient: redis.Redis
) -> None:
    # serve defers: with no `tpx domain` alive its fixes wait for nobody, and `tpx status` says
    # so; with one, it names it and what waits; a clean stop of the worker says so at once
    s = deferred
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)

    def line() -> str:
        return domain_line(status(rclient, s, probe=False))

    with running(s):
        wait_for(lambda: status(rclient, s, probe=False).deferring == [s.consumer], what="serve's heartbeat")
        assert line().startswith("1 instance defers to tpx domain; no tpx domain alive")
        with worker_running(s):
            wait_for(lambda: "alive," in line(), what="the worker's heartbeat")
            assert line() == f"1 instance defers to tpx domain; {s.consumer}:domain alive, 0 devices waiting"
            workers = status(rclient, s, probe=False).to_dict()["domain_workers"]  # `tpx status --json`
            assert [w["consumer"] for w in workers] == [f"{s.consumer}:domain"]
        assert "no tpx domain alive" in line()


@pytest.mark.timeout(60)
def test_tpx_domain_says_while_the_cms_refuses_its_records(deferred: Settings, rclient: redis.Redis) -> None:
    # a column dropped in the timing table after the worker started: every pass fails, /readyz
    # notes why; the column back, the records come and the note goes
    s = deferred
    cms_tables(s.database_url, s.db_schema)
    migrate(s.database_url, s.db_schema)
    tracks = {"dev-r": drive("dev-r", 120)}
    with worker_running(s) as worker:
        _column(s, "DROP COLUMN direction")
        add_entries(rclient, s.stream, entries("dev-r", tracks["dev-r"]))
        with running(s):
            wait_for(lambda: drained(rclient, s, len(tracks["dev-r"])), what="every position written")
        wait_for(lambda: "domain repair failing: UndefinedColumn" in str(worker.ready()[1]), what="the note")
        assert worker.ready()[0]  # the positions flow: ready, with the note
        assert _marked(s) == 1
        _column(s, "ADD COLUMN direction integer")
        wait_stored(s, expected(tracks), "the records once the table takes them")
        wait_for(lambda: "notes" not in worker.ready()[1], what="the note gone")

"""The engine in-process against real Redis and Postgres: decode -> write -> ack."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
import redis
from psycopg import sql

from tests.helpers import (
    NOW_MS,
    add_entries,
    drained,
    pending_count,
    record,
    row_count,
    rows,
    wait_for,
    xrange,
)
from tpx.config import Settings
from tpx.engine.budget import BatchQueue
from tpx.engine.commit import CREATE_STAGE_SQL
from tpx.engine.metrics import Metrics
from tpx.engine.reader import Reader
from tpx.engine.service import Engine
from tpx.engine.stages import Committed
from tpx.schema import migrate


@contextlib.contextmanager
def running(settings: Settings, **kw) -> Iterator[Engine]:
    hook = threading.excepthook
    engine = Engine(settings, **kw)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()
        threading.excepthook = hook


def test_valid_rows_written_and_poison_dead_lettered(settings: Settings, rclient: redis.Redis) -> None:
    good = [record(f"dev-{i % 7}", ts=NOW_MS - 100_000 + i) for i in range(300)]
    poison = [
        {"device_id": "bad device", "record": json.dumps({"ts": NOW_MS, "lat": 1, "lon": 1})},
        {"device_id": "dev-1", "record": "{not json"},
        {"device_id": "dev-1", "record": json.dumps({"ts": NOW_MS, "lat": 91, "lon": 1}), "x-extra": "kept"},
        {
            "device_id": "dev-1",
            "record": json.dumps({"ts": NOW_MS, "lat": 1, "lon": 1, "io": {"a": {"__bytes__": "%%"}}}),
        },
        {"record": json.dumps({"ts": NOW_MS, "lat": 1, "lon": 1})},
    ]
    entries = good[:100] + poison[:2] + good[100:200] + poison[2:] + good[200:]
    ids = add_entries(rclient, settings.stream, entries)
    with running(settings) as engine:
        wait_for(lambda: drained(rclient, settings, 300), what="300 rows and nothing pending")
        assert engine.metrics.count(engine.metrics.written) == 300

    assert len(set(rows(settings.database_url, settings.db_schema))) == 300
    letters = xrange(rclient, settings.dlq_stream)
    assert len(letters) == len(poison)
    poison_ids = [ids[100], ids[101], ids[202], ids[203], ids[204]]
    by_source = {f[b"dlq_source_id"]: f for _, f in letters}
    assert set(by_source) == set(poison_ids)
    third = by_source[ids[202]]
    assert third[b"x-extra"] == b"kept" and third[b"device_id"] == b"dev-1"
    assert third[b"record"] == poison[2]["record"].encode()
    assert third[b"dlq_stage"] == b"decode"
    assert third[b"dlq_error"] == b"record.lat out of range -90..90: 91"
    assert third[b"dlq_deliveries"] == b"1"
    assert third[b"dlq_consumer"] == b"test-consumer"
    assert abs(int(third[b"dlq_at"]) - time.time() * 1000) < 120_000
    # each reason names the offending field and value (CONTRACT.md §3)
    reasons = {i: by_source[ids[i]][b"dlq_error"].decode() for i in (100, 101, 203, 204)}
    assert reasons[100] == 'device_id is invalid (1-64 of A-Z a-z 0-9 . _ : -): "bad device"'
    assert reasons[101].startswith("record: not valid JSON (") and "line 1 column 2" in reasons[101]
    assert reasons[203] == 'record.io.a: __bytes__ is not valid base64: "%%"'
    assert reasons[204] == "device_id is missing"


def test_row_values_match_the_record(settings: Settings, rclient: redis.Redis) -> None:
    add_entries(
        rclient,
        settings.stream,
        [
            record("dev-a", ts="2026-01-02T03:04:05.678901+00:00", satellites=0),
            record("dev-b", ts=NOW_MS - 5000, lat=0, lon=0, io=None, alt=None),
        ],
    )
    with running(settings):
        wait_for(lambda: drained(rclient, settings, 2), what="2 rows")
    got = rows(
        settings.database_url,
        settings.db_schema,
        "device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, "
        "event_io_id, valid, attributes, received_at, ingested_at",
    )
    a, b = got
    assert a[:11] == (
        "dev-a",
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        54.6872,
        25.2797,
        112.0,
        90.0,
        42.5,
        0,
        0,
        0,
        False,
    )
    assert a[11] == {"1": 1, "66": 12850, "16": 18446744073709551615, "78": "010203"}
    assert a[12] == datetime.fromtimestamp(NOW_MS / 1000, UTC)
    assert abs((a[13] - datetime.now(UTC)).total_seconds()) < 120
    assert b[0] == "dev-b" and b[4] is None and b[10] is False and b[11] == {}


def test_duplicates_within_and_across_batches_first_write_wins(
    settings: Settings, rclient: redis.Redis
) -> None:
    ts = NOW_MS - 60_000
    add_entries(
        rclient,
        settings.stream,
        [
            record("dup", ts=ts, lat=1.0),
            record("dup", ts=ts, lat=2.0),  # same batch, same key
            record("dup", ts=ts + 1, lat=3.0),
        ],
    )
    with running(settings) as engine:
        wait_for(lambda: drained(rclient, settings, 2), what="2 rows")
        # a later batch: one stored key, one new
        add_entries(
            rclient, settings.stream, [record("dup", ts=ts, lat=4.0), record("dup", ts=ts + 2, lat=5.0)]
        )
        wait_for(lambda: engine.metrics.count(engine.metrics.duplicates) == 2, what="2 duplicates counted")
        wait_for(lambda: pending_count(rclient, settings.stream) == 0, what="all acknowledged")
        state = engine.states.get("dup")
        # the stored key counts as a duplicate, the new row of the same batch as written (how the
        # batch went: tests/test_commit.py::test_perf_path_plain_copy_first_then_on_conflict_for_a_while)
        assert engine.metrics.count(engine.metrics.written) == 3
    assert rows(settings.database_url, settings.db_schema, "latitude") == [(1.0,), (3.0,), (5.0,)]
    assert state is not None and state.records == 3 and state.duplicates == 2


@pytest.mark.parametrize("collation", ['"C"', '"default"'])
def test_the_staging_table_follows_the_device_id_collation(
    pg_server_url: str, schema: str, collation: str
) -> None:
    """Mixed collations would make the duplicate lookup unable to use the primary key."""
    migrate(pg_server_url, schema)
    with psycopg.connect(pg_server_url) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE {} ALTER COLUMN device_id TYPE text COLLATE {}").format(
                sql.Identifier(schema, "positions"), sql.SQL(collation)
            )
        )
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(CREATE_STAGE_SQL)
        found = conn.execute(
            "SELECT attcollation::regcollation::text FROM pg_attribute"
            " WHERE attrelid = 'tpx_stage'::regclass AND attname = 'device_id'"
        ).fetchone()
    assert found == (collation,)


def test_a_table_that_kept_its_collation_still_dedupes(settings: Settings, rclient: redis.Redis) -> None:
    """positions from before migration 002 (device_id in the database's collation): the staging
    table follows it, so the duplicate lookup still joins on the primary key."""
    migrate(settings.database_url, settings.db_schema)
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            sql.SQL('ALTER TABLE {} ALTER COLUMN device_id TYPE text COLLATE "default"').format(
                sql.Identifier(settings.db_schema, "positions")
            )
        )
    ts = NOW_MS - 60_000
    add_entries(rclient, settings.stream, [record("kept", ts=ts, lat=1.0), record("kept", ts=ts + 1)])
    with running(settings) as engine:
        wait_for(lambda: drained(rclient, settings, 2), what="2 rows")
        add_entries(rclient, settings.stream, [record("kept", ts=ts, lat=4.0)])  # already stored
        wait_for(lambda: engine.metrics.count(engine.metrics.duplicates) == 1, what="1 duplicate counted")
        wait_for(lambda: pending_count(rclient, settings.stream) == 0, what="all acknowledged")
    assert rows(settings.database_url, settings.db_schema, "latitude") == [(1.0,), (54.6872,)]


@pytest.mark.parametrize("order", ["same", "reversed"])
def test_two_engines_writing_the_same_keys_store_each_once(
    settings: Settings, rclient: redis.Redis, order: str
) -> None:
    """Two writers racing on the same keys: one waits for the other's keys and stores the rest.
    In opposite orders they can also deadlock: PostgreSQL aborts one, which retries its batch."""
    other = settings.model_copy(update={"stream": settings.stream + ":twin", "consumer": "twin"})
    entries = [record(f"race-{i % 50}", ts=NOW_MS - 600_000 + i) for i in range(3000)]
    try:
        add_entries(rclient, settings.stream, entries)
        add_entries(rclient, other.stream, entries if order == "same" else entries[::-1])
        with running(settings) as one, running(other) as two:

            def done() -> float:
                return sum(
                    e.metrics.count(e.metrics.written) + e.metrics.count(e.metrics.duplicates)
                    for e in (one, two)
                )

            wait_for(lambda: done() == 6000, what="6,000 records written or counted duplicate", timeout=60)
            wait_for(
                lambda: pending_count(rclient, settings.stream) + pending_count(rclient, other.stream) == 0,
                what="both streams acknowledged",
            )
            written = one.metrics.count(one.metrics.written) + two.metrics.count(two.metrics.written)
            duplicates = one.metrics.count(one.metrics.duplicates) + two.metrics.count(two.metrics.duplicates)
    finally:
        rclient.delete(other.stream, other.stream + ":dlq")
    assert row_count(settings.database_url, settings.db_schema) == 3000
    assert (written, duplicates) == (3000, 3000)
    assert rclient.xlen(settings.stream + ":dlq") == 0


def test_a_writer_aborted_by_a_deadlock_retries_its_batch(settings: Settings, rclient: redis.Redis) -> None:
    """Another transaction holds key b and then asks for key a while the writer's COPY holds a and
    waits for b: PostgreSQL aborts the writer (its deadlock_timeout is the shorter), the writer
    retries its batch like any transient failure, finds both keys stored, and counts duplicates."""
    migrate(settings.database_url, settings.db_schema)
    ts_a, ts_b = NOW_MS - 60_000, NOW_MS - 59_000
    insert = sql.SQL(
        "INSERT INTO {}.positions (device_id, ts, latitude, longitude, valid)"
        " VALUES ('dl', to_timestamp(%s / 1000.0), 7.0, 7.0, true)"
    ).format(sql.Identifier(settings.db_schema))
    other = psycopg.connect(settings.database_url)
    other.execute("SET deadlock_timeout = '60s'")  # the writer's check (1 s) runs first
    other.execute(insert, (ts_b,))  # holds b, uncommitted
    add_entries(rclient, settings.stream, [record("dl", ts=ts_a), record("dl", ts=ts_b)])

    def writer_waits_for_a_lock() -> bool:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            found = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'tpx:test-consumer' AND wait_event_type = 'Lock'"
            ).fetchone()
        return found is not None and found[0] > 0

    def then_ask_for_a() -> None:
        other.execute(insert, (ts_a,))  # waits for the writer's a until the writer is aborted
        other.commit()

    try:
        with running(settings) as engine:
            wait_for(writer_waits_for_a_lock, what="the writer's COPY waiting for key b")
            asker = threading.Thread(target=then_ask_for_a, name="test-other-transaction")
            asker.start()
            asker.join(timeout=30)
            assert not asker.is_alive()
            wait_for(
                lambda: engine.metrics.count(engine.metrics.duplicates) == 2, what="both counted duplicate"
            )
            wait_for(lambda: pending_count(rclient, settings.stream) == 0, what="both acknowledged")
            assert engine.metrics.count(engine.metrics.retries) >= 1
            assert engine.metrics.count(engine.metrics.written) == 0
    finally:
        other.close()
    assert rows(settings.database_url, settings.db_schema, "latitude") == [(7.0,), (7.0,)]
    assert rclient.xlen(settings.dlq_stream) == 0


def test_restart_rereads_own_pending_entries(settings: Settings, rclient: redis.Redis) -> None:
    rclient.xgroup_create(settings.stream, settings.group, id="0", mkstream=True)
    add_entries(rclient, settings.stream, [record("p", ts=NOW_MS - 10_000 + i) for i in range(50)])
    # a previous life of this consumer read them and died before writing
    rclient.xreadgroup(settings.group, settings.consumer, {settings.stream: ">"}, count=50)
    assert pending_count(rclient, settings.stream) == 50
    add_entries(rclient, settings.stream, [record("p", ts=NOW_MS - 20_000 + i) for i in range(10)])
    with running(settings):
        wait_for(lambda: drained(rclient, settings, 60), what="60 rows and nothing pending")


def test_cold_devices_are_seeded_from_positions(settings: Settings, rclient: redis.Redis) -> None:
    newest = NOW_MS - 1000
    add_entries(
        rclient,
        settings.stream,
        [
            record("seed-1", ts=newest - 5000),
            record("seed-1", ts=newest, lat=10.0),
            record("seed-2", ts=newest, lat=20.0),
        ],
    )
    with running(settings):
        wait_for(lambda: drained(rclient, settings, 3), what="3 rows")
    # a new process: empty cache; a late record for seed-1, a new one for seed-2, a new device
    add_entries(
        rclient,
        settings.stream,
        [
            record("seed-1", ts=newest - 3000, lat=11.0),
            record("seed-2", ts=newest + 10, lat=21.0),
            record("seed-3", ts=newest, lat=30.0),
        ],
    )
    with running(settings) as engine:
        wait_for(lambda: drained(rclient, settings, 6), what="6 rows")
        one, two, three = (engine.states.get(d) for d in ("seed-1", "seed-2", "seed-3"))
        assert engine.states.rehydrations == 3
    assert (
        one is not None and one.latitude == 10.0 and one.last_ts_us == newest * 1000 and one.out_of_order == 1
    )
    assert two is not None and two.latitude == 21.0 and two.out_of_order == 0
    assert three is not None and three.latitude == 30.0


def test_a_batch_is_flushed_by_the_latency_bound(settings: Settings, rclient: redis.Redis) -> None:
    s = settings.model_copy(update={"batch_size": 10_000, "batch_max_latency_ms": 100})
    with running(s):
        add_entries(rclient, s.stream, [record("lonely")])
        started = time.monotonic()
        wait_for(lambda: drained(rclient, s, 1), timeout=10, what="one lonely record written")
        assert time.monotonic() - started < 5


def test_memory_stays_bounded_under_backlog(settings: Settings, rclient: redis.Redis) -> None:
    s = settings.model_copy(update={"batch_size": 100, "read_count": 100, "queue_batches": 1, "writers": 1})
    total = 20_000
    add_entries(rclient, s.stream, [record(f"b{i % 50}", ts=NOW_MS - 1_000_000 + i) for i in range(total)])
    # queued, being written, waiting to be queued, asked ahead; plus what the open batch keeps
    # below batch_size (pages start at one entry after a start, so they need not align with batches)
    bound = (s.queue_batches + s.writers + 1) * s.batch_size + s.read_count + s.batch_size - 1
    peak = 0
    with running(s):

        def done() -> bool:
            nonlocal peak
            peak = max(peak, pending_count(rclient, s.stream))
            return row_count(s.database_url, s.db_schema) == total and pending_count(rclient, s.stream) == 0

        wait_for(done, timeout=90, what="backlog drained", every=0.01)
    assert 0 < peak <= bound, (peak, bound)


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[Committed] = []

    def on_commit(self, committed: Committed) -> None:
        self.seen.append(committed)


class Exploding:
    name = "exploding"

    def on_commit(self, committed: Committed) -> None:
        raise RuntimeError("domain bug")


def test_post_commit_stages_see_committed_rows_and_cannot_break_the_pipeline(
    settings: Settings, rclient: redis.Redis
) -> None:
    recorder = Recorder()
    add_entries(rclient, settings.stream, [record("st", ts=NOW_MS - i) for i in range(20)])
    with running(settings, stages=[Exploding(), recorder]) as engine:
        wait_for(lambda: drained(rclient, settings, 20), what="20 rows despite a failing stage")
        wait_for(lambda: sum(len(c.inserted) for c in recorder.seen) == 20, what="stage saw 20 rows")
        assert engine.metrics.count(engine.metrics.stage_errors, stage="exploding") >= 1


def test_write_refusals_are_isolated_and_dead_lettered(settings: Settings, rclient: redis.Redis) -> None:
    s = settings.model_copy(update={"max_deliveries": 1})
    bad_io = {"s": "nul\u0000inside"}  # jsonb refuses \u0000, in a value or a key
    entries = [record("w", ts=NOW_MS - 1000 + i) for i in range(30)]
    entries[0] = record("w", ts=NOW_MS - 5000, io=bad_io)
    entries[15] = record("w", ts=NOW_MS - 5001, io={"k\u0000": 1})
    entries[29] = record("w", ts=NOW_MS - 5002, io=bad_io)
    entries[7] = record("w", ts=NOW_MS - 5003, alt=1e39)  # a real cannot hold it: caught at decode
    add_entries(rclient, s.stream, entries)
    with running(s) as engine:
        wait_for(lambda: drained(rclient, s, 26), what="26 good rows, nothing pending")
        assert engine.metrics.count(engine.metrics.dead_lettered, stage="write") == 3
    letters = [f for _, f in xrange(rclient, s.dlq_stream)]
    assert sorted(f[b"dlq_stage"] for f in letters) == [b"decode"] + [b"write"] * 3
    assert all(f[b"record"] and f[b"device_id"] == b"w" for f in letters)
    errors = [f[b"dlq_error"] for f in letters if f[b"dlq_stage"] == b"write"]
    assert all(b"Unicode" in error for error in errors)
    [decode_error] = [f[b"dlq_error"] for f in letters if f[b"dlq_stage"] == b"decode"]
    assert b"record.alt out of range for a real" in decode_error


def test_schema_search_path_keeps_other_schemas_apart(
    settings: Settings, rclient: redis.Redis, pg_server_url: str
) -> None:
    add_entries(rclient, settings.stream, [record("iso")])
    with running(settings):
        wait_for(lambda: drained(rclient, settings, 1), what="1 row")
    with psycopg.connect(pg_server_url) as conn:
        found = conn.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'positions'"
            " AND table_schema = %s",
            (settings.db_schema,),
        ).fetchall()
        assert found == [(settings.db_schema,)]
        conn.execute(sql.SQL("SELECT 1 FROM {}.positions").format(sql.Identifier(settings.db_schema)))


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_replies_are_read_alike_over_resp2_and_resp3(
    settings: Settings, rclient: redis.Redis, protocol: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader parses XREADGROUP and XAUTOCLAIM replies itself: both reply shapes, all four paths
    (own pending, claimed, new, and new pages asked for ahead: pages of 4 make some full)."""
    sep = "&" if "?" in settings.redis_url else "?"
    s = settings.model_copy(
        update={
            "redis_url": f"{settings.redis_url}{sep}protocol={protocol}",
            "claim_idle_ms": 100,
            "claim_interval_s": 0.2,
            "read_count": 4,
        }
    )
    sent_ahead: list[int] = []
    send = Reader._send_read_ahead

    def send_counted(self: Reader) -> None:
        sent_ahead.append(1)
        send(self)

    monkeypatch.setattr(Reader, "_send_read_ahead", send_counted)
    rclient.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    add_entries(rclient, s.stream, [record("dead", ts=NOW_MS - 10_000 + i) for i in range(10)])
    rclient.xreadgroup(s.group, "gone", {s.stream: ">"}, count=10)  # a dead consumer's: claimed
    add_entries(rclient, s.stream, [record("own", ts=NOW_MS - 10_000 + i) for i in range(10)])
    rclient.xreadgroup(s.group, s.consumer, {s.stream: ">"}, count=10)  # our own pending: re-read
    poison = {"device_id": "new", "record": "{not json", "x-extra": "kept"}
    add_entries(rclient, s.stream, [record("new", ts=NOW_MS - 10_000 + i) for i in range(10)] + [poison])
    with running(s) as engine:  # the sweep claims the dead consumer's once they are idle 100 ms
        wait_for(lambda: drained(rclient, s, 30), what="30 rows and nothing pending")
        assert engine.metrics.count(engine.metrics.claimed) == 10
    assert sent_ahead
    assert {r[0] for r in rows(s.database_url, s.db_schema)} == {"dead", "own", "new"}
    [(_, letter)] = xrange(rclient, s.dlq_stream)
    assert letter[b"x-extra"] == b"kept" and letter[b"record"] == b"{not json"


def test_a_page_asked_ahead_that_fails_at_shutdown_does_not_crash_the_reader(
    settings: Settings, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply to the read-ahead that is a Redis error (here: the group was deleted after it was
    sent) is logged at shutdown; the reader stops cleanly instead of dying with a traceback."""
    s = settings.model_copy(update={"read_count": 4})
    rclient.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    add_entries(rclient, s.stream, [record("dev", ts=NOW_MS - 10_000 + i) for i in range(3)])
    stop = threading.Event()
    out = BatchQueue(4, s.queue_bytes)
    client = redis.Redis.from_url(s.redis_url)
    reader = Reader(s, client, out, Metrics(), stop, set())
    rclient.xgroup_destroy(s.stream, s.group)
    reader._send_read_ahead()  # its reply: NOGROUP
    stop.set()
    with caplog.at_level(logging.WARNING, logger="tpx.engine.reader"):
        reader.run()
    assert reader.ahead is None
    assert out.empty()
    assert any(
        "came back as an error" in r.getMessage() and "NOGROUP" in r.getMessage() for r in caplog.records
    )
    client.close()

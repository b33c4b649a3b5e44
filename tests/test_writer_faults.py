"""The writer under faults that are not outages: refused queries, rows, locks, Redis refusals.

Each test makes the real server answer the way the real fault does (issue 13, items 2, 4, 5, 6,
14): PostgreSQL's own errors with their SQLSTATEs, a private redis-server really out of memory,
really holding a key of the wrong type, really a read-only replica.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator

import psycopg
import psycopg.errors
import pytest
import redis
from psycopg import sql

from tests.helpers import (
    NOW_MS,
    add_entries,
    drained,
    free_port,
    pending_count,
    record,
    row_count,
    wait_for,
    xpending_range,
    xrange,
    xreadgroup,
)
from tests.services import PrivateRedis
from tests.test_pipeline import running
from tpx.config import Settings
from tpx.connections import pg_pool, writer_timeouts
from tpx.engine.batch import Batch
from tpx.engine.commit import CREATE_STAGE_SQL
from tpx.engine.metrics import Metrics
from tpx.engine.sqlstate import MAX_REASON_CHARS, Fault, classify, describe
from tpx.engine.state import DeviceStates
from tpx.engine.writer import Writer
from tpx.records import decode_entry
from tpx.schema import migrate

# --- classification (item 4), over psycopg's own exception classes ---


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (psycopg.errors.ProgramLimitExceeded, Fault.ROW),  # 54000, an OperationalError subclass
        (psycopg.errors.UntranslatableCharacter, Fault.ROW),  # 22P05
        (psycopg.errors.UniqueViolation, Fault.ROW),  # 23505
        (psycopg.errors.NotNullViolation, Fault.ROW),  # 23502
        (psycopg.errors.RaiseException, Fault.ROW),  # P0001, a trigger's RAISE
        (psycopg.errors.AdminShutdown, Fault.TRANSIENT),  # 57P01
        (psycopg.errors.QueryCanceled, Fault.TRANSIENT),  # 57014, statement_timeout
        (psycopg.errors.LockNotAvailable, Fault.TRANSIENT),  # 55P03, lock_timeout
        (psycopg.errors.DeadlockDetected, Fault.TRANSIENT),  # 40P01
        (psycopg.errors.SerializationFailure, Fault.TRANSIENT),  # 40001
        (psycopg.errors.TooManyConnections, Fault.TRANSIENT),  # 53300
        (psycopg.errors.DiskFull, Fault.TRANSIENT),  # 53100
        (psycopg.errors.ConnectionFailure, Fault.TRANSIENT),  # 08006
        (psycopg.errors.ReadOnlySqlTransaction, Fault.TRANSIENT),  # 25006, a standby after failover
        (psycopg.errors.InternalError_, Fault.TRANSIENT),  # XX000
        (psycopg.errors.UndefinedColumn, Fault.QUERY),  # 42703, e.g. xmin on a compressed chunk
        (psycopg.errors.UndefinedTable, Fault.QUERY),  # 42P01
        (psycopg.errors.InsufficientPrivilege, Fault.QUERY),  # 42501
        (psycopg.errors.FeatureNotSupported, Fault.QUERY),  # 0A000
        (psycopg.errors.InvalidSchemaName, Fault.QUERY),  # 3F000
        (psycopg.OperationalError, Fault.TRANSIENT),  # no sqlstate: the connection was lost
        (psycopg.DataError, Fault.ROW),  # no sqlstate: psycopg itself cannot send the value
        (psycopg.ProgrammingError, Fault.QUERY),  # no sqlstate: a misuse of the client API
    ],
)
def test_classify_by_sqlstate(error: type[psycopg.Error], fault: Fault) -> None:
    assert classify(error("message")) is fault


def test_pool_timeout_is_retried() -> None:
    from psycopg_pool import PoolTimeout

    assert classify(PoolTimeout("couldn't get a connection after 30.00 sec")) is Fault.TRANSIENT


# --- fixtures ---


@pytest.fixture
def migrated(settings: Settings) -> Settings:
    migrate(settings.database_url, settings.db_schema)
    return settings


def execute(settings: Settings, statement: str) -> None:
    """Run SQL in the test's schema (``{schema}`` is replaced by its quoted name)."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        quoted = sql.Identifier(settings.db_schema).as_string(conn)
        conn.execute(statement.replace("{schema}", quoted).encode())


def health(engine: object) -> list[str]:
    ok, detail = engine.ready()  # type: ignore[attr-defined]
    return [] if ok else list(detail["problems"])


# --- item 2: the ON CONFLICT path reads no system column ---


def test_late_rows_and_duplicates_where_positions_refuses_system_columns(
    migrated: Settings, rclient: redis.Redis
) -> None:
    """A batch that meets stored keys, on a ``positions`` whose system columns cannot be read.

    On TimescaleDB, a compressed chunk refuses ``xmin``: ``InvalidColumnReference: transparent
    decompression only supports tableoid system column`` (42703). Plain PostgreSQL 15 has no
    relation that refuses system columns yet takes both COPY and ``INSERT .. ON CONFLICT (key)``:
    a view refuses them (``ERROR: 42703: column p.xmin does not exist``) and takes ON CONFLICT
    and RETURNING when it is auto-updatable, but COPY into a view needs an INSTEAD OF trigger,
    which then refuses ON CONFLICT (42P10 ``there is no unique or exclusion constraint matching
    the ON CONFLICT specification``); a postgres_fdw foreign partition cannot sit under a primary
    key (``cannot create foreign partition of partitioned table … contains indexes that are
    unique``) and answers ``xmin`` with 0 anyway. So the closest construction: let the writer
    meet a stored key on the real table (its plain COPY fails, and it keeps to the idempotent
    INSERT for PLAIN_COPY_PAUSE_S), then swap ``positions`` for an auto-updatable view over the
    same rows, and send duplicates, late rows and fresh rows: the idempotent path runs against
    a relation where a system column is a 42703, exactly the statement that failed on
    TimescaleDB.
    """
    s = migrated.model_copy(update={"writers": 1})
    base = NOW_MS - 3_600_000
    add_entries(rclient, s.stream, [record("dev-x", ts=base + i) for i in range(20)])
    with running(s) as engine:
        wait_for(lambda: drained(rclient, s, 20), what="the first 20 rows")
        add_entries(
            rclient, s.stream, [record("dev-x", ts=base), *(record("dev-y", ts=base + i) for i in range(5))]
        )
        wait_for(lambda: drained(rclient, s, 25), what="the second batch, through ON CONFLICT")
        assert engine.metrics.count(engine.metrics.insert_fallbacks) == 1

        execute(
            s,
            "ALTER TABLE {schema}.positions RENAME TO positions_data;"
            " CREATE VIEW {schema}.positions AS SELECT * FROM {schema}.positions_data",
        )
        with psycopg.connect(s.database_url) as conn:
            quoted = sql.Identifier(s.db_schema).as_string(conn)
            with pytest.raises(psycopg.errors.UndefinedColumn, match=r"column p\.xmin does not exist"):
                conn.execute(f"SELECT p.xmin FROM {quoted}.positions p".encode())

        duplicates = [record("dev-x", ts=base + i) for i in range(10)]
        late = [record("dev-x", ts=base - 86_400_000 + i) for i in range(10)]  # a day late
        fresh = [record("dev-z", ts=base + i) for i in range(5)]
        add_entries(rclient, s.stream, [*duplicates, *late, *fresh])
        wait_for(lambda: drained(rclient, s, 40), timeout=20, what="late and fresh rows stored")
        wait_for(lambda: engine.metrics.count(engine.metrics.duplicates) == 11, what="11 duplicates counted")
        assert engine.metrics.count(engine.metrics.written) == 40
        assert health(engine) == []


# --- item 4: the row's fault is isolated whatever psycopg's class; the query's is an alert ---


def test_row_refused_with_program_limit_is_isolated_and_dead_lettered(
    migrated: Settings, rclient: redis.Redis
) -> None:
    """``ProgramLimitExceeded: string too long to represent as jsonb string`` (54000) for one row.

    A 270 MB string is too slow for a test; a BEFORE INSERT trigger raising the same message
    with ERRCODE 54000 is the same on the wire: an ERROR with SQLSTATE 54000, session kept.
    """
    s = migrated.model_copy(update={"max_deliveries": 2, "claim_idle_ms": 300, "claim_interval_s": 0.2})
    execute(
        s,
        """
CREATE FUNCTION {schema}.refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.device_id = 'marked' THEN
        RAISE EXCEPTION 'string too long to represent as jsonb string' USING ERRCODE = '54000';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE INSERT ON {schema}.positions
    FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_marked();
""",
    )
    with psycopg.connect(s.database_url) as conn:  # what the writer meets: an ERROR, not a FATAL
        quoted = sql.Identifier(s.db_schema).as_string(conn)
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="string too long"):
            conn.execute(
                f"INSERT INTO {quoted}.positions (device_id, ts, latitude, longitude, valid)"
                " VALUES ('marked', now(), 0, 0, true)".encode()
            )
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)

    entries = [record(f"dev-{i % 5}", ts=NOW_MS - 100_000 + i) for i in range(101)]
    entries[50] = record("marked", ts=NOW_MS - 50_000)
    ids = add_entries(rclient, s.stream, entries)
    with running(s):
        wait_for(lambda: row_count(s.database_url, s.db_schema) == 100, timeout=20, what="the 100 valid rows")
        wait_for(lambda: rclient.xlen(s.dlq_stream) == 1, timeout=20, what="the marked row dead-lettered")
        wait_for(lambda: pending_count(rclient, s.stream) == 0, what="nothing pending")
    letter = xrange(rclient, s.dlq_stream)[0][1]
    assert letter[b"dlq_source_id"] == ids[50]
    assert letter[b"dlq_stage"] == b"write" and letter[b"dlq_deliveries"] == b"2"
    assert b"ProgramLimitExceeded: string too long to represent as jsonb string" in letter[b"dlq_error"]


def test_a_query_the_server_cannot_run_is_retried_not_ready_and_an_error(
    migrated: Settings, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A renamed column: ``column "speed" of relation "positions" does not exist`` (42703)."""
    s = migrated
    execute(s, "ALTER TABLE {schema}.positions RENAME COLUMN speed TO speed_kmh")
    add_entries(rclient, s.stream, [record("dev", ts=NOW_MS - 10_000 + i) for i in range(10)])
    with caplog.at_level(logging.ERROR, logger="tpx.engine.writer"), running(s) as engine:
        problems = wait_for(
            lambda: [p for p in health(engine) if "cannot run its query" in p],
            timeout=10,
            what="not ready: the writer cannot run its query",
        )
        assert "tpx-writer-" in problems[0] and 'column "speed"' in problems[0]
        assert engine.metrics.count(engine.metrics.query_errors) >= 1
        assert any(
            r.levelno == logging.ERROR and "PostgreSQL cannot run the write" in r.getMessage()
            for r in caplog.records
        )
        assert row_count(s.database_url, s.db_schema) == 0 and pending_count(rclient, s.stream) == 10
        execute(s, "ALTER TABLE {schema}.positions RENAME COLUMN speed_kmh TO speed")
        wait_for(lambda: drained(rclient, s, 10), timeout=20, what="the rows once the column is back")
        wait_for(lambda: health(engine) == [], what="ready again")


# --- item 14: a write-stage dead letter names the value ---


def test_write_dead_letter_carries_postgres_detail_and_context(
    settings: Settings, rclient: redis.Redis
) -> None:
    r"""PostgreSQL 15 on ``"\u0000"`` in jsonb: ``ERROR: unsupported Unicode escape sequence``,
    ``DETAIL: \u0000 cannot be converted to text.``, ``CONTEXT: JSON data, line 1: …``."""
    s = settings.model_copy(update={"max_deliveries": 1})
    add_entries(rclient, s.stream, [record("dev", ts=NOW_MS - 5_000, io={"s": "nul\u0000"}), record("dev")])
    with running(s):
        wait_for(lambda: rclient.xlen(s.dlq_stream) == 1, timeout=20, what="the refused record")
        wait_for(lambda: drained(rclient, s, 1), what="the other row")
    error = xrange(rclient, s.dlq_stream)[0][1][b"dlq_error"].decode()
    assert error.startswith("UntranslatableCharacter: unsupported Unicode escape sequence")
    assert "DETAIL: \\u0000 cannot be converted to text." in error
    assert 'CONTEXT: JSON data, line 1: {"s":"nul\\u0000' in error and "column attributes" in error
    assert "\n" not in error and len(error) <= MAX_REASON_CHARS


def test_describe_is_bounded() -> None:
    assert len(describe(psycopg.errors.UniqueViolation("x" * 5000))) == MAX_REASON_CHARS


# --- item 6: a writer blocked on a lock ---


@contextlib.contextmanager
def table_locked(settings: Settings) -> Iterator[None]:
    with psycopg.connect(settings.database_url) as conn:
        quoted = sql.Identifier(settings.db_schema).as_string(conn)
        conn.execute(f"LOCK TABLE {quoted}.positions IN ACCESS EXCLUSIVE MODE".encode())
        yield
        conn.rollback()


def test_a_batch_waiting_on_a_lock_makes_the_instance_not_ready(
    migrated: Settings, rclient: redis.Redis
) -> None:
    s = migrated.model_copy(update={"writer_stall_s": 1.0, "writer_lock_timeout_ms": 60_000})
    with running(s) as engine:
        wait_for(lambda: health(engine) == [], what="ready")
        with table_locked(s):
            started = time.monotonic()
            add_entries(rclient, s.stream, [record("dev", ts=NOW_MS - 10_000 + i) for i in range(10)])
            problems = wait_for(
                lambda: [p for p in health(engine) if "in flight" in p], timeout=10, what="not ready"
            )
            assert time.monotonic() - started < 5
            assert (
                problems[0].startswith("tpx-writer-") and "batch of 10 records in flight for" in problems[0]
            )
        wait_for(lambda: drained(rclient, s, 10), what="the rows once the lock is gone")
        wait_for(lambda: health(engine) == [], what="ready again")


def test_lock_timeout_fails_the_statement_and_the_batch_is_retried(
    migrated: Settings, rclient: redis.Redis
) -> None:
    s = migrated.model_copy(update={"writer_lock_timeout_ms": 300})
    with running(s) as engine:
        with table_locked(s):
            add_entries(rclient, s.stream, [record("dev", ts=NOW_MS - 10_000 + i) for i in range(10)])
            problems = wait_for(
                lambda: [p for p in health(engine) if "LockNotAvailable" in p],
                timeout=10,
                what="lock timeout",
            )
            assert "failing for" in problems[0] and "canceling statement due to lock timeout" in problems[0]
        wait_for(lambda: drained(rclient, s, 10), what="the rows once the lock is gone")
        wait_for(lambda: health(engine) == [], what="ready again")
        assert engine.metrics.count(engine.metrics.written) == 10


# --- item 5 (writer half): Redis refusing a dead letter or an XACK ---

#: redis-py strips the reply's ``OOM`` prefix into the class (OutOfMemoryError); WRONGTYPE is kept
OOM = "command not allowed when used memory > 'maxmemory'."
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


@pytest.mark.parametrize("refusal", ["oom", "wrongtype"])
def test_redis_refusing_dead_letters_keeps_valid_rows_flowing(
    refusal: str, migrated: Settings, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    s = migrated.model_copy(
        update={
            "redis_url": private_redis.url,
            "max_deliveries": 1,
            "claim_idle_ms": 300,
            "claim_interval_s": 0.2,
        }
    )
    client = redis.Redis.from_url(private_redis.url)
    good = [record(f"dev-{i % 3}", ts=NOW_MS - 100_000 + i) for i in range(50)]
    bad = record("bad", ts=NOW_MS - 5_000, io={"s": "nul\u0000"})
    if refusal == "wrongtype":
        client.set(s.dlq_stream, "x")
    client.config_set("maxmemory-policy", "noeviction")
    expected = OOM if refusal == "oom" else WRONGTYPE
    with caplog.at_level(logging.WARNING, logger="tpx.engine.writer"), running(s) as engine:
        # one transaction: the entries arrive and (for "oom") memory runs out in the same instant
        pipe = client.pipeline(transaction=True)
        pipe.xadd(s.stream, bad)  # type: ignore[arg-type]
        for fields in good:
            pipe.xadd(s.stream, fields)  # type: ignore[arg-type]
        if refusal == "oom":
            pipe.config_set("maxmemory", "1")
        bad_id = pipe.execute()[0]
        problems = wait_for(
            lambda: [p for p in health(engine) if "dead letters refused by redis" in p],
            timeout=10,
            what="not ready: redis refuses dead letters",
        )
        assert expected in problems[0]
        wait_for(lambda: row_count(s.database_url, s.db_schema) == 50, what="the valid rows written")
        wait_for(lambda: pending_count(client, s.stream) == 1, what="the valid rows acknowledged")
        assert xpending_range(client, s.stream, s.group, 10)[0]["message_id"] == bad_id
        assert engine.alive()[0]
        assert any(expected in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

        if refusal == "oom":
            client.config_set("maxmemory", "0")
        else:
            client.delete(s.dlq_stream)
        wait_for(
            lambda: client.xlen(s.dlq_stream) == 1, timeout=20, what="the dead letter once redis takes it"
        )
        wait_for(lambda: pending_count(client, s.stream) == 0, what="nothing pending")
        wait_for(lambda: health(engine) == [], what="ready again")
    letter = xrange(client, s.dlq_stream)[0][1]
    assert letter[b"dlq_source_id"] == bad_id and letter[b"dlq_stage"] == b"write"
    client.close()


def test_xack_refused_by_a_read_only_replica_leaves_entries_pending(
    migrated: Settings, private_redis: PrivateRedis
) -> None:
    """``READONLY You can't write against a read only replica.`` (after a failover)."""
    s = migrated.model_copy(update={"redis_url": private_redis.url})
    client = redis.Redis.from_url(private_redis.url)
    client.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    add_entries(client, s.stream, [record("dev", ts=NOW_MS - 10_000 + i) for i in range(10)])
    [[_, entries]] = xreadgroup(client, s.group, s.consumer, {s.stream: ">"})
    now_us = int(time.time() * 1_000_000)
    positions = [decode_entry(i, f, now_us=now_us, max_future_us=86_400_000_000) for i, f in entries]
    client.replicaof("127.0.0.1", free_port())  # a primary nobody answers for: read-only at once
    with pytest.raises(redis.ReadOnlyError, match="You can't write against a read only replica"):
        client.xack(s.stream, s.group, entries[0][0])

    pool = pg_pool(s, 1, "test-writer", [*writer_timeouts(s), CREATE_STAGE_SQL])
    pool.open(wait=True)
    source: queue.Queue[Batch | None] = queue.Queue()
    abort = threading.Event()
    writer = Writer(0, s, pool, client, source, DeviceStates(100), Metrics(), [], abort, set())
    writer.start()
    try:
        source.put(Batch(positions=positions))
        wait_for(lambda: row_count(s.database_url, s.db_schema) == 10, what="the rows committed")
        problem = wait_for(writer.health, timeout=10, what="the writer's health says why")
        assert "XACK refused by redis: You can't write against a read only replica" in problem
        assert writer.is_alive() and pending_count(client, s.stream) == 10
        client.replicaof("NO", "ONE")
        wait_for(lambda: pending_count(client, s.stream) == 0, timeout=15, what="acknowledged after failback")
        wait_for(lambda: writer.health() is None, what="healthy again")
    finally:
        source.put(None)
        abort.set()
        writer.join(10)
        pool.close()
        client.close()
    assert not writer.is_alive()

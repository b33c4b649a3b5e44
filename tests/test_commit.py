"""The write rules, called directly: Committer.commit() on a real pool, asserted on what it returns.

Every batch is made of real pending entries (XADD, then XREADGROUP by the test's consumer),
decoded by the engine's own intake, so the acknowledgements and dead letters are Redis's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql
from psycopg_pool import ConnectionPool

from tests.helpers import NOW_MS, add_entries, pending_count, record, rows, wait_for, xpending_range, xrange
from tests.services import PrivateRedis
from tpx.config import Settings
from tpx.connections import pg_pool, writer_timeouts
from tpx.engine.batch import Batch
from tpx.engine.commit import CREATE_STAGE_SQL, CommitOutcome, Committer
from tpx.engine.intake import raw_replies, read_entries, take_in
from tpx.engine.metrics import Metrics
from tpx.engine.reader import ensure_group
from tpx.engine.state import DeviceStates
from tpx.schema import migrate

#: The record PostgreSQL refuses: jsonb cannot hold U+0000 (``UntranslatableCharacter:
#: unsupported Unicode escape sequence; DETAIL: \u0000 cannot be converted to text.``).
NUL_IO = {"s": "nul\u0000"}


@pytest.fixture
def migrated(settings: Settings) -> Settings:
    migrate(settings.database_url, settings.db_schema)
    return settings


@pytest.fixture
def pool(migrated: Settings) -> Iterator[ConnectionPool]:
    p = pg_pool(migrated, 1, "test-commit", [*writer_timeouts(migrated), CREATE_STAGE_SQL])
    p.open(wait=True)
    yield p
    p.close()


def pending_batch(
    client: redis.Redis, s: Settings, entries: list[dict[str, str]], deliveries: dict[int, int] | None = None
) -> tuple[Batch, list[bytes]]:
    """Add ``entries``, read them as the test's consumer (now pending) and decode them.

    ``deliveries``: delivery counts by index in ``entries`` (absent: a first delivery).
    """
    ensure_group(client, s.stream, s.group)
    ids = add_entries(client, s.stream, entries)
    reply = raw_replies(client).xreadgroup(s.group, s.consumer, {s.stream: ">"}, count=len(entries))
    counts = {ids[i]: n for i, n in (deliveries or {}).items()}
    intake = take_in(read_entries(reply), s, NOW_MS * 1000, counts or None)
    assert not intake.dead_letters, "the test's entries are valid records"
    return Batch(intake.positions, deliveries=intake.deliveries), ids


def keys(positions: Any) -> list[tuple[str, int]]:
    return sorted((p.device_id, p.ts_us // 1000) for p in positions)


def test_a_clean_batch_is_inserted_acknowledged_and_counted(
    migrated: Settings, pool: ConnectionPool, rclient: redis.Redis
) -> None:
    s = migrated
    states = DeviceStates(100)
    committer = Committer(s, pool, rclient, Metrics(), states)
    batch, _ = pending_batch(rclient, s, [record("clean", ts=NOW_MS - 10_000 + i) for i in range(10)])

    out = committer.commit(batch)

    assert len(out.inserted) == 10 and out.duplicates == [] and out.acknowledged == 10
    assert (out.left_pending, out.dead_lettered, out.unacknowledged, out.aborted) == ([], [], 0, False)
    assert len(rows(s.database_url, s.db_schema)) == 10
    assert pending_count(rclient, s.stream) == 0
    state = states.get("clean")
    assert state is not None and state.records == 10 and state.last_ts_us == (NOW_MS - 9_991) * 1000


def test_repeats_inside_a_batch_first_write_wins(
    migrated: Settings, pool: ConnectionPool, rclient: redis.Redis
) -> None:
    s = migrated
    ts = NOW_MS - 60_000
    entries = [
        record("rep", ts=ts, lat=1.0),
        record("rep", ts=ts, lat=2.0),
        record("rep", ts=ts + 1, lat=3.0),
    ]
    batch, _ = pending_batch(rclient, s, entries)

    out = Committer(s, pool, rclient, Metrics(), None).commit(batch)

    assert keys(out.inserted) == [("rep", ts), ("rep", ts + 1)]
    assert [p.latitude for p in out.duplicates] == [2.0]
    assert out.acknowledged == 3 and pending_count(rclient, s.stream) == 0
    assert rows(s.database_url, s.db_schema, "latitude") == [(1.0,), (3.0,)]


def test_keys_already_stored_are_duplicates_and_the_rest_is_written(
    migrated: Settings, pool: ConnectionPool, rclient: redis.Redis
) -> None:
    s = migrated
    ts = NOW_MS - 60_000
    committer = Committer(s, pool, rclient, Metrics(), DeviceStates(100))
    first, _ = pending_batch(rclient, s, [record("old", ts=ts, lat=1.0), record("old", ts=ts + 1, lat=2.0)])
    committer.commit(first)
    again, _ = pending_batch(rclient, s, [record("old", ts=ts, lat=9.0), record("old", ts=ts + 2, lat=3.0)])

    out = committer.commit(again)

    assert keys(out.inserted) == [("old", ts + 2)] and keys(out.duplicates) == [("old", ts)]
    assert out.acknowledged == 2 and pending_count(rclient, s.stream) == 0
    assert rows(s.database_url, s.db_schema, "latitude") == [(1.0,), (2.0,), (3.0,)]


def _with_one_refused(s: Settings, client: redis.Redis, deliveries: int) -> tuple[Batch, list[bytes]]:
    entries = [record("ok", ts=NOW_MS - 50_000 + i) for i in range(9)]
    entries.insert(4, record("nul", ts=NOW_MS - 40_000, io=NUL_IO))
    return pending_batch(client, s, entries, {4: deliveries})


def test_a_refused_row_is_isolated_and_left_pending_below_max_deliveries(
    migrated: Settings, pool: ConnectionPool, rclient: redis.Redis
) -> None:
    s = migrated
    batch, ids = _with_one_refused(s, rclient, deliveries=s.max_deliveries - 1)

    out = Committer(s, pool, rclient, Metrics(), None).commit(batch)

    assert len(out.inserted) == 9 and out.acknowledged == 9 and out.dead_lettered == []
    [(position, reason)] = out.left_pending
    assert position.entry_id == ids[4]
    assert reason.startswith("UntranslatableCharacter: unsupported Unicode escape sequence")
    assert "\\u0000 cannot be converted to text" in reason
    assert len(rows(s.database_url, s.db_schema)) == 9
    assert [r["message_id"] for r in xpending_range(rclient, s.stream, s.group, 10)] == [ids[4]]
    assert rclient.xlen(s.dlq_stream) == 0


def test_a_refused_row_is_dead_lettered_at_max_deliveries(
    migrated: Settings, pool: ConnectionPool, rclient: redis.Redis
) -> None:
    s = migrated
    batch, ids = _with_one_refused(s, rclient, deliveries=s.max_deliveries)

    out = Committer(s, pool, rclient, Metrics(), None).commit(batch)

    assert len(out.inserted) == 9 and out.left_pending == []
    [(position, reason)] = out.dead_lettered
    assert position.entry_id == ids[4] and reason.startswith("UntranslatableCharacter")
    assert pending_count(rclient, s.stream) == 0
    [(_, letter)] = xrange(rclient, s.dlq_stream)
    assert letter[b"dlq_source_id"] == ids[4] and letter[b"dlq_stage"] == b"write"
    assert letter[b"dlq_deliveries"] == str(s.max_deliveries).encode()
    assert letter[b"device_id"] == b"nul"  # the original fields, verbatim
    assert letter[b"dlq_error"].decode() == reason


def test_abort_during_retries_leaves_the_batch_pending(migrated: Settings, rclient: redis.Redis) -> None:
    """A lock held on positions: every attempt ends in ``LockNotAvailable: canceling statement due
    to lock timeout`` (55P03), retried with back-off until the abort event is set."""
    s = migrated.model_copy(update={"writer_lock_timeout_ms": 50})
    pool = pg_pool(s, 1, "test-commit", [*writer_timeouts(s), CREATE_STAGE_SQL])
    pool.open(wait=True)
    committer = Committer(s, pool, rclient, Metrics(), None)
    batch, _ = pending_batch(rclient, s, [record("locked", ts=NOW_MS - 10_000 + i) for i in range(5)])
    abort = threading.Event()
    result: list[CommitOutcome] = []
    holder = psycopg.connect(s.database_url)
    try:
        holder.execute(
            sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(s.db_schema, "positions"))
        )
        thread = threading.Thread(target=lambda: result.append(committer.commit(batch, abort)))
        thread.start()
        wait_for(lambda: committer.health.failing_since is not None, what="the commit retrying")
        assert "lock timeout" in committer.health.last_error
        abort.set()
        thread.join(10)
    finally:
        holder.close()
        pool.close()
    [out] = result
    assert out.aborted and out.retries >= 1
    assert (out.inserted, out.acknowledged) == ([], 0)
    assert pending_count(rclient, s.stream) == 5 and rows(s.database_url, s.db_schema) == []


def test_perf_path_plain_copy_first_then_on_conflict_for_a_while(
    migrated: Settings, pool: ConnectionPool, rclient: redis.Redis
) -> None:
    """The write strategy (README "Speed"): plain COPY until a batch meets a stored key; that
    batch goes again through the staging table and ON CONFLICT, and so do the next ones for
    PLAIN_COPY_PAUSE_S (duplicates come in runs)."""
    s = migrated
    metrics = Metrics()
    committer = Committer(s, pool, rclient, metrics, None)
    ts = NOW_MS - 60_000
    clean, _ = pending_batch(rclient, s, [record("perf", ts=ts + i) for i in range(3)])
    assert committer.commit(clean).fallbacks == 0
    meets, _ = pending_batch(rclient, s, [record("perf", ts=ts), record("perf", ts=ts + 10)])
    out = committer.commit(meets)
    assert out.fallbacks == 1 and len(out.inserted) == 1 and len(out.duplicates) == 1
    after, _ = pending_batch(rclient, s, [record("perf", ts=ts + 11)])
    out = committer.commit(after)
    assert out.fallbacks == 0 and len(out.inserted) == 1  # straight to ON CONFLICT: no attempt undone
    assert metrics.count(metrics.insert_fallbacks) == 1
    assert len(rows(s.database_url, s.db_schema)) == 5


#: Room left in the private Redis: one or two of three ~200 KB dead letters (and the replies that
#: read their originals, which count as used memory too) fit, not all three.
HEADROOM = 500_000


def test_dead_letters_redis_refuses_partly_are_retried_alone_never_added_twice(
    migrated: Settings, pool: ConnectionPool, private_redis: PrivateRedis
) -> None:
    """Redis checks maxmemory before each command: with little room left, the first XADD of a
    pipeline passes and fills it, the next ones answer ``OOM command not allowed when used memory >
    'maxmemory'``. Only those are tried again (once Redis has room): each refused row ends with
    exactly one dead letter."""
    client = private_redis.client
    s = migrated.model_copy(update={"redis_url": private_redis.url, "max_deliveries": 1})
    pad = "x" * 200_000  # each dead letter carries its ~200 KB record verbatim
    entries = [record(f"nul-{i}", ts=NOW_MS - 10_000 + i, io={**NUL_IO, "pad": pad}) for i in range(3)]
    batch, ids = pending_batch(client, s, entries)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", used + HEADROOM)
    committer = Committer(s, pool, client, Metrics(), None)
    result: list[CommitOutcome] = []
    thread = threading.Thread(target=lambda: result.append(committer.commit(batch)))
    thread.start()
    wait_for(lambda: committer.health.dlq_problem is not None, what="Redis refusing a dead letter")
    problem = committer.health.dlq_problem
    assert problem is not None and "command not allowed when used memory" in problem[1]
    assert 1 <= client.xlen(s.dlq_stream) < len(ids)  # some went in, the rest were refused
    client.config_set("maxmemory", 0)  # room again: the retry goes through
    thread.join(30)
    [out] = result
    assert sorted(p.entry_id for p, _ in out.dead_lettered) == sorted(ids) and out.left_pending == []
    letters = xrange(client, s.dlq_stream)
    assert sorted(fields[b"dlq_source_id"] for _, fields in letters) == sorted(ids)  # one each
    assert pending_count(client, s.stream) == 0

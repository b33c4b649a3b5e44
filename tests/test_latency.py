"""Smart batching: a record waits for a free writer, not for a timer (README "Speed").

The engine in-process against real Redis and Postgres. The latency bound is set far above what
the tests wait for, so a record written within seconds was not waiting for it; the rows'
``ingested_at`` (the writing transaction's start) tells which records were committed together.
"""

from __future__ import annotations

from collections import Counter

import psycopg
import redis
from psycopg import sql

from tests.helpers import NOW_MS, add_entries, drained, record, row_count, rows, wait_for
from tests.test_pipeline import running  # the engine in-process, shut down afterwards
from tpx.config import Settings

#: The latency ceiling in these tests (ms): far longer than any wait they allow.
CEILING_MS = 10_000
#: Seconds a record may take to be written by an idle writer here (a shared, loaded machine).
PROMPT_S = 3.0


def _waiting_writes(conn: psycopg.Connection, schema: str) -> int:
    """Writes to this test's positions table queued behind the test's lock."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted",
        (f'"{schema}".positions',),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_lone_record_is_written_at_once_by_an_idle_writer(settings: Settings, rclient: redis.Redis) -> None:
    s = settings.model_copy(update={"batch_max_latency_ms": CEILING_MS})
    with running(s):
        wait_for(lambda: rclient.xinfo_groups(s.stream), what="the consumer group")
        add_entries(rclient, s.stream, [record("lonely")])
        wait_for(
            lambda: drained(rclient, s, 1),
            timeout=PROMPT_S,
            what=f"the record written long before the {CEILING_MS} ms ceiling",
        )
        # and the next one too: an idle writer takes each record as it comes
        add_entries(rclient, s.stream, [record("lonely", ts=NOW_MS - 1000)])
        wait_for(lambda: drained(rclient, s, 2), timeout=PROMPT_S, what="the second record written")


def test_records_accumulate_into_one_batch_while_every_writer_is_busy(
    settings: Settings, rclient: redis.Redis
) -> None:
    """Both writers wait on a lock held on positions; what arrives meanwhile is one batch."""
    s = settings.model_copy(update={"batch_max_latency_ms": CEILING_MS, "writers": 2})
    later = 10
    with running(s) as engine, psycopg.connect(s.database_url) as locker:
        wait_for(lambda: rclient.xinfo_groups(s.stream), what="the consumer group")
        locker.execute(
            sql.SQL("LOCK TABLE {}.positions IN SHARE MODE").format(sql.Identifier(s.db_schema))
        )  # blocks COPY and INSERT, not reads
        for i, device in enumerate(("first", "second"), start=1):
            add_entries(rclient, s.stream, [record(device)])

            def busy(writers: int = i) -> bool:
                return _waiting_writes(locker, s.db_schema) == writers

            wait_for(busy, what=f"writer {i} busy")
        for i in range(later):  # one XADD each: the reader sees them one read at a time
            add_entries(rclient, s.stream, [record("later", ts=NOW_MS - 100_000 + i)])
        wait_for(
            lambda: engine.metrics.count(engine.metrics.read) == 2 + later,
            what="every record read while both writers wait",
        )
        assert row_count(s.database_url, s.db_schema) == 0  # nothing committed behind the lock
        locker.rollback()  # the writers go on
        wait_for(lambda: drained(rclient, s, 2 + later), timeout=PROMPT_S, what="every record written")

    written = rows(s.database_url, s.db_schema, "device_id, ingested_at")
    by_commit = Counter(ingested_at for _, ingested_at in written)
    assert sorted(by_commit.values()) == [1, 1, later], by_commit
    together = {ingested_at for device, ingested_at in written if device == "later"}
    assert len(together) == 1  # the records that came while the writers were busy: one batch

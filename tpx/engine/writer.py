"""Writer threads: COPY a batch into positions, COMMIT, then XACK.

Each writer takes batches from the queue (``get(timeout=...)``, so it notices a
stop within one timeout), and for each batch:

1. drops records that repeat an earlier (device_id, ts) of the same batch
   (first write wins; they count as duplicates);
2. on one pooled connection, in one transaction: seeds the state of devices
   this process has not seen yet (one query for all of them), then binary-COPYs
   the rows straight into ``positions`` in a savepoint. Only when that meets a
   key already stored is the attempt undone and the rows go the idempotent
   way: binary COPY into a per-connection temporary table, ``INSERT .. SELECT
   .. ON CONFLICT (device_id, ts) DO NOTHING`` and, when the row count says
   some were skipped, a query for which (rows whose ``xmin`` is not this
   transaction's) — the common batch moves no keys back to Python at all;
3. commits, and only then acknowledges exactly the entries of the batch;
4. updates per-device state and calls the post-commit stages.

Failures are told apart. Infrastructure failures (connection lost, server
shutting down, deadlock, serialization failure, timeouts) are retried with
capped exponential back-off and jitter, forever, never acknowledged. Data
failures (the database refuses a row) split the batch in halves until the bad
rows are isolated; the rest is written, and a bad row is dead-lettered with
stage ``write`` once the stream has delivered it ``max_deliveries`` times
(until then it stays pending and is redelivered by the claimer).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, cast

import psycopg
import redis
from psycopg import sql
from psycopg.types.string import BytesBinaryDumper
from psycopg_pool import ConnectionPool, PoolTimeout

from tpx.config import Settings
from tpx.engine.batch import Batch
from tpx.engine.deadletter import STAGE_WRITE, DeadLetter, dead_letter
from tpx.engine.metrics import Metrics
from tpx.engine.stages import Committed, PostCommitStage
from tpx.engine.state import SEED_SQL, DeviceStates
from tpx.errors import first_line
from tpx.failpoints import failpoint
from tpx.records import COPIED, COPY_COLUMNS, Position

log = logging.getLogger(__name__)

STAGE_TABLE = "tpx_stage"
#: Back-off bounds (s) for retried writes and acknowledgements.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0
ACK_ATTEMPTS = 5

#: COPY straight into ``positions``, tried first (in a savepoint): it fails on a key already
#: stored. Two details, each measured with callgrind on PostgreSQL 15 (README.md, "Speed"):
#:
#: * the rows are in the columns' binary form (``Position[:COPIED]``) and ``ingested_at`` takes
#:   its default, ``now()``: no staging table and no ``INSERT .. SELECT`` per batch, 17 % fewer
#:   instructions per row than copying into a staging table and moving the rows from there;
#: * ``WHERE random() >= 0`` is always true, and volatile: that makes COPY insert row by row
#:   through one tuple slot. Its multi-insert path creates a slot per buffered row (up to 1,000),
#:   whose resource-owner bookkeeping grows with their number and costs more than it saves.
#:   On a hypertable TimescaleDB runs its own COPY, which honours the WHERE and avoids that cost
#:   by itself (its buffers use a tuple descriptor without reference counting).
#:
#: The rows go in batch order, not key order: two transactions that meet the same keys in opposite
#: orders (duplicates resent out of order, at the same moment) deadlock, PostgreSQL aborts one after
#: ``deadlock_timeout``, and that writer retries its batch like any transient failure. Sorting in
#: Python would cost the client more than that rare wait (it made no difference to PostgreSQL).
COPY_SQL = sql.SQL("COPY positions ({}) FROM STDIN (FORMAT BINARY) WHERE random() >= 0").format(
    sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in COPY_COLUMNS)
)
COPY_TYPES = [copy_type for _, copy_type, _ in COPY_COLUMNS]
#: The per-connection staging table for the idempotent form (a batch that met a stored key),
#: created when a pooled connection opens; the same rows are copied into it. ``device_id``
#: takes the collation of ``positions.device_id`` (``"C"`` since migration 002), so the sort
#: and the duplicate lookup compare like the primary key does (mixing two collations would be
#: an error in the join, or keep the index out of it); ``staged_at`` is never copied, and its
#: volatile default makes this COPY go through one tuple slot too.
CREATE_STAGE_SQL = sql.SQL(
    """
DO $stage$
BEGIN
    EXECUTE format(
        'CREATE TEMP TABLE IF NOT EXISTS {} ({}, staged_at timestamptz DEFAULT clock_timestamp())'
        ' ON COMMIT DELETE ROWS',
        coalesce(
            (SELECT attcollation::regcollation::text FROM pg_attribute
              WHERE attrelid = to_regclass('positions') AND attname = 'device_id'),
            '"default"'));
END
$stage$
"""
).format(
    sql.Identifier(STAGE_TABLE),
    sql.SQL(", ").join(
        sql.SQL(f"{name} {column_type}" + (" COLLATE %s" if name == "device_id" else ""))
        for name, _, column_type in COPY_COLUMNS
    ),
)
STAGE_COPY_SQL = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
    sql.Identifier(STAGE_TABLE),
    sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in COPY_COLUMNS),
)
#: Staging table -> positions, in key order (two writers meeting the same keys lock them in the
#: same order); a key already stored is skipped.
INSERT_SQL = sql.SQL(
    """
INSERT INTO positions ({columns}, ingested_at)
SELECT {columns}, now()
FROM {stage}
ORDER BY device_id, ts
ON CONFLICT (device_id, ts) DO NOTHING
"""
).format(
    columns=sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in COPY_COLUMNS),
    stage=sql.Identifier(STAGE_TABLE),
)
#: After a plain COPY met a stored key, a writer uses the staging table and ON CONFLICT for this
#: long (s): duplicates come in runs (a redelivery after a crash, a gateway resending), and a
#: failed attempt is wasted work.
PLAIN_COPY_PAUSE_S = 30.0
#: After an INSERT that skipped rows: the staged keys whose stored row is not this
#: transaction's own (xmin), i.e. the duplicates. Run only when rowcount says some were skipped.
ALREADY_STORED_SQL = sql.SQL(
    """
SELECT s.device_id, (extract(epoch FROM s.ts) * 1000000)::int8
FROM {} AS s
JOIN positions AS p ON p.device_id = s.device_id AND p.ts = s.ts
WHERE p.xmin <> (pg_current_xact_id()::text::bigint % 4294967296)::text::xid
"""
).format(sql.Identifier(STAGE_TABLE))

#: The database refused the rows themselves: retrying the same rows cannot help.
DATA_ERRORS: tuple[type[Exception], ...] = (psycopg.DataError, psycopg.IntegrityError)


class AbortedError(Exception):
    """The engine gave up waiting (shutdown deadline passed): leave entries pending."""


class Writer(threading.Thread):
    def __init__(
        self,
        index: int,
        settings: Settings,
        pool: ConnectionPool,
        client: redis.Redis,
        source: queue.Queue[Batch | None],
        states: DeviceStates,
        metrics: Metrics,
        stages: Sequence[PostCommitStage],
        abort: threading.Event,
        inflight: set[bytes],
    ) -> None:
        super().__init__(name=f"tpx-writer-{index}", daemon=True)
        self.s = settings
        self.pool = pool
        self.client = client
        self.source = source
        self.states = states
        self.metrics = metrics
        self.stages = stages
        self.abort = abort
        #: monotonic time since which writes keep failing (None: healthy)
        self.failing_since: float | None = None
        self.last_error = ""
        self.in_flight: list[bytes] = []
        #: entry ids read but not finished, shared with the reader (its claim sweep skips them)
        self.inflight_ids = inflight
        #: monotonic time until which batches go straight to INSERT .. ON CONFLICT
        self.plain_paused_until = 0.0

    def run(self) -> None:
        while True:
            try:
                batch = self.source.get(timeout=0.5)
            except queue.Empty:
                if self.abort.is_set():
                    break
                continue
            if batch is None:  # the engine's stop sentinel, queued after the last batch
                break
            ids = batch.entry_ids()
            self.in_flight = ids
            try:
                self.handle(batch)
            except AbortedError:
                log.warning("gave up on a batch of %d at shutdown; its entries stay pending", len(batch))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning(
                    "redis failed while finishing a batch (%s); its unacknowledged entries "
                    "stay pending for redelivery",
                    exc,
                )
            # an unexpected exception skips this on purpose: the panic dump shows what was in flight
            self.inflight_ids.difference_update(ids)
            self.in_flight = []
            self.source.task_done()
        log.info("writer stopped")

    # --- one batch ---

    def handle(self, batch: Batch) -> None:
        started = time.monotonic()
        positions, repeats = _first_of_each_key(batch.positions)
        written, already, refused = self._write_isolating(positions)

        if refused:
            refused_keys = {(p.device_id, p.ts_us) for p, _ in refused}
            repeats = [p for p in repeats if (p.device_id, p.ts_us) not in refused_keys]
            self._ack([p.entry_id for p in written] + [p.entry_id for p in repeats])
            self._refused(refused, batch)
        else:  # every entry of the batch is written or a repeat
            self._ack(batch.entry_ids())

        if already:  # rare: (device_id, ts) stored before this batch
            new = [p for p in written if (p.device_id, p.ts_us) not in already]
            dups = [p for p in written if (p.device_id, p.ts_us) in already] + repeats
        else:
            new, dups = written, repeats
        self.states.apply(new, dups)
        self._account(batch, new, dups, started)
        if self.stages and (new or dups):
            self._run_stages(Committed(new, dups))

    def _write_isolating(
        self, positions: list[Position]
    ) -> tuple[list[Position], set[tuple[str, int]], list[tuple[Position, str]]]:
        """Commit ``positions``; on a data failure split in halves until the bad rows are alone.

        Returns the positions committed (inserted or already stored), the keys that
        were already stored (not inserted now), and the refused positions with the
        database's reason.
        """
        written: list[Position] = []
        already: set[tuple[str, int]] = set()
        refused: list[tuple[Position, str]] = []
        parts = [positions]
        try:
            while parts:
                part = parts.pop()
                try:
                    already |= self._commit_retrying(part)
                    written.extend(part)
                except DATA_ERRORS as exc:
                    if len(part) == 1:
                        refused.append((part[0], _one_line(exc)))
                    else:
                        mid = len(part) // 2
                        parts += [part[mid:], part[:mid]]
        except AbortedError:
            self._ack([p.entry_id for p in written])  # what did commit is acknowledged
            raise
        return written, already, refused

    def _account(self, batch: Batch, new: list[Position], dups: list[Position], started: float) -> None:
        m = self.metrics
        m.written.inc(len(new))
        m.duplicates.inc(len(dups))
        m.batch_size.observe(len(batch))
        m.batch_seconds.observe(time.monotonic() - started)
        now_ms = time.time() * 1000
        for p in (batch.positions[0], batch.positions[-1]):  # a sample: oldest and newest
            entry_ms = int(p.entry_id.split(b"-", 1)[0])
            latency = max(0.0, (now_ms - entry_ms) / 1000)
            m.e2e_seconds.observe(latency)
            m.e2e_recent.append(latency)

    def _run_stages(self, committed: Committed) -> None:
        for stage in self.stages:
            try:
                stage.on_commit(committed)
            except Exception:  # a domain stage must never break the core path
                log.exception("post-commit stage %s failed", stage.name)
                self.metrics.stage_errors.labels(stage.name).inc()

    def _commit_retrying(self, part: list[Position]) -> set[tuple[str, int]]:
        attempt = 0
        while True:
            try:
                keys = self._commit(part)
            except DATA_ERRORS:
                self.failing_since = None
                raise
            except (psycopg.Error, PoolTimeout) as exc:
                attempt += 1
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.last_error = _one_line(exc)
                self.metrics.retries.inc()
                delay = min(RETRY_MAX_S, RETRY_MIN_S * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning(
                    "write of %d records failed (%s); retry %d in %.2fs",
                    len(part),
                    self.last_error,
                    attempt,
                    delay,
                )
                if self.abort.wait(delay):
                    raise AbortedError from None
                continue
            self.failing_since = None
            return keys

    def _commit(self, part: list[Position]) -> set[tuple[str, int]]:
        failpoint("writer.commit")
        states = self.states
        cold = states.cold(map(_DEVICE_ID, part))
        with self.pool.connection() as conn:
            with conn.cursor() as cur:
                seeds = cur.execute(SEED_SQL, (cold,)).fetchall() if cold else []
                already: set[tuple[str, int]] = set()
                if not self._copy_plain(conn, cur, part):
                    copy_rows(cur, STAGE_COPY_SQL, part)
                    cur.execute(INSERT_SQL)
                    if cur.rowcount != len(part):
                        already = set(cur.execute(ALREADY_STORED_SQL).fetchall())
            conn.commit()
        if cold:
            states.seed(cold, seeds)
        return already

    def _copy_plain(
        self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], part: list[Position]
    ) -> bool:
        """COPY the rows straight into ``positions``; False when a key was already stored.

        The attempt runs in a savepoint, so a stored key undoes only the attempt; the caller then
        copies the rows into the staging table and moves them with ON CONFLICT at the top level
        (ALREADY_STORED_SQL tells the transaction's own rows by their xmin).
        """
        if time.monotonic() < self.plain_paused_until:
            return False
        try:
            with conn.transaction():
                copy_rows(cur, COPY_SQL, part)
        except psycopg.errors.UniqueViolation:
            self.plain_paused_until = time.monotonic() + PLAIN_COPY_PAUSE_S
            self.metrics.insert_fallbacks.inc()
            return False
        return True

    # --- acknowledgements and write-stage dead letters ---

    def _ack(self, ids: list[bytes]) -> None:
        if not ids:
            return
        for attempt in range(1, ACK_ATTEMPTS + 1):
            try:
                self.client.xack(self.s.stream, self.s.group, *ids)
                return
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("XACK of %d entries failed (%s), attempt %d", len(ids), exc, attempt)
                if self.abort.wait(min(RETRY_MAX_S, RETRY_MIN_S * 2**attempt)):
                    break
        self.metrics.ack_failures.inc()
        log.error(
            "left %d committed entries pending (their rows are stored; redelivery is harmless)",
            len(ids),
        )

    def _refused(self, refused: list[tuple[Position, str]], batch: Batch) -> None:
        letters = []
        for position, error in refused:
            deliveries = batch.deliveries.get(position.entry_id, 1)
            if deliveries < self.s.max_deliveries:
                log.warning(
                    "database refused %s (delivery %d of %d): %s; left pending for redelivery",
                    position.entry_id.decode(),
                    deliveries,
                    self.s.max_deliveries,
                    error,
                )
                continue
            found = self.client.xrange(self.s.stream, position.entry_id, position.entry_id, count=1)
            fields = (
                cast(dict[bytes, bytes], found[0][1])
                if found
                else {b"device_id": position.device_id.encode()}
            )
            letters.append(DeadLetter(position.entry_id, fields, STAGE_WRITE, error, deliveries))
        if letters:
            dead_letter(self.client, self.s.stream, self.s.group, self.s.consumer, letters)
            self.metrics.dead_lettered.labels(STAGE_WRITE).inc(len(letters))
            for letter in letters:
                log.info("dead-lettered %s (write): %s", letter.entry_id.decode(), letter.error)


def copy_rows(cur: psycopg.Cursor[Any], statement: sql.Composed, positions: Iterable[Position]) -> None:
    """Binary-COPY ``positions`` with ``statement`` (COPY_SQL or STAGE_COPY_SQL).

    A Position's leading fields are the ``COPY_COLUMNS`` in their binary form, in order: a row
    is a slice of it.
    """
    # by the bytea oid, psycopg picks its DB-API Binary dumper, a Python-level call per row;
    # the plain bytes dumper is C (-1 % of the GIL's time in the pipeline, py-spy)
    cur.adapters.register_dumper(None, BytesBinaryDumper)
    with cur.copy(statement) as copy:
        copy.set_types(COPY_TYPES)
        write_row = copy.write_row
        for p in positions:
            write_row(p[:COPIED])


#: A Position's device_id, and its key (device_id, ts_us), read without a Python-level loop.
_DEVICE_ID = itemgetter(Position._fields.index("device_id"))
_KEY = itemgetter(Position._fields.index("device_id"), Position._fields.index("ts_us"))


def _first_of_each_key(positions: list[Position]) -> tuple[list[Position], list[Position]]:
    """Split a batch into the first record of each (device_id, ts) and the repeats."""
    if len(set(map(_KEY, positions))) == len(positions):  # the common batch: no repeats
        return positions, []
    unique: dict[tuple[str, int], Position] = {}
    repeats: list[Position] = []
    for p in positions:
        key = (p.device_id, p.ts_us)
        if key in unique:
            repeats.append(p)
        else:
            unique[key] = p
    return list(unique.values()), repeats


def _one_line(exc: BaseException) -> str:
    """The database's reason with its error class (it becomes a dlq_error or a readiness problem)."""
    return f"{type(exc).__name__}: {first_line(exc)}"

"""Commit one batch and say what happened: the write rules of ``tpx serve`` and ``tpx claim``.

:meth:`Committer.commit` takes a :class:`~tpx.engine.batch.Batch` and returns a
:class:`CommitOutcome`; the writer threads (``tpx.engine.writer``) and ``tpx claim`` both call
it. For each batch it:

1. drops records that repeat an earlier (device_id, ts) of the same batch
   (first write wins; they count as duplicates);
2. on one pooled connection, in one transaction: seeds the state of devices
   this process has not seen yet (one query for all of them), then binary-COPYs
   the rows straight into ``positions`` in a savepoint. Only when that meets a
   key already stored is the attempt undone and the rows go the idempotent
   way: binary COPY into a per-connection temporary table, ``INSERT .. SELECT
   .. ON CONFLICT (device_id, ts) DO NOTHING RETURNING`` the keys inserted; when
   the row count says some were skipped, the staged keys not returned are the
   duplicates (no system column is read: a compressed TimescaleDB chunk refuses
   them) — the common batch moves no keys back to Python at all;
3. commits, and only then acknowledges exactly the entries of the batch;
4. updates per-device state (when it was given one) and the metrics.

Failures are told apart by SQLSTATE (``tpx.engine.sqlstate``). The database's
failures (connection lost, server shutting down, deadlock, lock or statement
timeout) are retried with capped exponential back-off and jitter, until the
``abort`` event is set, never acknowledged; so is a query the server cannot run
(schema changed, privilege missing), which also logs an ERROR, counts in
``tpx_write_query_errors_total`` and shows in :attr:`Committer.health`. The
row's failures (the database refuses a value) split the batch in halves until
the bad rows are isolated; the rest is written, and a bad row is dead-lettered
with stage ``write`` once the stream has delivered it ``max_deliveries`` times
(until then it stays pending and is redelivered by the claimer). Redis refusing
a dead letter or an XACK (out of memory, read-only replica, a key of the wrong
type) is retried a few times, then the entries are left pending: nothing is
acknowledged without its dead letter, and the next batches keep flowing.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, cast

import psycopg
import redis
from psycopg import sql
from psycopg.types.string import BytesBinaryDumper
from psycopg_pool import ConnectionPool, PoolTimeout

from tpx.config import Settings
from tpx.engine.batch import Batch
from tpx.engine.deadletter import DeadLetter, Stage, add_dead_letters
from tpx.engine.intake import FIRST_DELIVERY
from tpx.engine.metrics import Metrics
from tpx.engine.sqlstate import Fault, classify, describe
from tpx.engine.stages import AfterCommit, TransactionStage
from tpx.engine.state import SEED_SQL, DeviceStates
from tpx.errors import first_line
from tpx.failpoints import failpoint
from tpx.format import us_iso
from tpx.keys import REFUSALS_TTL_S, refusals
from tpx.records import COPIED, COPY_COLUMNS, Position
from tpx.streams import entry_ms

log = logging.getLogger(__name__)

STAGE_TABLE = "tpx_stage"
#: Back-off bounds (s) for retried writes and acknowledgements.
RETRY_MIN_S = 0.1
RETRY_MAX_S = 5.0
#: Tries of an XACK before committed entries are left pending (their redelivery is harmless).
ACK_ATTEMPTS = 5
#: Tries to add a batch's write-stage dead letters before its refused entries are left pending
#: (redelivered by the claim sweep, then tried again): enough to ride out a blip, few enough that
#: the writer goes on with the next batches while Redis keeps refusing.
DEAD_LETTER_ATTEMPTS = 3

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
#: same order); a key already stored is skipped. RETURNING the keys inserted tells the
#: duplicates apart (the staged keys not returned) without reading ``positions`` again: a query
#: of a system column (``xmin``) fails on a compressed TimescaleDB chunk (``transparent
#: decompression only supports tableoid system column``). Only this fallback pays for it.
INSERT_SQL = sql.SQL(
    """
INSERT INTO positions ({columns}, ingested_at)
SELECT {columns}, now()
FROM {stage}
ORDER BY device_id, ts
ON CONFLICT (device_id, ts) DO NOTHING
RETURNING device_id, (extract(epoch FROM ts) * 1000000)::int8
"""
).format(
    columns=sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in COPY_COLUMNS),
    stage=sql.Identifier(STAGE_TABLE),
)
#: After a plain COPY met a stored key, a writer uses the staging table and ON CONFLICT for this
#: long (s): duplicates come in runs (a redelivery after a crash, a gateway resending), and a
#: failed attempt is wasted work.
PLAIN_COPY_PAUSE_S = 30.0
#: A transaction stage that keeps failing (its table changed) fails every batch alike: one ERROR
#: line per this many seconds per writer, with the count of the batches in between.
STAGE_ERROR_LOG_EVERY_S = 30.0


class AbortedError(Exception):
    """The engine gave up waiting (shutdown deadline passed): leave entries pending."""


class RefusedError(Exception):
    """The database refused the rows themselves (the row's fault): retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: A position refused by the database, with its reason (``describe``'s one line).
Refusal = tuple[Position, str]


@dataclass(slots=True)
class CommitOutcome:
    """What one :meth:`Committer.commit` did with a batch."""

    #: rows written now
    inserted: list[Position] = field(default_factory=list)
    #: records not written: their (device_id, ts) repeats an earlier one of the batch, or was stored
    duplicates: list[Position] = field(default_factory=list)
    #: records the database refused that stay pending: delivered fewer than ``max_deliveries``
    #: times, or their dead letters refused by Redis
    left_pending: list[Refusal] = field(default_factory=list)
    #: records the database refused, dead-lettered (stage ``write``) and acknowledged
    dead_lettered: list[Refusal] = field(default_factory=list)
    #: entries acknowledged (committed, or repeats of committed ones)
    acknowledged: int = 0
    #: committed entries whose XACK Redis kept refusing (pending; redelivery is harmless)
    unacknowledged: int = 0
    #: attempts that failed and were retried (the database's or the query's fault)
    retries: int = 0
    #: parts whose plain COPY met a stored key and went again with ON CONFLICT
    fallbacks: int = 0
    #: the abort event stopped the retries: what did not commit stays pending
    aborted: bool = False


@dataclass(slots=True)
class WriteHealth:
    """What holds the writes up, read by the writer's ``health()`` while a commit runs."""

    #: monotonic time since which writes keep failing (None: healthy)
    failing_since: float | None = None
    last_error: str = ""
    #: whether the failure is a query the server cannot run (SQLSTATE class 42, 0A)
    query_failing: bool = False
    #: (monotonic time since, reason) while Redis refuses dead letters / acknowledgements
    dlq_problem: tuple[float, str] | None = None
    ack_problem: tuple[float, str] | None = None


class Committer:
    """Commits batches on ``pool`` and acknowledges them on ``client``; one per writer thread.

    ``states``: the per-device state to seed and update, or None (``tpx claim``: no state kept,
    no seed query). ``stage``: work that commits in the same transaction as the rows it derives
    from (the domain stage), or None.
    """

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        client: redis.Redis,
        metrics: Metrics,
        states: DeviceStates | None,
        stage: TransactionStage | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.states = states
        self.stage = stage
        self.health = WriteHealth()
        #: monotonic time until which batches go straight to INSERT .. ON CONFLICT
        self.plain_paused_until = 0.0
        #: the stage's failures are logged once per STAGE_ERROR_LOG_EVERY_S, with a count between
        self._stage_logged_at = -STAGE_ERROR_LOG_EVERY_S
        self._unrecorded_logged_at = -STAGE_ERROR_LOG_EVERY_S
        self._stage_unlogged = 0

    def commit(self, batch: Batch, abort: threading.Event | None = None) -> CommitOutcome:
        """Write, acknowledge and dead-letter ``batch``; ``abort`` set: give up retrying."""
        out = CommitOutcome()
        started = time.monotonic()
        positions, repeats = _first_of_each_key(batch.positions)
        try:
            written, already, refused = self._write_isolating(positions, abort, out)
        except AbortedError:  # what did commit is acknowledged, counted and applied all the same
            out.aborted = True
            if self.states is not None:
                self.states.apply(out.inserted, out.duplicates)
            self._account(batch, out.inserted, out.duplicates, started)
            return out

        if refused:
            refused_keys = {(p.device_id, p.ts_us) for p, _ in refused}
            repeats = [p for p in repeats if (p.device_id, p.ts_us) not in refused_keys]
            self._ack([p.entry_id for p in written] + [p.entry_id for p in repeats], abort, out)
            self._refused(refused, batch, abort, out)
        else:  # every entry of the batch is written or a repeat
            self._ack(batch.entry_ids(), abort, out)

        if already:  # rare: (device_id, ts) stored before this batch
            new = [p for p in written if (p.device_id, p.ts_us) not in already]
            dups = [p for p in written if (p.device_id, p.ts_us) in already] + repeats
        else:
            new, dups = written, repeats
        out.inserted, out.duplicates = new, dups
        if self.states is not None:
            self.states.apply(new, dups)
        self._account(batch, new, dups, started)
        return out

    def _write_isolating(
        self, positions: list[Position], abort: threading.Event | None, out: CommitOutcome
    ) -> tuple[list[Position], set[tuple[str, int]], list[Refusal]]:
        """Commit ``positions``; on a data failure split in halves until the bad rows are alone.

        Returns the positions committed (inserted or already stored), the keys that
        were already stored (not inserted now), and the refused positions with the
        database's reason.
        """
        written: list[Position] = []
        already: set[tuple[str, int]] = set()
        refused: list[Refusal] = []
        parts = [positions]
        try:
            while parts:
                part = parts.pop()
                try:
                    already |= self._commit_retrying(part, abort, out)
                    written.extend(part)
                except RefusedError as exc:
                    if len(part) == 1:
                        refused.append((part[0], exc.reason))
                    else:
                        mid = len(part) // 2
                        parts += [part[mid:], part[:mid]]
        except AbortedError:
            self._ack([p.entry_id for p in written], abort, out)  # what did commit is acknowledged
            out.inserted = [p for p in written if (p.device_id, p.ts_us) not in already]
            out.duplicates = [p for p in written if (p.device_id, p.ts_us) in already]
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
            latency = max(0.0, (now_ms - entry_ms(p.entry_id)) / 1000)
            m.e2e_seconds.observe(latency)
            m.e2e_recent.append(latency)

    def _commit_retrying(
        self, part: list[Position], abort: threading.Event | None, out: CommitOutcome
    ) -> set[tuple[str, int]]:
        health = self.health
        attempt = 0
        while True:
            try:
                keys = self._commit(part, out)
            except (psycopg.Error, PoolTimeout) as exc:
                fault = classify(exc)
                if fault is Fault.ROW:
                    health.failing_since = None  # the database answers: it refused these rows
                    raise RefusedError(describe(exc)) from None
                attempt += 1
                out.retries += 1
                delay = min(RETRY_MAX_S, RETRY_MIN_S * 2**attempt) * random.uniform(0.5, 1.0)  # noqa: S311
                self._failed(len(part), exc, fault, attempt, delay)
                if _wait(abort, delay):
                    raise AbortedError from None
                continue
            health.failing_since = None
            health.query_failing = False
            return keys

    def _failed(self, records: int, exc: psycopg.Error, fault: Fault, attempt: int, delay: float) -> None:
        """Record a retried failure: health, metrics and one log line."""
        health = self.health
        if health.failing_since is None:
            health.failing_since = time.monotonic()
        health.last_error = describe(exc)
        health.query_failing = fault is Fault.QUERY
        self.metrics.retries.inc()
        if fault is Fault.QUERY:  # retrying helps only once someone fixes the schema or privileges
            self.metrics.query_errors.inc()
            log.error(
                "PostgreSQL cannot run the write of %d records (%s): check positions' schema and "
                "tpx's privileges; retry %d in %.2fs",
                records,
                health.last_error,
                attempt,
                delay,
            )
        else:
            log.warning(
                "write of %d records failed (%s); retry %d in %.2fs",
                records,
                health.last_error,
                attempt,
                delay,
            )

    def _commit(self, part: list[Position], out: CommitOutcome) -> set[tuple[str, int]]:
        failpoint("writer.commit")
        states = self.states
        cold = states.cold(map(_DEVICE_ID, part)) if states is not None else []
        # one explicit transaction: without it, a connection with nothing run yet would make the
        # plain COPY's savepoint block a transaction of its own, committed before the stage runs
        with self.pool.connection() as conn, conn.transaction():
            with conn.cursor() as cur:
                seeds = cur.execute(SEED_SQL, (cold,)).fetchall() if cold else []
                already: set[tuple[str, int]] = set()
                if not self._copy_plain(conn, cur, part, out):
                    copy_rows(cur, STAGE_COPY_SQL, part)
                    cur.execute(INSERT_SQL)
                    if cur.rowcount != len(part):  # the keys not returned were stored before
                        already = set(map(_KEY, part)).difference(cur.fetchall())
            after = self._in_transaction(conn, part, already)
        if cold and states is not None:
            states.seed(cold, seeds)
        if after is not None:
            after()
        return already

    def _in_transaction(
        self, conn: psycopg.Connection[Any], part: list[Position], already: set[tuple[str, int]]
    ) -> AfterCommit | None:
        """Run the transaction stage on the rows inserted now, in a savepoint.

        A fault that retrying can fix (connection, deadlock, timeout) propagates: the whole batch
        is retried. One it cannot (the stage's tables refuse the query or a value), or a bug in
        the stage, rolls back only the savepoint: the positions commit without the stage's work,
        which is logged and counted, and the stage records in the same transaction what it must
        redo (:meth:`TransactionStage.failed`; the domain's repair thread redoes it). When a
        value was refused (a record naming a geofence deleted since the last reload), the stage
        runs again device by device (in device-id order), each in a savepoint: only the devices
        concerned lose theirs.
        """
        stage = self.stage
        if stage is None:
            return None
        rows = part if not already else [p for p in part if _KEY(p) not in already]
        if not rows:
            return None
        after, failure = self._stage_attempt(conn, stage, rows)
        if failure is None:
            return after
        reason, row_fault = failure
        by_device: dict[str, list[Position]] = {}
        for p in rows:
            by_device.setdefault(p.device_id, []).append(p)
        if not row_fault or len(by_device) == 1:
            self._stage_failed(conn, stage, rows, reason)
            return None
        afters: list[AfterCommit] = []
        # in device-id order, the order a stage locks a batch's devices in (each savepoint is
        # released, its locks kept): two writers retrying alike never wait on each other in a cycle
        for device in sorted(by_device):
            device_rows = by_device[device]
            after, failure = self._stage_attempt(conn, stage, device_rows)
            if failure is not None:
                self._stage_failed(conn, stage, device_rows, failure[0])
            elif after is not None:
                afters.append(after)

        def after_all() -> None:
            for one in afters:
                one()

        return after_all

    def _stage_attempt(
        self, conn: psycopg.Connection[Any], stage: TransactionStage, rows: list[Position]
    ) -> tuple[AfterCommit | None, tuple[str, bool] | None]:
        """The stage on ``rows`` in a savepoint: (its after-commit, None), or (None, (why, whether
        a value was refused)); a fault that retrying can fix propagates."""
        try:
            with conn.transaction():
                return stage.in_transaction(conn, rows), None
        except psycopg.Error as exc:
            fault = classify(exc)
            if fault is Fault.TRANSIENT or conn.closed:
                raise
            return None, (describe(exc), fault is Fault.ROW)
        except Exception as exc:  # a bug in the stage: its work is lost, never the positions
            log.exception("%s stage raised on %d rows", stage.name, len(rows))
            return None, (f"{type(exc).__name__}: {first_line(exc)}", False)

    def _stage_failed(
        self, conn: psycopg.Connection[Any], stage: TransactionStage, rows: list[Position], reason: str
    ) -> None:
        """Log and count a rolled-back stage, and let it record what it missed, in a savepoint
        of its own: should that fail too, the positions still commit (and the loss is logged)."""
        self.metrics.stage_errors.labels(stage.name).inc()
        now = time.monotonic()
        if now - self._stage_logged_at >= STAGE_ERROR_LOG_EVERY_S:  # every batch fails alike
            also = (
                f" (and {self._stage_unlogged} more batches since the last report)"
                if self._stage_unlogged
                else ""
            )
            log.error(
                "%s stage failed on %d rows (%s); the positions are written without it%s",
                stage.name,
                len(rows),
                reason,
                also,
            )
            self._stage_logged_at, self._stage_unlogged = now, 0
        else:
            self._stage_unlogged += 1
        try:
            with conn.transaction():
                stage.failed(conn, rows, reason)
        except psycopg.Error as exc:
            if classify(exc) is Fault.TRANSIENT or conn.closed:
                raise
            if now - self._unrecorded_logged_at >= STAGE_ERROR_LOG_EVERY_S:  # likely every batch
                self._unrecorded_logged_at = now
                log.error(
                    "%s stage could not record the %d rows it missed, of %d devices, the oldest at %s (%s):"
                    " their work is lost",
                    stage.name,
                    len(rows),
                    len({p.device_id for p in rows}),
                    us_iso(min(p.ts_us for p in rows)),
                    describe(exc),
                )

    def _copy_plain(
        self,
        conn: psycopg.Connection[Any],
        cur: psycopg.Cursor[Any],
        part: list[Position],
        out: CommitOutcome,
    ) -> bool:
        """COPY the rows straight into ``positions``; False when a key was already stored.

        The attempt runs in a savepoint, so a stored key undoes only the attempt; the caller then
        copies the rows into the staging table and moves them with ON CONFLICT at the top level
        (INSERT_SQL returns the keys it inserted).
        """
        if time.monotonic() < self.plain_paused_until:
            return False
        try:
            with conn.transaction():
                copy_rows(cur, COPY_SQL, part)
        except psycopg.errors.UniqueViolation:
            self.plain_paused_until = time.monotonic() + PLAIN_COPY_PAUSE_S
            self.metrics.insert_fallbacks.inc()
            out.fallbacks += 1
            return False
        return True

    # --- acknowledgements and write-stage dead letters ---

    def _ack(self, ids: list[bytes], abort: threading.Event | None, out: CommitOutcome) -> None:
        if not ids:
            return
        settings = self.settings
        for attempt in range(1, ACK_ATTEMPTS + 1):
            try:
                self.client.xack(settings.stream, settings.group, *ids)
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                # a ResponseError too: READONLY after a failover, the stream replaced by another type
                self.health.ack_problem = _problem(
                    self.health.ack_problem, f"XACK refused by redis: {first_line(exc)}"
                )
                log.warning("XACK of %d entries failed (%s), attempt %d", len(ids), first_line(exc), attempt)
                if _wait(abort, min(RETRY_MAX_S, RETRY_MIN_S * 2**attempt)):
                    break
                continue
            self.health.ack_problem = None
            out.acknowledged += len(ids)
            return
        out.unacknowledged += len(ids)
        self.metrics.ack_failures.inc()
        log.error(
            "left %d committed entries pending (their rows are stored; redelivery is harmless)",
            len(ids),
        )

    def _refused(
        self, refused: list[Refusal], batch: Batch, abort: threading.Event | None, out: CommitOutcome
    ) -> None:
        max_deliveries = self.settings.max_deliveries
        letters: list[tuple[Position, str, int]] = []
        for position, error in refused:
            deliveries = batch.deliveries.get(position.entry_id, FIRST_DELIVERY)
            if deliveries < max_deliveries:
                log.warning(
                    "database refused %s (delivery %d of %d): %s; left pending for redelivery",
                    position.entry_id.decode(),
                    deliveries,
                    max_deliveries,
                    error,
                )
                out.left_pending.append((position, error))
                continue
            letters.append((position, error, deliveries))
        self._record_refusals(out.left_pending)
        if not letters:
            return
        pending = self._dead_letter(letters, abort)
        kept = {position.entry_id for position, _, _ in pending}
        added = [(position, error) for position, error, _ in letters if position.entry_id not in kept]
        if added:
            self.metrics.dead_lettered.labels(Stage.WRITE).inc(len(added))
            for position, error in added:
                log.info("dead-lettered %s (write): %s", position.entry_id.decode(), error)
            out.dead_lettered += added
        out.left_pending += [(position, error) for position, error, _ in pending]

    def _record_refusals(self, refused: list[Refusal]) -> None:
        """Keep each refused, still pending entry's reason for `tpx pending` (best effort: the
        log line above says it too, so a Redis that refuses this costs nothing but the record)."""
        if not refused:
            return
        key = refusals(self.settings.stream)
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping={p.entry_id: error for p, error in refused})
        pipe.expire(key, REFUSALS_TTL_S)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
            log.debug("could not record %d refusals: %s", len(refused), first_line(exc))

    def _dead_letter(
        self, refused: list[tuple[Position, str, int]], abort: threading.Event | None
    ) -> list[tuple[Position, str, int]]:
        """Add the refused records' dead letters, acknowledging each one Redis took; returns
        those it kept refusing, left pending.

        Redis may refuse an XADD (``OOM command not allowed when used memory > 'maxmemory'``,
        ``WRONGTYPE`` when the ``:dlq`` key holds another type), some of a pipeline and not
        others: only the refused ones are tried again (a few times, with back-off), so none is
        added twice; then they stay pending, never acknowledged without their dead letter, and
        come back through the claim sweep while this writer goes on with the next batches.
        """
        settings = self.settings
        pending = refused
        for attempt in range(1, DEAD_LETTER_ATTEMPTS + 1):
            by_id = {item[0].entry_id: item for item in pending}
            try:
                letters = [
                    DeadLetter(p.entry_id, self._original_fields(p), Stage.WRITE, error, deliveries)
                    for p, error, deliveries in pending
                ]
                still, error = add_dead_letters(
                    self.client, settings.stream, settings.group, settings.consumer, letters
                )
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:
                reason = first_line(exc)
            else:
                pending = [by_id[letter.entry_id] for letter in still]
                if not pending:
                    self.health.dlq_problem = None
                    return []
                reason = first_line(error) if error is not None else "refused"
            self.health.dlq_problem = _problem(
                self.health.dlq_problem, f"dead letters refused by redis: {reason}"
            )
            log.warning(
                "dead-lettering %d refused records failed (%s), attempt %d of %d",
                len(pending),
                reason,
                attempt,
                DEAD_LETTER_ATTEMPTS,
            )
            if _wait(abort, min(RETRY_MAX_S, RETRY_MIN_S * 2**attempt)):
                break
        log.warning(
            "left %d refused records pending without their dead letters; they are tried again on redelivery",
            len(pending),
        )
        return pending

    def _original_fields(self, position: Position) -> dict[bytes, bytes]:
        """The stream entry's fields as they were (a dead letter carries them verbatim)."""
        entry_id = position.entry_id
        found = self.client.xrange(self.settings.stream, entry_id, entry_id, count=1)
        if found:
            return cast(dict[bytes, bytes], found[0][1])
        return {b"device_id": position.device_id.encode()}


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


def _wait(abort: threading.Event | None, delay: float) -> bool:
    """Wait ``delay`` seconds before a retry; True when ``abort`` was set meanwhile."""
    if abort is None:
        time.sleep(delay)
        return False
    return abort.wait(delay)


def _problem(current: tuple[float, str] | None, reason: str) -> tuple[float, str]:
    """A health problem that keeps its start time while it lasts."""
    return (time.monotonic() if current is None else current[0], reason)

"""The reader thread: XREADGROUP -> decode -> batches on a bounded queue.

It owns every read from the input stream. On start it makes sure the consumer
group exists (created at id 0 with MKSTREAM, so a new group reads the whole
backlog), re-reads this consumer's own pending entries (id ``0``, page by
page), then switches to new entries (``>``). Each page goes through
:mod:`tpx.engine.intake`; poison records are dead-lettered and acknowledged right
here, so they never wait behind (or hold up) valid ones.

Smart batching: a record waits for a free writer, not for a timer. After each
read of new entries that came back short (the reader has caught up), the open
batch goes on the queue at once if a writer is idle (waiting on an empty
queue). While every writer is busy, or while pages come back full (a backlog:
the next page is already asked for), records accumulate, and a batch goes on
the queue when it holds ``batch_size`` records or ``queue_bytes /
queue_batches`` bytes, or when its oldest record has waited
``batch_max_latency_ms``: that bound is the ceiling of a partial batch's wait,
not its floor. While a batch is open the XREADGROUP BLOCK time is cut to
:data:`BUSY_BLOCK_MS` (and to what is left of the ceiling), so a writer that
frees up gets the batch within a few milliseconds even when nothing new
arrives. When the queue is full the reader waits: memory stays bounded whatever
the backlog.

The claim sweep (XAUTOCLAIM) runs here too, once the own pending entries are
re-read and then every ``claim_interval_s``: entries pending in any consumer
for longer than ``claim_idle_ms`` (a dead instance's, or a record the database
refused and that waits for redelivery) are taken over and go down the same
decode/write/dead-letter path. Entries this process already holds in flight
are skipped, so a slow database never makes it process its own batches twice.
Entries deleted from the stream while pending are acknowledged and counted.

Redis may refuse a command without the connection failing (``OOM`` when
``maxmemory`` is reached, ``READONLY`` after a failover, ``LOADING``,
``WRONGTYPE`` when a key was replaced): the reader backs off like for an
outage and says why in :meth:`Reader.problem`. A poison record whose dead
letter is refused stays pending, unacknowledged, and is held here to be
retried (the valid records of its page go on to the writers). A group deleted
at runtime is recreated at the last id this instance read, not at 0, so
nothing this instance handled is read (and dead-lettered) again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from tpx.config import Settings
from tpx.engine.batch import Batch
from tpx.engine.budget import BatchQueue, PageSize, cut, record_bytes
from tpx.engine.deadletter import DeadLetter, Stage
from tpx.engine.intake import Entries, delivery_counts, raw_replies, read_entries, settle, take_in
from tpx.engine.metrics import Metrics
from tpx.errors import first_line
from tpx.records import SMALL_RECORD_BYTES
from tpx.streams import entry_order

log = logging.getLogger(__name__)

#: XAUTOCLAIM's reply fields on Redis 6.2 (next id, entries); Redis 7 adds the deleted ids.
AUTOCLAIM_FIELDS_6_2 = 2

#: BLOCK time (ms) while no batch is open; bounds how fast a stop request is noticed.
IDLE_BLOCK_MS = 500
#: BLOCK time (ms) at most while a batch is open (every writer was busy): how soon a writer
#: that frees up is given it. A commit of a small batch takes a few ms; the polls this costs
#: (one XREADGROUP per 5 ms) happen only while the writers are busy.
BUSY_BLOCK_MS = 5
#: Back-off bounds (s) while Redis is unreachable.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
#: Refused dead letters held for a retry (bounds memory; more stay pending for the claim sweep).
PARKED_MAX = 10_000
#: Seconds the reader waits for room on a full queue before it looks at the stop flag again.
PUT_WAIT_S = 0.2
#: XPENDING over a claimed page's id range also lists the entries the page left out (deleted,
#: held in flight, claimed by another sweep meanwhile): room for them, so every claimed entry's
#: count is read.
CLAIM_PENDING_SLACK = 100


#: redis-py strips these prefixes off a reply and names them with the exception class instead
_REPLY_PREFIX: dict[type[redis.RedisError], str] = {
    redis.exceptions.OutOfMemoryError: "OOM",
    redis.exceptions.ReadOnlyError: "READONLY",
    redis.exceptions.BusyLoadingError: "LOADING",
}


def redis_reply(exc: redis.RedisError) -> str:
    """The refusal as Redis sent it (``OOM command not allowed …``), one line."""
    prefix = _REPLY_PREFIX.get(type(exc))
    return f"{prefix} {first_line(exc)}" if prefix else first_line(exc)


def ensure_group(client: redis.Redis, stream: str, group: str, start: bytes = b"0") -> bool:
    """Create the consumer group (and the stream) at ``start`` if missing; True when created.

    An existing group is found with XINFO GROUPS first: XGROUP CREATE is refused under
    ``OOM`` or ``READONLY`` even when the group exists, and start-up must not depend on it.
    """
    try:
        if any(g["name"] in (group, group.encode()) for g in client.xinfo_groups(stream)):
            return False
    except redis.ResponseError:  # no such key, or WRONGTYPE: XGROUP CREATE says which
        pass
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise
    return True


class Reader(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        out: BatchQueue,
        metrics: Metrics,
        stop: threading.Event,
        inflight: set[bytes],
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        super().__init__(name="tpx-reader", daemon=True)
        self.settings = settings
        self.client = client
        #: stream replies read as Redis sent them (tpx.engine.intake.raw_replies)
        self.raw = raw_replies(client)
        self.out = out
        self.metrics = metrics
        self.stop_event = stop
        self.clock_us = clock_us
        self.batch = Batch()
        #: each open position's bytes (tpx.engine.budget), or None while all are small
        self.sizes: list[int] | None = None
        #: a batch's byte bound: queue_batches of them fill the queue's byte budget
        self.batch_bytes = max(1, settings.queue_bytes // settings.queue_batches)
        #: COUNT for the next XREADGROUP: from 1 at each re-read of own pending entries
        self.pages = PageSize(settings.page_bytes, settings.read_count, settings.max_record_bytes)
        self.cursor = b"0"  # own pending entries first, then ">"
        self.connected = threading.Event()
        #: entry ids queued or being written by this process (shared with the writers)
        self.inflight = inflight
        self.next_claim = 0.0  # the first sweep runs once own pending entries are re-read
        #: a connection with an XREADGROUP sent and its reply not read yet (read-ahead)
        self.ahead: Any = None
        #: the COUNT of the last XREADGROUP sent: a page shorter than it means the reader caught up
        self.asked = 0
        #: the newest entry id this instance read: where a vanished group is recreated
        self.last_id: bytes | None = None
        self.group_lost = ""  # why the group is being (re)created, for its log line
        #: why the last step failed (cleared by the next step that succeeds)
        self.failing: str | None = None
        #: poison records whose dead letter Redis refused: pending, held for a retry
        self.parked: dict[bytes, DeadLetter] = {}
        self.parked_error = ""
        self.parked_backoff = BACKOFF_MIN_S
        self.parked_retry_at = 0.0
        #: the group was lost while letters were held: their originals are pending nowhere now
        #: (nothing to XCLAIM, nothing any sweep could take), so they are written as they are
        self.parked_orphaned = False

    def problem(self) -> str | None:
        """Why the reader is not keeping up, in one line; None while it is."""
        if self.failing is not None:
            return self.failing
        if not self.connected.is_set():
            return "reader not connected to redis"
        if self.parked:
            return f"{len(self.parked)} dead letters refused by redis, retrying: {self.parked_error}"
        return None

    # --- the loop ---

    def run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self.stop_event.is_set():
            try:
                if not self.connected.is_set():
                    self._ensure_group()
                    self.connected.set()
                if self.parked and time.monotonic() >= self.parked_retry_at:
                    self._retry_parked()
                self._step()
                self.failing = None
                backoff = BACKOFF_MIN_S
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._drop_read_ahead()
                self.connected.clear()
                # what was read goes on to the writers (and into the in-flight set), so the
                # re-read of pending entries after reconnecting does not decode it a second time
                self._flush(force=True)
                self.cursor = b"0"  # after reconnecting, pick up whatever was left pending
                self.failing = f"reader not connected to redis: {redis_reply(exc)}"
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, backoff)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except redis.ResponseError as exc:
                self._drop_read_ahead()
                self.cursor = b"0"  # pick up whatever a half-done step left pending
                if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):
                    self.group_lost = first_line(exc)
                    self.parked_orphaned = bool(self.parked)
                    self.connected.clear()
                    continue
                self.failing = f"redis refused the reader: {redis_reply(exc)}"
                log.warning("%s; retrying in %.1fs", self.failing, backoff)
                self._flush(force=True)  # what was read goes on to the writers meanwhile
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        if self.ahead is not None:  # entries already delivered to us: hand them on, not left pending
            try:
                entries = self._read_ahead_reply()
                if entries:
                    self._decode(entries, None)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("could not read the last page (%s); it stays pending", exc)
            except redis.ResponseError as exc:  # e.g. the group was deleted meanwhile
                log.warning("the last page came back as an error (%s); nothing read", exc)
        self._flush(force=True)
        if self.parked:
            log.warning("%d refused dead letters stay pending (unacknowledged)", len(self.parked))
        log.info("reader stopped")

    def _ensure_group(self) -> None:
        """Create the group if missing: at 0 before this instance read anything, else at its last id."""
        start = self.last_id or b"0"
        if not ensure_group(self.client, self.settings.stream, self.settings.group, start):
            return
        where = (
            f"at {start.decode()}, the last entry this instance read"
            if self.last_id
            else "at 0, reading the whole stream (this instance had read nothing yet)"
        )
        why = (
            f" after {self.group_lost}; the old group's pending entries went with it (a row the"
            " database refused, waiting for redelivery, is not retried: move the group back to"
            " replay it)"
            if self.group_lost
            else ""
        )
        log.warning(
            "created consumer group %s on %s %s%s", self.settings.group, self.settings.stream, where, why
        )

    def _step(self) -> None:
        if self.cursor != b">":
            if self.cursor == b"0":  # (re)starting: nothing known about the entries' sizes
                self.pages.restart()
            entries = self._read(self.cursor, block=None)
            if not entries:
                self.pages.relax()
                log.info("own pending entries re-read; now reading new entries")
                self.cursor = b">"
                return
            self.cursor = entries[-1][0]
            if self.inflight:  # already queued or being written by us: not again
                entries = [e for e in entries if e[0] not in self.inflight]
            if not entries:
                return
            deliveries = self._deliveries(entries[0][0], entries[-1][0], len(entries) + len(self.inflight))
            caught_up = False  # re-reading own pending entries: big batches, as before
        elif time.monotonic() >= self.next_claim:
            self.claim_sweep()
            self.next_claim = time.monotonic() + self.settings.claim_interval_s
            return
        else:
            if self.batch.positions:  # every writer was busy: look again soon, within the ceiling
                left_ms = self.settings.batch_max_latency_ms - (time.monotonic() - self.batch.started) * 1000
                block = max(1, min(int(left_ms), BUSY_BLOCK_MS))
            else:
                block = IDLE_BLOCK_MS
            entries = self._read_ahead_reply() if self.ahead else self._read(b">", block=block)
            deliveries = None
            caught_up = len(entries) < self.asked  # a full page: more is waiting right behind
            if len(entries) == self.settings.read_count and not self.stop_event.is_set():  # a backlog
                self._send_read_ahead()
        if entries:
            self.pages.seen(self._decode(entries, deliveries))
        # caught up with the stream: an idle writer takes what is open now
        self._flush(force=False, eager=caught_up)

    def _drop_read_ahead(self) -> None:
        """Forget an unread reply (its entries stay pending: the pending re-read finds them)."""
        if self.ahead is not None:
            conn, self.ahead = self.ahead, None
            conn.disconnect()
            self.raw.connection_pool.release(conn)

    def _send_read_ahead(self) -> None:
        """Ask for the next page now (no BLOCK), so Redis builds it while this one is decoded.

        Redis and the decoder then work at once instead of in turn: +6 % records/s in the
        pipeline benchmark (8 interleaved pairs, 6 won). The page's entries are delivered (pending)
        from now on; they are read at the next step, at shutdown, or, after a connection error,
        by the re-read of own pending entries.
        """
        self.ahead = self.raw.connection_pool.get_connection()
        self.asked = self.pages.count
        try:
            self.ahead.send_command(
                "XREADGROUP",
                "GROUP",
                self.settings.group,
                self.settings.consumer,
                "COUNT",
                self.pages.count,
                "STREAMS",
                self.settings.stream,
                ">",
            )
        except BaseException:
            self._drop_read_ahead()
            raise

    def _read_ahead_reply(self) -> Entries:
        """The page asked for by :meth:`_send_read_ahead`."""
        conn, self.ahead = self.ahead, None
        try:
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self.raw.connection_pool.release(conn)
        return read_entries(reply)

    def _read(self, cursor: bytes, block: int | None) -> Entries:
        self.asked = self.pages.count
        reply = self.raw.xreadgroup(
            self.settings.group,
            self.settings.consumer,
            {self.settings.stream: cursor},
            count=self.pages.count,
            block=block,
        )
        return read_entries(reply)

    def claim_sweep(self) -> int:
        """Take over entries idle longer than ``claim_idle_ms`` in any consumer; return how many."""
        start: bytes = b"0-0"
        claimed = 0
        s = self.settings
        pages = PageSize(s.page_bytes, s.read_count, s.max_record_bytes)  # cautious
        while not self.stop_event.is_set():
            reply = self.raw.xautoclaim(
                s.stream,
                s.group,
                s.consumer,
                min_idle_time=s.claim_idle_ms,
                start_id=start,
                count=pages.count,
            )
            # Redis 7: [next, entries, deleted ids]; Redis 6.2: [next, entries] (a deleted one: nil)
            next_id = cast(bytes, reply[0])
            entries = cast(list[tuple[bytes, list[bytes] | None] | None], reply[1])
            deleted = cast(list[bytes], reply[2]) if len(reply) > AUTOCLAIM_FIELDS_6_2 else []
            if deleted:
                self._settle([], deleted)
            if any(e is None for e in entries):  # Redis 6.2 names no id for a deleted entry
                self._ack_vanished_pending()
            largest = 0
            fresh: Entries = [
                (e[0], e[1]) for e in entries if e is not None and e[1] and e[0] not in self.inflight
            ]
            if fresh:
                claimed += len(fresh)
                self.metrics.claimed.inc(len(fresh))
                deliveries = self._deliveries(
                    fresh[0][0], fresh[-1][0], len(fresh) + len(self.inflight) + CLAIM_PENDING_SLACK
                )
                largest = self._decode(fresh, deliveries)
                self._flush(force=False)
            pages.seen(largest)
            if next_id in (b"0-0", b"0"):
                break
            start = next_id
        if claimed:
            log.info("claimed %d entries idle for more than %d ms", claimed, s.claim_idle_ms)
        return claimed

    def _ack_vanished_pending(self) -> None:
        """Acknowledge our pending entries that no longer exist in the stream (Redis 6.2 path)."""
        start: bytes | str = "-"
        while True:
            rows = self.client.xpending_range(
                self.settings.stream,
                self.settings.group,
                min=start,
                max="+",
                count=self.settings.read_count,
                consumername=self.settings.consumer,
            )
            if not rows:
                return
            ids = [cast(bytes, row["message_id"]) for row in rows]
            pipe = self.client.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xrange(self.settings.stream, entry_id, entry_id, count=1)
            gone = [entry_id for entry_id, found in zip(ids, pipe.execute(), strict=True) if not found]
            if gone:
                self._settle([], gone)
            if len(rows) < self.settings.read_count:
                return
            start = "(" + ids[-1].decode()

    def _deliveries(self, first: bytes, last: bytes, count: int) -> dict[bytes, int]:
        """Delivery counts of redelivered entries (XPENDING over the page's id range)."""
        rows = self.client.xpending_range(
            self.settings.stream,
            self.settings.group,
            min=first,
            max=last,
            count=count,
            consumername=self.settings.consumer,
        )
        return delivery_counts(rows)

    def _decode(self, entries: Entries, deliveries: dict[bytes, int] | None) -> int:
        """Decode a page into the open batch; returns its longest record's bytes (0: all small)."""
        if self.last_id is None or entry_order(entries[-1][0]) > entry_order(self.last_id):
            self.last_id = entries[-1][0]
        batch = self.batch
        positions = batch.positions
        if not positions:
            batch.started = time.monotonic()
        intake = take_in(entries, self.settings, self.clock_us(), deliveries)
        if intake.largest or self.sizes is not None:  # some record is not small: count each one
            if self.sizes is None:
                self.sizes = [SMALL_RECORD_BYTES] * len(positions)
            self.sizes += record_bytes(intake.positions)
        positions += intake.positions
        if intake.deliveries:  # a page re-read or claimed: keep the counts for write-stage dead letters
            batch.deliveries.update(intake.deliveries)
        self.metrics.read.inc(intake.entries)
        if intake.dead_letters or intake.vanished:
            self._settle(intake.dead_letters, intake.vanished)
        return intake.largest

    def _settle(self, letters: list[DeadLetter], vanished: list[bytes]) -> None:
        """Dead-letter and acknowledge, acknowledge the vanished; letters Redis refuses stay
        pending and are held for a retry."""
        settled = settle(self.client, self.settings, letters, vanished)
        self.metrics.vanished.inc(settled.acknowledged)
        self.metrics.dead_lettered.labels(Stage.DECODE).inc(len(settled.dead_lettered))
        for letter in settled.dead_lettered:
            log.info("dead-lettered %s (decode): %s", letter.entry_id.decode(), letter.error)
        if settled.refusal is None:
            return
        refused = settled.refused
        held = [letter for letter in refused if letter.entry_id not in self.parked]
        held = held[: max(0, PARKED_MAX - len(self.parked))]
        self.parked.update((letter.entry_id, letter) for letter in held)
        self.inflight.update(letter.entry_id for letter in held)  # no sweep of ours takes them again
        self.parked_error = redis_reply(settled.refusal)
        if len(held) == len(self.parked):  # the first refusal: retry soon
            self.parked_backoff = BACKOFF_MIN_S
            self.parked_retry_at = time.monotonic() + self.parked_backoff
        log.warning(
            "redis refused %d dead letters (%s); they stay pending, unacknowledged, and are retried",
            len(refused),
            self.parked_error,
        )

    def _retry_parked(self) -> None:
        """Retry the held dead letters; first XCLAIM them (no other instance's sweep takes them)."""
        ids: list[Any] = list(self.parked)
        if self.parked_orphaned:  # the group was recreated: no pending entry left to claim
            owned = set(ids)
        else:
            owned = set(
                self.client.xclaim(
                    self.settings.stream, self.settings.group, self.settings.consumer, 0, ids, justid=True
                )
            )
        gone = [entry_id for entry_id in ids if entry_id not in owned]  # acknowledged or deleted meanwhile
        for entry_id in gone:
            del self.parked[entry_id]
        self.inflight.difference_update(gone)
        letters, backoff = list(self.parked.values()), self.parked_backoff
        self.parked = {}
        self.inflight.difference_update(letter.entry_id for letter in letters)
        self._settle(letters, [])
        if self.parked:  # refused again: wait longer (capped, like an outage)
            self.parked_backoff = min(backoff * 2, BACKOFF_MAX_S)
            self.parked_retry_at = time.monotonic() + self.parked_backoff
        else:
            self.parked_orphaned = False
            if letters:
                log.info("redis took the %d dead letters it had refused", len(letters))

    def _flush(self, force: bool, eager: bool = False) -> None:
        """Queue full batches (by count or bytes); queue everything once the oldest record waited
        the ceiling, or, when ``eager``, as soon as a writer is idle (smart batching)."""
        batch = self.batch
        positions = batch.positions
        aged = (
            force
            or (eager and bool(positions) and self.out.writer_idle())
            or (time.monotonic() - batch.started) * 1000 >= self.settings.batch_max_latency_ms
        )
        while positions:
            size, nbytes = cut(self.sizes, len(positions), self.settings.batch_size, self.batch_bytes)
            if (
                not aged
                and size == len(positions)
                and size < self.settings.batch_size
                and (nbytes + SMALL_RECORD_BYTES <= self.batch_bytes)
            ):
                break  # not full yet, by count nor bytes
            head = Batch(positions[:size], batch.started, nbytes=nbytes)
            if batch.deliveries:
                head.deliveries = {
                    p.entry_id: batch.deliveries[p.entry_id]
                    for p in head.positions
                    if p.entry_id in batch.deliveries
                }
            ids = head.entry_ids()
            self.inflight.update(ids)
            if not self._put(head):
                self.inflight.difference_update(ids)
                return  # stopping while the queue stays full: the rest stays pending
            del positions[:size]
            if self.sizes is not None:
                del self.sizes[:size]
        if not positions:
            batch.deliveries = {}
            self.sizes = None

    def _put(self, batch: Batch) -> bool:
        """Queue a batch, waiting while the queue is full by count or bytes (the back-pressure)."""
        while True:
            try:
                self.out.put_batch(batch, timeout=PUT_WAIT_S)
                return True
            except queue.Full:
                if self.stop_event.is_set():
                    return False

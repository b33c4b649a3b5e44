"""The repair: the timing records of the batches whose domain step failed, or was deferred.

When the CMS's table refuses the stage's query or a value (a column dropped in Directus, a
foreign key), the writer rolls back only the stage's savepoint and the positions commit; the
stage records, in that same transaction, each valid fix each device lost (a row of
``tpx_domain_missed``: :data:`~tpx.domainstage.stage.MARK_SQL`). So does a device whose own step
failed (a bug), and one left for later because its stored state is under a geofence set newer
than this instance's. With ``TPX_DOMAIN_DEFER``, every batch queues its fixes (a row of
``tpx_domain_queue``), which each pass first moves there (:meth:`Repair.unqueue`), and this is
all ``tpx domain`` runs (:mod:`tpx.domainstage.worker`).

:class:`Repair` is the thread of every instance that takes those devices back. Every
:data:`REPAIR_EVERY_S` (:data:`WORKER_EVERY_S` in ``tpx domain``), a pass at a time, in one
transaction per pass, it

1. locks the devices as the writers do (:data:`~tpx.domainstage.stage.LOCK_SQL`) and reads their
   states (memory where current, else the store), and their marks, under the locks;
2. loads the oldest of the fixes each missed, from positions (:data:`MISSED_FIXES_SQL`; at most
   :data:`REPAIR_FIXES` a device, a tenth while serve has a backlog: :meth:`Repair.limits`; the
   rest in the next passes);
3. gives them to the stage's step again, as late fixes (:func:`tpx.domain.advance`): a slice of
   half the late window at a time, oldest first, so that an outage longer than the window
   refuses none; each slice's rows leave ``tpx_domain_missed`` once it is taken, so that a
   replay from positions leaves out exactly the fixes not given back yet;
4. writes the records added and withdrawn and the states.

Once the table takes records again, the failed batches' records are those a sequential replay
gives, whichever instance repairs them. Two limits are logged with the recompute that fixes
them: a device that drove on for longer than the late window past a fix it missed (the fix is
refused, as a late one is), and a geofence edited, and taken, between the failure and the repair
(an edit never rewrites a geofence's past).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from tpx.config import mask_url
from tpx.domain import DeviceState, Fix
from tpx.domainstage.work import Role, Work
from tpx.engine.sqlstate import Fault, classify, describe
from tpx.errors import first_line
from tpx.format import us_iso

if TYPE_CHECKING:
    from tpx.domainstage.stage import DomainStage

log = logging.getLogger(__name__)

#: Some of the devices whose fixes wait in tpx_domain_missed, after %s in key order (a loose scan
#: of its primary key: one index probe a device, however many fixes each has), with how many
#: fixes each, counted up to %s (the next pass's pick: a pass takes at most Repair.limits()); at
#: most %s devices.
MISSED_SQL = """
WITH RECURSIVE d(device_id) AS (
    (SELECT device_id FROM tpx_domain_missed WHERE device_id > %s ORDER BY device_id LIMIT 1)
    UNION ALL
    SELECT (SELECT m.device_id FROM tpx_domain_missed AS m WHERE m.device_id > d.device_id
            ORDER BY m.device_id LIMIT 1)
    FROM d WHERE d.device_id IS NOT NULL
)
SELECT d.device_id, (
    SELECT count(*) FROM (SELECT 1 FROM tpx_domain_missed AS m WHERE m.device_id = d.device_id LIMIT %s) AS c
)
FROM d WHERE d.device_id IS NOT NULL LIMIT %s
"""
#: The oldest fixes some devices missed, at most %s each: device, time (µs), when it was marked
#: (epoch ms: the domain lag).
MISSED_KEYS_SQL = """
SELECT d.device_id, (extract(epoch FROM m.ts) * 1000000)::int8, (extract(epoch FROM m.marked_at) * 1000)::int8
FROM unnest(%s::text[]) AS d(device_id)
CROSS JOIN LATERAL (
    SELECT ts, marked_at FROM tpx_domain_missed
    WHERE tpx_domain_missed.device_id = d.device_id ORDER BY ts LIMIT %s
) AS m
"""
#: Those fixes' rows of positions (none: the row is gone, as past a retention policy), by key: the
#: keys are given, so that the plan is one index lookup each, never a scan of positions.
MISSED_FIXES_SQL = """
SELECT u.device_id, u.t, p.valid, p.latitude, p.longitude, p.speed
FROM unnest(%s::text[], %s::int8[]) AS u(device_id, t)
LEFT JOIN positions AS p
  ON p.device_id = u.device_id AND p.ts = to_timestamp(0) + u.t * interval '1 microsecond'
ORDER BY 1, 2
"""
#: Fixes given back to the stage (or gone from positions): [device, ...], [time in epoch µs, ...].
TAKEN_SQL = """
DELETE FROM tpx_domain_missed AS m
USING unnest(%s::text[], %s::int8[]) AS u(device_id, t)
WHERE m.device_id = u.device_id AND m.ts = to_timestamp(0) + u.t * interval '1 microsecond'
"""
#: Those of some devices that have no fix left to give back (their repair is done).
CLEARED_SQL = """
SELECT d FROM unnest(%s::text[]) AS d
WHERE NOT EXISTS (SELECT 1 FROM tpx_domain_missed AS m WHERE m.device_id = d)
"""
#: How many devices wait for a repair, and since when (``tpx_domain_missed_devices``): a scan of
#: what waits, so taken at most every COUNT_EVERY_S. The oldest mark counts the deferred batches
#: not moved yet too (their devices are counted once moved: a pass's first step).
COUNT_MISSED_SQL = """
SELECT count(DISTINCT device_id), min(ts),
       least(min(marked_at), (SELECT min(marked_at) FROM tpx_domain_queue))
FROM tpx_domain_missed
"""
#: The oldest %s deferred batches (TPX_DOMAIN_DEFER: a row of tpx_domain_queue each) moved into
#: tpx_domain_missed, a key a row with its batch's mark, in one transaction; a key there already
#: (a fix queued twice: its positions row dropped and written again before it was taken) once.
#: ``SKIP LOCKED``: two instances moving at once take different batches.
UNQUEUE_SQL = """
WITH b AS (
    DELETE FROM tpx_domain_queue
    WHERE id IN (SELECT id FROM tpx_domain_queue ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
    RETURNING marked_at, fixes
), moved AS (
    INSERT INTO tpx_domain_missed (device_id, ts, marked_at)
    SELECT split_part(k, ' ', 1), to_timestamp(0) + split_part(k, ' ', 2)::int8 * interval '1 microsecond',
           b.marked_at
    FROM b CROSS JOIN LATERAL string_to_table(b.fixes, E'\\n') AS k
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM b
"""

#: Seconds between the repair thread's passes over the devices failed batches missed.
REPAIR_EVERY_S = 2.0
#: ... and in ``tpx domain`` (TPX_DOMAIN_DEFER), where every batch waits there: the domain lag's
#: floor.
WORKER_EVERY_S = 0.2
#: Seconds between two counts of what waits (the count scans tpx_domain_missed).
COUNT_EVERY_S = 5.0
#: Fixes of deferred batches moved into tpx_domain_missed in one transaction, about (whole
#: batches: TPX_BATCH_SIZE fixes at most each, one batch at least; a pass moves all there are).
UNQUEUE_FIXES = 100_000
#: Devices a repair pass takes in one transaction, at most.
REPAIR_DEVICES = 500
#: Missed fixes a repair pass takes in one transaction, at most (a device with more takes them in
#: several passes): about a second of the writers' device locks held.
REPAIR_FIXES = 20_000
#: ... while serve has a backlog (`tpx domain`, :class:`GivesWay`): short passes between its
#: waits, so that serve never loses the CPU for long (a pass of REPAIR_FIXES takes ~1 s, the
#: worker and its PostgreSQL backend each a core of the two: a drain of a few seconds lost most
#: of one to it)
BUSY_REPAIR_DEVICES = 50
#: ... and missed fixes, then (a device with more takes them in several passes).
BUSY_REPAIR_FIXES = 2_000
#: A failing repair is logged at most once per this many seconds.
REPAIR_LOG_EVERY_S = 30.0


def slices(fixes: Sequence[Fix], span_us: int) -> list[list[Fix]]:
    """Fixes in time order, cut where a slice would span more than ``span_us``: given to
    :func:`tpx.domain.advance` one slice after the other, none is older than the late window
    behind the newest of its slice (what a process that had them in time would have done)."""
    out: list[list[Fix]] = []
    for fix in sorted(fixes, key=lambda f: f.ts_us):
        if out and fix.ts_us - out[-1][0].ts_us <= span_us:
            out[-1].append(fix)
        else:
            out.append([fix])
    return out


class GivesWay(Protocol):
    """What a repair gives way to: in `tpx domain`, serve's backlog
    (:class:`tpx.domainstage.worker.Backlog`)."""

    def busy(self) -> bool:
        """Whether to give way now (passes take :data:`BUSY_REPAIR_DEVICES` at most)."""

    def give_way(self, spent_s: float, stop: threading.Event) -> None:
        """Wait after a pass that took ``spent_s`` (or until ``stop``)."""


class Repair:
    """The repair thread of one :class:`~tpx.domainstage.stage.DomainStage`, and what it counts."""

    def __init__(self, stage: DomainStage) -> None:
        self.stage = stage
        #: devices waiting for a repair, and the oldest fix missed (the last count)
        self.missed: tuple[int, dt.datetime | None] = (0, None)
        #: when the oldest of what waits was marked (the last count), if anything waits
        self.marked_at: dt.datetime | None = None
        self._logged_at = -REPAIR_LOG_EVERY_S
        self._counted_at = -COUNT_EVERY_S
        #: why the last pass failed, until one succeeds (``/readyz`` notes it)
        self.problem: str | None = None
        #: what this repair gives way to (`tpx domain`: serve's backlog; None: nothing)
        self.yields_to: GivesWay | None = None

    def loop(self, stop: threading.Event) -> None:
        """Every :meth:`every_s`: the marked devices, a pass at a time, each pass counted
        first. A pass that fails (the table still refuses, a lock timeout) is logged and the next
        pass goes on after it; all are tried again next time."""
        conn: psycopg.Connection[Any] | None = None
        try:
            while not stop.wait(self.every_s()):
                try:
                    if conn is None or conn.closed:
                        conn = self.stage.connect(autocommit=True)
                    self.drain(conn, stop)
                except psycopg.Error as exc:
                    if conn is None or conn.closed or conn.broken:  # the server is away: the pool says so
                        log.debug("domain repair postponed: %s", mask_url(first_line(exc)))
                        if conn is not None:
                            conn.close()
                    else:  # a count or a pick refused, or timed out
                        self._failed(describe(exc))
                except Exception:  # a bug: the next round tries again
                    self._failed(None)
        finally:
            if conn is not None:
                conn.close()

    def drain(self, conn: psycopg.Connection[Any], stop: threading.Event) -> None:
        """Passes until nothing waits (or a stop), each counted first; a failed pass is logged."""
        after = ""
        while not stop.is_set():
            self.count(conn)  # before passes: the count moves while they fail
            started = time.monotonic()
            after, failure = self._pass(conn, after)
            if failure is not None:
                self._failed(failure)
            else:
                self.problem = None
            if self.yields_to is not None:  # `tpx domain`: the positions first
                self.yields_to.give_way(time.monotonic() - started, stop)
            if not after:
                break

    def every_s(self) -> float:
        """Seconds between rounds (a round: passes until nothing waits)."""
        return WORKER_EVERY_S if self.stage.role is Role.WORKER else REPAIR_EVERY_S

    def run(self, conn: psycopg.Connection[Any], after: str = "") -> str:
        """One pass (``conn`` in autocommit): see :meth:`_pass`; a failure raises."""
        return self._pass(conn, after, raising=True)[0]

    def _pass(
        self, conn: psycopg.Connection[Any], after: str, raising: bool = False
    ) -> tuple[str, str | None]:
        """The marked devices after ``after``, up to :data:`REPAIR_DEVICES` of them or
        :data:`REPAIR_FIXES` missed fixes (at least one device; a tenth of each while serve has
        a backlog, :meth:`limits`), in one transaction: the last
        device of the pass when more may follow (else ""), and why it failed (None: it did not).
        When the server refuses a value (a record naming a geofence deleted since the last
        reload), each device is tried alone: only those concerned stay marked. A lost connection
        raises. Each pass first moves the deferred batches there are into tpx_domain_missed
        (:meth:`unqueue`), so that a round takes what came while it ran, as the devices after
        ``after`` it picks."""
        self.unqueue(conn)
        devices, most = self.limits()
        rows = conn.execute(MISSED_SQL, (after, most + 1, devices)).fetchall()
        found: list[str] = []
        fixes = 0
        for device_id, count in rows:
            if found and fixes + count > most:
                break
            found.append(device_id)
            fixes += count
        if not found:
            return "", None
        more = found[-1] if len(found) < len(rows) or len(rows) == devices else ""
        try:
            self._devices(conn, found, most)
        except psycopg.Error as exc:
            if raising or conn.closed or conn.broken:
                raise
            if len(found) == 1 or classify(exc) is not Fault.ROW:
                return more, describe(exc)
            for device in found:
                try:
                    self._devices(conn, [device], most)
                except psycopg.Error as one:
                    if conn.closed or conn.broken:
                        raise
                    self._failed(describe(one))
        return more, None

    def limits(self) -> tuple[int, int]:
        """Devices and missed fixes a pass takes at most, now."""
        if self.yields_to is not None and self.yields_to.busy():
            return BUSY_REPAIR_DEVICES, BUSY_REPAIR_FIXES
        return REPAIR_DEVICES, REPAIR_FIXES

    def unqueue(self, conn: psycopg.Connection[Any]) -> int:
        """Every deferred batch there is into tpx_domain_missed (:data:`UNQUEUE_SQL`, up to
        :data:`UNQUEUE_FIXES` a transaction: ``conn`` is in autocommit): how many batches."""
        batches = max(1, UNQUEUE_FIXES // self.stage.settings.batch_size)
        moved = 0
        while True:
            row = conn.execute(UNQUEUE_SQL, (batches,)).fetchone()
            n = int(row[0]) if row is not None else 0
            moved += n
            if n < batches:
                return moved

    def count(self, conn: psycopg.Connection[Any]) -> None:
        """Count what waits (at most every :data:`COUNT_EVERY_S`)."""
        if time.monotonic() - self._counted_at < COUNT_EVERY_S:
            return
        self._counted_at = time.monotonic()
        row = conn.execute(COUNT_MISSED_SQL).fetchone()
        if row is not None:
            self.missed, self.marked_at = (int(row[0]), row[1]), row[2]

    def waiting_s(self) -> float:
        """Seconds the oldest fix that waits has waited (at the last count; 0: none waits)."""
        at = self.marked_at
        return 0.0 if at is None else max(0.0, time.time() - at.timestamp())

    def _devices(self, conn: psycopg.Connection[Any], devices: list[str], most: int) -> None:
        """Some marked devices, in a transaction (the module's steps 1 to 4), at most ``most``
        missed fixes each. A device another instance repaired meanwhile is left alone; one whose
        step fails keeps the fixes it has not taken yet."""
        stage = self.stage
        assert stage.source is not None and stage.metrics is not None  # noqa: S101 (domain on)
        geofences = stage.source.current
        window = stage.config.late_window_us
        work = Work()
        with conn.transaction(), conn.cursor() as cur:
            recorded = stage.lock(cur, devices, geofences)
            read = stage.read_devices(cur, devices, geofences, {})
            states = {d: held for d, held in read.states.items() if d in read.missed}
            loaded, gone, marked_ms = self._missed_fixes(cur, sorted(states), most)
            if stage.role is Role.WORKER:  # a deferred fix's lag (a failed batch's repair is none)
                work.oldest_entry_ms = marked_ms
            if gone:  # their rows of positions are gone (a retention policy): nothing to give back
                cur.execute(TAKEN_SQL, ([d for d, _ in gone], [t for _, t in gone]))
            parts = {d: slices(loaded[d], window // 2) for d in states}
            beyond = self._beyond(states, read.missed)
            failed: set[str] = set()
            for r in range(max(map(len, parts.values()), default=0)):
                part = {d: p[r] for d, p in parts.items() if r < len(p) and d not in failed}
                now = {d: states[d] for d in part}
                failed_before = len(work.failed)
                results = stage.advance_devices(cur, now, part, geofences, work)
                stage.write_records(cur, results, work)
                states.update((d, (v, state)) for d, v, state, _ in results)
                failed.update(work.failed[failed_before:])
                taken = [(d, f.ts_us) for d in part if d not in failed for f in part[d]]
                cur.execute(TAKEN_SQL, ([d for d, _ in taken], [t for _, t in taken]))
            stage.write_states(cur, [(d, v + 1, state) for d, (v, state) in states.items()], work)
            cleared = cur.execute(CLEARED_SQL, (sorted(states),)).fetchall()
        stage.settle(work, geofences, recorded, work.failed, None)
        stage.metrics.repaired.inc(len(cleared))
        if stage.role is not Role.WORKER:  # in `tpx domain`, a late fix or an edit is what it is in a writer
            self._warn(states, read.missed, beyond)
        if gone:
            log.warning(
                "%d missed fixes of %d devices are no longer in positions, the oldest at %s: their timing"
                " records cannot be repaired; `tpx timing recompute --since %s` writes what positions hold",
                len(gone),
                len({d for d, _ in gone}),
                us_iso(min(t for _, t in gone)),
                us_iso(min(t for _, t in gone)),
            )

    def _warn(
        self, states: dict[str, tuple[int, DeviceState]], missed: dict[str, int], beyond: dict[str, int]
    ) -> None:
        """The two limits (the module's docstring), each with the recompute that fixes it."""
        edited = {
            d: (gids, missed[d])
            for d, (_, state) in states.items()
            if (gids := sorted((g for g, t in state.anchors.items() if t >= missed[d]), key=str))
        }
        if edited:  # an edit taken after a missed fix: its geofence's records there stay as they are
            since = min(t for _, t in edited.values())
            log.warning(
                "%d devices missed fixes before an edit of geofences %s was taken: their records of"
                " those geofences since %s stay as computed without them; `tpx timing recompute"
                " --geofence ID --since %s` rewrites them",
                len(edited),
                ", ".join(sorted({str(g) for gids, _ in edited.values() for g in gids})),
                us_iso(since),
                us_iso(since),
            )
        if beyond:
            since = min(beyond.values())
            log.warning(
                "%d devices missed fixes older than the late window (TPX_DOMAIN_LATE_WINDOW=%s) behind"
                " their newest by the time they were repaired, the oldest at %s (%s): those change no"
                " timing record; `tpx timing recompute --since %s` (per geofence, or --device) writes them",
                len(beyond),
                self.stage.settings.domain_late_window,
                us_iso(since),
                min(beyond, key=beyond.__getitem__),
                us_iso(since),
            )

    def _beyond(self, states: dict[str, tuple[int, DeviceState]], missed: dict[str, int]) -> dict[str, int]:
        """The devices that drove on for longer than the late window since a fix they missed
        (:func:`tpx.domain.advance` refuses it, as a late fix), with the oldest such fix."""
        window = self.stage.config.late_window_us
        out: dict[str, int] = {}
        for device_id, (_, state) in states.items():
            newest = state.newest_us
            if newest is not None and missed[device_id] < newest - window:
                out[device_id] = missed[device_id]
        return out

    def _missed_fixes(
        self, cur: psycopg.Cursor[Any], devices: list[str], most: int
    ) -> tuple[dict[str, list[Fix]], list[tuple[str, int]], int | None]:
        """The oldest valid fixes each device missed (``most`` at most), from positions, in time
        order (one query); the missed fixes no longer in positions, [(device, time), ...]; and
        when the oldest of them was marked (epoch ms), if any."""
        out: dict[str, list[Fix]] = {d: [] for d in devices}
        gone: list[tuple[str, int]] = []
        keys = cur.execute(MISSED_KEYS_SQL, (devices, most)).fetchall() if devices else []
        marked = min((ms for *_, ms in keys), default=None)
        if keys:
            rows = cur.execute(MISSED_FIXES_SQL, ([d for d, *_ in keys], [t for _, t, _ in keys])).fetchall()
            for device_id, ts_us, valid, lat, lon, speed in rows:
                if valid:
                    out[device_id].append(Fix(ts_us, lat, lon, True, speed))
                else:
                    gone.append((device_id, ts_us))
        return out, gone, marked

    def _failed(self, reason: str | None) -> None:
        """A repair pass failed: ``reason`` (a database error), or None for a bug (its traceback)."""
        why = mask_url(reason) if reason is not None else "a bug (see the log)"
        self.problem = f"domain repair failing: {why}"
        now = time.monotonic()
        if now - self._logged_at >= REPAIR_LOG_EVERY_S:  # it fails every pass alike
            self._logged_at = now
            if reason is None:
                log.exception("domain repair failed; tried again every %.1fs", self.every_s())
            else:
                log.warning(
                    "domain repair failed (%s); tried again every %.1fs", mask_url(reason), self.every_s()
                )
        if reason is not None and reason.startswith("ForeignKeyViolation"):  # a geofence deleted
            self.stage.request_reload()

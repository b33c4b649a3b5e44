"""The domain stage: timing records written in the same transaction as the positions they come from.

:class:`DomainStage` is the engine's :class:`~tpx.engine.stages.TransactionStage`. A writer calls
:meth:`DomainStage.in_transaction` after a batch's rows are in ``positions`` and before COMMIT,
with the rows inserted now (never the duplicates: those went through the domain when they were
first written). For the devices with valid fixes in the batch, in one transaction:

1. lock each device's row in ``tpx_domain_devices`` (:data:`LOCK_SQL`, in one order, so two
   writers never wait on each other in a cycle; the positions are already in, so no lock is held
   while a row waits for another writer's insert);
2. read each device's stored version (``tpx_domain_devices``) and, where it is not the one this
   process holds in memory (another writer or instance moved it on, or this process never saw
   the device), its stored state: one query for the batch. A state stored under a geofence set
   newer than this instance's (another instance reloaded an edit first) is left for the repair
   thread until this instance has reloaded (:meth:`DomainStage._ahead`): a device never goes
   back to the old geofence;
3. :func:`tpx.domain.advance` each device with its fixes; a late fix older than the history in
   memory (:class:`~tpx.domain.NeedsHistory`) is replayed from the positions after the
   checkpoint before it (one query for all such devices of the batch, this batch's own rows
   left out);
4. write the changes: new and changed timing records (``INSERT … ON CONFLICT (id) DO UPDATE``),
   withdrawn ones (``DELETE`` by id), and each device's folded state with its version + 1.

When the step cannot run (the CMS's table refuses its query or a value), the writer rolls back
its savepoint and the positions commit without it; :meth:`DomainStage.failed` then records, in
the same transaction, each valid fix each device lost (a row of ``tpx_domain_missed``:
:data:`MARK_SQL`). A device whose own step failed (a bug) is marked alike. The repair thread of
every instance (:mod:`tpx.domainstage.repair`) gives those fixes to the step again, under each
device's lock. A replay of late fixes from positions (step 3) leaves the fixes still missed out,
as it leaves out the batch's own.

With ``TPX_DOMAIN_DEFER`` (:attr:`Role.QUEUE`), a writer's batch does none of the steps
above: it queues its valid fixes' keys, one row of ``tpx_domain_queue`` for the batch
(:data:`QUEUE_SQL`), and ``tpx domain`` (:mod:`tpx.domainstage.worker`), whose repair thread runs
every 0.2 s, moves them into ``tpx_domain_missed`` and computes and writes their records: the
positions never wait for the domain. A replay (step 3) leaves the queued fixes out too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from psycopg import sql

from tpx.config import Settings, mask_url, parse_duration
from tpx.connections import pg_connect, search_path, writer_timeouts
from tpx.domain import (
    Changes,
    DeviceState,
    Event,
    Fix,
    GeofenceSet,
    NeedsHistory,
    TimingConfig,
    advance,
    fold,
    state_from_json,
    state_text,
    with_history,
)
from tpx.domain.geofences import GeofenceId
from tpx.domain.track import US_PER_S
from tpx.domainstage.geofences import GeofenceSource
from tpx.domainstage.repair import Repair
from tpx.domainstage.tables import CmsTables, TablesMissing, decide
from tpx.domainstage.work import DeviceRead, Role, Work
from tpx.engine.sqlstate import describe
from tpx.engine.stages import AfterCommit, StageStartError
from tpx.errors import first_line
from tpx.records import Position
from tpx.streams import entry_ms

log = logging.getLogger(__name__)

#: Each device's lock: its row in ``tpx_domain_devices``, locked in one statement, in one order
#: (the key's, byte-wise) for every writer, so two writers that share devices never wait on each
#: other in a cycle. A device without a row gets a placeholder (version 0, no state: the cold
#: path) that its state replaces before COMMIT. ``ON CONFLICT DO UPDATE ... WHERE false`` locks an
#: existing row without writing it. Row locks live in the rows, not in PostgreSQL's shared lock
#: table: any number of devices per batch, writers and instances (advisory locks, per device,
#: would run out of ``max_locks_per_transaction``; per bucket of devices, two writers' batches
#: of different devices waited for each other on shared buckets: README, "The domain stage").
LOCK_SQL = """
INSERT INTO tpx_domain_devices (device_id, version, state)
SELECT d, 0, 'null'::jsonb FROM jsonb_array_elements_text(%s::jsonb) AS d ORDER BY d COLLATE "C"
ON CONFLICT (device_id) DO UPDATE SET version = EXCLUDED.version WHERE false
"""
#: Each device's stored version (0: a placeholder, never stored), its state where the version
#: is not the one in memory, and the oldest of its fixes whose records wait (epoch µs), if one
#: does: in tpx_domain_missed (one index probe a device) or still in a deferred batch's row of
#: tpx_domain_queue (the queue is read whole, the batch's devices kept: the repair empties it
#: every pass). A cold device resumes from before it, never from a fix not taken yet (as
#: HISTORY_SQL, one snapshot).
READ_SQL = """
WITH d AS MATERIALIZED (
    SELECT r->>0 AS device_id, (r->>1)::int8 AS version FROM jsonb_array_elements(%s::jsonb) AS r
), queued AS MATERIALIZED (
    SELECT device_id, min(ts_us) AS t FROM tpx_domain_queued
    WHERE device_id IN (SELECT device_id FROM d) GROUP BY 1
)
SELECT s.device_id, s.version,
       CASE WHEN s.version <> 0 AND s.version IS DISTINCT FROM d.version THEN s.state END,
       least(
           (SELECT (extract(epoch FROM m.ts) * 1000000)::int8 FROM tpx_domain_missed AS m
            WHERE m.device_id = s.device_id ORDER BY m.ts LIMIT 1),
           (SELECT queued.t FROM queued WHERE queued.device_id = s.device_id)
       )
FROM d JOIN tpx_domain_devices AS s ON s.device_id = d.device_id
"""
#: Fixes whose timing records wait, [[device, fix time in epoch µs], ...]: a failed batch's, a row
#: each in tpx_domain_missed (a TPX_DOMAIN_DEFER batch's come there from tpx_domain_queue). The keys are the
#: positions' own, new: inserting them waits on no one (no device's row is touched, so a writer
#: never waits for the repair's device locks).
MARK_SQL = """
INSERT INTO tpx_domain_missed (device_id, ts)
SELECT r->>0, to_timestamp(0) + (r->>1)::int8 * interval '1 microsecond'
FROM jsonb_array_elements(%s::jsonb) AS r
ON CONFLICT DO NOTHING
"""
#: A deferred batch's valid fixes, queued for ``tpx domain``: one row of ``tpx_domain_queue`` for
#: the batch, its keys as lines "device_id ts_us" (sql/009). Measured, a record: ~0.4 µs of
#: serve's CPU and ~0.5 of PostgreSQL's, against ~1 and ~6.5 for a key a row in
#: tpx_domain_missed by binary COPY (its primary key: a second index insert a record), and ~2.5
#: of serve's for the same keys as two arrays (psycopg dumps an array item by item).
QUEUE_SQL = "INSERT INTO tpx_domain_queue (fixes) VALUES (%s)"
#: Each device's new version and folded state, as one JSON array of [device, version, state]:
#: one C-level json.dumps for the batch instead of psycopg dumping three arrays item by item.
WRITE_STATE_SQL = """
INSERT INTO tpx_domain_devices (device_id, version, state)
SELECT r->>0, (r->>1)::int8, r->2 FROM jsonb_array_elements(%s::jsonb) AS r
ON CONFLICT (device_id) DO UPDATE
SET version = EXCLUDED.version, state = EXCLUDED.state, updated_at = now()
"""
#: The valid fixes of some devices in a time range (a replay of late fixes), oldest first,
#: without those whose records are not written yet: a failed batch's (tpx_domain_missed) and a
#: deferred batch's (tpx_domain_queue, before the repair moves them to tpx_domain_missed). One
#: statement, so one snapshot for the three tables: a fix whose positions row it sees is in one
#: of the two, or taken (the move is one transaction, the queue row commits with the positions).
HISTORY_SQL = """
WITH queued AS MATERIALIZED (
    SELECT device_id, ts_us AS t FROM tpx_domain_queued WHERE device_id = ANY(%(devices)s::text[])
)
SELECT d.device_id, p.t, p.latitude, p.longitude, p.speed
FROM unnest(%(devices)s::text[], %(since)s::int8[], %(until)s::int8[]) AS d(device_id, since_us, until_us)
CROSS JOIN LATERAL (
    SELECT (extract(epoch FROM ts) * 1000000)::int8 AS t, ts, latitude, longitude, speed FROM positions
    WHERE positions.device_id = d.device_id AND positions.valid
      AND (d.since_us IS NULL OR positions.ts > to_timestamp(0) + d.since_us * interval '1 microsecond')
      AND (d.until_us IS NULL OR positions.ts <= to_timestamp(0) + d.until_us * interval '1 microsecond')
      AND NOT EXISTS (  -- a fix a failed batch missed is not in the history yet
          SELECT 1 FROM tpx_domain_missed AS m WHERE m.device_id = positions.device_id AND m.ts = positions.ts
      )
    ORDER BY ts
) AS p
WHERE NOT EXISTS (SELECT 1 FROM queued WHERE queued.device_id = d.device_id AND queued.t = p.t)
ORDER BY d.device_id, p.ts
"""
GENERATION_SQL = "SELECT fingerprints FROM tpx_domain_generations WHERE generation = %s"
#: When instances last switched to some generations (the database's clock: one for all of them).
ADOPTED_SQL = "SELECT generation, adopted_at FROM tpx_domain_generations WHERE generation = ANY(%s::text[])"
COUNT_RECOMPUTES_SQL = "SELECT count(*) FROM tpx_domain_recomputes"
SAVE_GENERATION_SQL = """
INSERT INTO tpx_domain_generations (generation, fingerprints) VALUES (%s, %s)
ON CONFLICT (generation) DO NOTHING
"""
#: An instance switched to a generation (it loaded the table and found it): its adoption, now.
ADOPT_GENERATION_SQL = """
INSERT INTO tpx_domain_generations (generation, fingerprints) VALUES (%s, %s)
ON CONFLICT (generation) DO UPDATE SET adopted_at = now()
"""


def timing_statements(tables: CmsTables) -> tuple[sql.Composed, sql.Composed]:
    """The upsert and the delete of timing records, for the columns this table has."""
    optional = [c for c in ("speed", "direction", "uncertainty_s") if c in tables.timing_columns]
    columns = ["id", "device_id", "geofence", "event", "ts", "latitude", "longitude", *optional]
    # every value travels as an array of one type; the geofence id as text, cast to its column's
    # type (integer, uuid...) as the catalogue names it
    source = {
        "id": sql.SQL("unnest(%(id)s::uuid[])"),
        "device_id": sql.SQL("unnest(%(device_id)s::text[])"),
        "geofence": sql.SQL("unnest(%(geofence)s::text[])::{}").format(sql.SQL(tables.geofence_id_type)),
        "event": sql.SQL("unnest(%(event)s::text[])"),
        "ts": sql.SQL("to_timestamp(0) + unnest(%(ts_ms)s::int8[]) * interval '1 millisecond'"),
        "latitude": sql.SQL("unnest(%(latitude)s::float8[])"),
        "longitude": sql.SQL("unnest(%(longitude)s::float8[])"),
        "speed": sql.SQL("unnest(%(speed)s::float8[])"),
        "direction": sql.SQL("unnest(%(direction)s::int4[])"),
        "uncertainty_s": sql.SQL("unnest(%(uncertainty_s)s::float8[])"),
    }
    names = [*columns, *(["date_created"] if "date_created" in tables.timing_columns else [])]
    values = [source[c] for c in columns] + ([sql.SQL("now()")] if "date_created" in names else [])
    updates = [c for c in columns if c not in ("id", "device_id", "geofence", "event", "ts")]
    upsert = sql.SQL(
        "INSERT INTO {table} ({names}) SELECT {values} ON CONFLICT (id) DO UPDATE SET {updates}"
    ).format(
        table=tables.timing_ident(),
        names=sql.SQL(", ").join(map(sql.Identifier, names)),
        values=sql.SQL(", ").join(values),
        updates=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates),
    )
    delete = sql.SQL("DELETE FROM {} WHERE id = ANY(%s::uuid[])").format(tables.timing_ident())
    return upsert, delete


def resume_statement(tables: CmsTables) -> sql.Composed:
    """Cold devices: each one's newest timing record per geofence, and its newest valid fix
    before this batch's oldest (the batch's rows are in positions already; no system column is
    read, which a compressed TimescaleDB chunk would refuse)."""
    return sql.SQL(
        """
WITH d AS (
    SELECT r->>0 AS device_id, to_timestamp(0) + (r->>1)::int8 * interval '1 microsecond' AS before
    FROM jsonb_array_elements(%s::jsonb) AS r
)
SELECT d.device_id, t.geofence::text, t.event, NULL::int8, NULL::float8, NULL::float8, NULL::float4
FROM d CROSS JOIN LATERAL (
    SELECT DISTINCT ON (geofence) geofence, event FROM {timing}
    WHERE {timing}.device_id = d.device_id ORDER BY geofence, ts DESC
) AS t
UNION ALL
SELECT d.device_id, NULL, NULL, (extract(epoch FROM p.ts) * 1000000)::int8, p.latitude, p.longitude, p.speed
FROM d CROSS JOIN LATERAL (
    SELECT ts, latitude, longitude, speed FROM positions
    WHERE positions.device_id = d.device_id AND positions.valid AND positions.ts < d.before
    ORDER BY ts DESC LIMIT 1
) AS p
"""
    ).format(timing=tables.timing_ident())


def _generation_params(geofences: GeofenceSet) -> tuple[str, str]:
    return geofences.generation, json.dumps(list(geofences.fingerprints.items()))


def timing_params(events: Sequence[Event]) -> dict[str, list[Any]]:
    return {
        "id": [e.id for e in events],
        "device_id": [e.device_id for e in events],
        "geofence": [str(e.geofence) for e in events],
        "event": [e.event for e in events],
        "ts_ms": [e.ts_ms for e in events],
        "latitude": [e.latitude for e in events],
        "longitude": [e.longitude for e in events],
        "speed": [e.speed for e in events],
        "direction": [e.direction for e in events],
        "uncertainty_s": [e.uncertainty_s for e in events],
    }


def queue(conn: psycopg.Connection[Any], positions: Iterable[Position]) -> None:
    """TPX_DOMAIN_DEFER: the valid fixes' keys, one row of tpx_domain_queue (:data:`QUEUE_SQL`)."""
    keys = "\n".join([f"{p.device_id} {p.ts_us}" for p in positions if p.valid])
    if keys:
        conn.execute(QUEUE_SQL, (keys,), prepare=True)


def fix_of(p: Position) -> Fix:
    return Fix(p.ts_us, p.latitude, p.longitude, p.valid, p.speed)


def _marks(lost: Mapping[str, Iterable[Fix]]) -> str:
    """:data:`MARK_SQL`'s parameter: each fix lost, as [device, time]."""
    return json.dumps([[d, f.ts_us] for d, fixes in lost.items() for f in fixes])


class StateCache:
    """Each device's (version, state) as this process last committed it; a bounded LRU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, tuple[int, DeviceState]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, device_id: str) -> tuple[int, DeviceState] | None:
        return self.get_many([device_id])[device_id]

    def get_many(self, device_ids: Iterable[str]) -> dict[str, tuple[int, DeviceState] | None]:
        """:meth:`get` of each device, under one hold of the lock (a batch's devices)."""
        with self._lock:
            data = self._data
            found = {d: data.get(d) for d in device_ids}
            for device_id, held in found.items():
                if held is not None:
                    data.move_to_end(device_id)
            return found

    def put_all(self, items: Iterable[tuple[str, int, DeviceState]]) -> None:
        with self._lock:
            data = self._data
            for device_id, version, state in items:
                data[device_id] = (version, state)
                data.move_to_end(device_id)
            while len(data) > self.capacity:
                data.popitem(last=False)

    def drop(self, device_ids: Iterable[str]) -> None:
        with self._lock:
            for device_id in device_ids:
                self._data.pop(device_id, None)

    def __len__(self) -> int:
        return len(self._data)


class DomainMetrics:
    def __init__(self, registry: CollectorRegistry, stage: DomainStage) -> None:
        self.records = Counter(
            "tpx_timing_records_written",
            "Timing records written (new or changed)",
            ["event"],
            registry=registry,
        )
        for kind in ("enter", "exit", "cross"):
            self.records.labels(kind)  # exported as 0 from the start
        self.withdrawn = Counter(
            "tpx_timing_records_deleted",
            "Timing records withdrawn (a late fix changed the track)",
            registry=registry,
        )
        self.late = Counter(
            "tpx_domain_late_fixes",
            "Valid fixes too late to change timing records (stored in positions only)",
            registry=registry,
        )
        self.replays = Counter(
            "tpx_domain_replays",
            "Late fixes replayed from positions (older than the history in memory)",
            registry=registry,
        )
        self.device_errors = Counter(
            "tpx_domain_device_errors",
            "Devices whose domain step failed (marked for the repair)",
            registry=registry,
        )
        self.repaired = Counter(
            "tpx_domain_repaired",
            "Devices whose timing records a failed batch missed, written since by the repair",
            registry=registry,
        )
        Gauge(
            "tpx_domain_missed_devices",
            "Devices whose timing records wait for the repair or `tpx domain` (all instances)",
            registry=registry,
        ).set_function(lambda: float(stage.repair.missed[0]))
        Gauge(
            "tpx_domain_waiting_seconds",
            "Age of the oldest fix whose timing records wait for the repair or `tpx domain` (0: none)",
            registry=registry,
        ).set_function(stage.repair.waiting_s)
        self.seconds = Histogram(
            "tpx_domain_seconds",
            "Time the domain stage adds to a batch's transaction",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.lag = Histogram(
            "tpx_domain_lag_seconds",
            "A record's age (since the gateway added it) when its timing records committed",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=registry,
        )
        self.recomputes = Gauge(
            "tpx_timing_recomputes",
            "tpx timing recompute runs that changed records (tpx_domain_recomputes; read each reload)",
            registry=registry,
        )
        Gauge("tpx_geofences_loaded", "Active geofences in use", registry=registry).set_function(
            lambda: float(len(stage.geofences()))
        )
        Gauge("tpx_geofences_invalid", "Geofences skipped as invalid", registry=registry).set_function(
            lambda: float(len(stage.geofences().invalid))
        )
        Gauge(
            "tpx_domain_cache_size", "Devices whose domain state is in memory", registry=registry
        ).set_function(lambda: float(len(stage.cache)))


class DomainStage:
    """The engine's transaction stage for geofence membership and timing records."""

    name = "domain"

    def __init__(self, settings: Settings, *, worker: bool = False) -> None:
        self.settings = settings
        self.role = Role.WORKER if worker else Role.QUEUE if settings.domain_defer else Role.INLINE
        self.config = TimingConfig(
            max_speed_kmh=settings.max_speed_kmh,
            late_window_us=int(parse_duration(settings.domain_late_window) * US_PER_S),
            max_history=settings.domain_max_history,
        )
        self.cache = StateCache(settings.device_cache_size)
        self.tables: CmsTables | None = None
        self.source: GeofenceSource | None = None
        self.metrics: DomainMetrics | None = None
        self._threads: list[threading.Thread] = []
        self._upsert: sql.Composed | None = None
        self._resume_sql: sql.Composed | None = None
        self._delete: sql.Composed | None = None
        #: generation -> fingerprints, for states written under a set this process did not load
        self._fingerprints: dict[str, Mapping[GeofenceId, str]] = {}
        self._problem: str | None = None
        self._device_error_logged_at = -DEVICE_ERROR_LOG_EVERY_S
        #: generations known to be in tpx_domain_generations (a writer records one before use)
        self._recorded: set[str] = set()
        #: the repair of what failed batches missed (its thread starts with the stage's)
        self.repair = Repair(self)
        #: (generation, adopted at) of stored states newer than the set here -> when this instance
        #: first met each (a redone edit is adopted again: met again)
        self._foreign: dict[tuple[str, dt.datetime], float] = {}

    # --- lifecycle ---

    def connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A connection of the stage's own (start-up, reloads, repairs), with tpx's search_path
        and the writers' lock and statement timeouts: a reload queued behind a Directus ``ALTER
        TABLE`` gives up and is tried again, it never holds the reload thread for good."""
        conn = pg_connect(self.settings.database_url, "tpx-domain", autocommit=autocommit)
        try:
            conn.execute(search_path(self.settings))
            for statement in writer_timeouts(self.settings):
                conn.execute(statement.as_string(conn))
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def open(self, registry: CollectorRegistry, stop: threading.Event) -> str:
        try:
            with self.connect() as conn:
                tables, line = decide(conn, self.settings)
                if tables is None:
                    return line
                if self.role is Role.QUEUE:  # the worker loads the geofences, computes, writes and
                    # has the metrics; a batch here only queues. Loading 1,000 geofences took
                    # serve's start-up from ~0.7 s to ~1.4 s (bench_domain_pipeline), and kept,
                    # their objects cost the writers a quarter of their throughput (the GC's passes)
                    self.tables = tables
                    self._export_mode(registry)
                    return f"{line}; deferred: `tpx domain` loads the geofences and writes the timing records"
                source = GeofenceSource(self.connect, tables, self.settings.geofences_reload_s)
                geofences = source.load(time.monotonic())
        except TablesMissing as exc:
            raise StageStartError(f"{exc} (TPX_DOMAIN=on)") from None
        except psycopg.OperationalError as exc:
            raise StageStartError(
                f"cannot reach PostgreSQL for the domain: {mask_url(first_line(exc))}", usage=False
            ) from None
        except psycopg.Error as exc:  # the tables check out but reading them fails (a view, a cast)
            raise StageStartError(
                f"the domain cannot read {self.settings.geofences_table}: {mask_url(describe(exc))}"
            ) from None
        self.tables = tables
        self._export_mode(registry)
        self.source = source
        self._upsert, self._delete = timing_statements(tables)
        self._resume_sql = resume_statement(tables)
        self.metrics = DomainMetrics(registry, self)
        self._remember_generation(geofences)
        reloader = threading.Thread(target=self._reload_loop, args=(stop,), name="tpx-geofences", daemon=True)
        repairer = threading.Thread(
            target=self.repair.loop, args=(stop,), name="tpx-domain-repair", daemon=True
        )
        for thread in (reloader, repairer):
            thread.start()
        self._threads = [reloader, repairer]
        return f"{line}; {len(geofences)} geofences loaded, {len(geofences.invalid)} invalid"

    def _export_mode(self, registry: CollectorRegistry) -> None:
        deferred = Gauge(
            "tpx_domain_deferred",
            "1: serve only queues the fixes, `tpx domain` takes them",
            registry=registry,
        )
        deferred.set(1 if self.role is Role.QUEUE else 0)

    def threads(self) -> Sequence[threading.Thread]:
        return self._threads

    def health(self) -> str | None:
        if self._problem is not None:
            return self._problem
        if self.repair.problem is not None:
            return self.repair.problem
        waiting, oldest = self.repair.missed
        if waiting and oldest is not None:
            when = oldest.astimezone(dt.UTC).isoformat(timespec="seconds")
            return f"{waiting} devices wait for the repair of the timing records missed since {when}"
        return None

    def geofences(self) -> GeofenceSet:
        assert self.source is not None  # noqa: S101 (open() returned with the domain on)
        return self.source.current

    def request_reload(self) -> bool:
        """A reload at once; False where this stage holds no geofences (a serve that only queues)."""
        if self.source is None:
            return False
        self.source.request_reload()
        return True

    def _reload_loop(self, stop: threading.Event) -> None:
        source = self.source
        assert source is not None  # noqa: S101
        counted_at = float("-inf")
        while not stop.wait(RELOAD_POLL_S):
            try:
                before = source.current.generation
                current = source.maybe_reload(time.monotonic())
                if current.generation != before:
                    self._remember_generation(current)
                if time.monotonic() - counted_at >= self.settings.geofences_reload_s:
                    counted_at = time.monotonic()
                    self._count_recomputes()
            except Exception:  # one bad reload must not stop every later one: keep the current set
                log.exception("geofence reload failed; keeping the geofences loaded before")
                self.stop_wait(stop)

    def stop_wait(self, stop: threading.Event) -> None:
        """After a failed reload: wait one reload period (or the stop) before the next try."""
        stop.wait(self.settings.geofences_reload_s)

    def _count_recomputes(self) -> None:
        """Refresh ``tpx_timing_recomputes`` from the audit table (a best effort, like the reload)."""
        try:
            with self.connect() as conn:
                row = conn.execute(COUNT_RECOMPUTES_SQL).fetchone()
        except psycopg.Error as exc:
            log.debug("could not count recomputes: %s", mask_url(first_line(exc)))
            return
        if row is not None and self.metrics is not None:
            self.metrics.recomputes.set(int(row[0]))

    def _remember_generation(self, geofences: GeofenceSet) -> None:
        """Record a set's fingerprints before any writer uses it (other instances read them), and
        that this instance adopted it now (:meth:`_ahead`)."""
        self._fingerprints[geofences.generation] = geofences.fingerprints
        try:
            with self.connect() as conn:
                conn.execute(ADOPT_GENERATION_SQL, _generation_params(geofences))
        except psycopg.Error as exc:  # each writer's first batch under it records it anyway
            log.warning(
                "could not record geofence generation %s: %s", geofences.generation, mask_url(first_line(exc))
            )
            return
        self._recorded.add(geofences.generation)

    # --- the transaction step ---

    def failed(self, conn: psycopg.Connection[Any], inserted: Sequence[Position], reason: str) -> None:
        self.cache.drop({p.device_id for p in inserted})
        self._problem = f"domain stage failing: {reason}"
        if reason.startswith("ForeignKeyViolation"):  # a geofence deleted since the last reload
            self.request_reload()
        lost: dict[str, list[Fix]] = {}
        for p in inserted:
            if p.valid:
                lost.setdefault(p.device_id, []).append(fix_of(p))
        if lost and self.tables is not None:
            conn.execute(MARK_SQL, (_marks(lost),))

    def in_transaction(
        self, conn: psycopg.Connection[Any], inserted: Sequence[Position]
    ) -> AfterCommit | None:
        if self.role is Role.QUEUE:
            if self.tables is not None:
                queue(conn, inserted)
            return self._cleared if self._problem is not None else None
        if self.source is None:
            return None
        started = time.monotonic()
        by_device: dict[str, list[Fix]] = {}
        oldest_ms: int | None = None
        for p in inserted:
            if p.valid:
                by_device.setdefault(p.device_id, []).append(fix_of(p))
                ms = entry_ms(p.entry_id)
                oldest_ms = ms if oldest_ms is None or ms < oldest_ms else oldest_ms
        if not by_device:
            return None
        geofences = self.source.current
        devices = sorted(by_device)
        work = Work(oldest_entry_ms=oldest_ms)
        with conn.cursor() as cur:
            recorded = self.lock(cur, devices, geofences)
            read = self.read_devices(cur, devices, geofences, by_device)
            results = self.advance_devices(cur, read.states, by_device, geofences, work)
            self.write_records(cur, results, work)
            self.write_states(cur, [(d, v + 1, state) for d, v, state, _ in results], work)
            left = work.failed + read.deferred
            if left:  # their records of this batch wait for the repair thread
                cur.execute(MARK_SQL, (_marks({d: by_device[d] for d in left}),))
        spent = time.monotonic() - started

        def after_commit() -> None:
            self.settle(work, geofences, recorded, left, spent)
            self._problem = None

        return after_commit

    def _cleared(self) -> None:
        """After a queued batch's COMMIT: the stage works again."""
        self._problem = None

    # --- the steps of a transaction (a writer's batch, a repair's pass) ---

    def lock(self, cur: psycopg.Cursor[Any], devices: list[str], geofences: GeofenceSet) -> bool:
        """Lock ``devices`` (:data:`LOCK_SQL`), the set's generation recorded first (a state is
        never stored under a generation others cannot read); whether it was known recorded."""
        recorded = geofences.generation in self._recorded
        if not recorded:
            cur.execute(SAVE_GENERATION_SQL, _generation_params(geofences))
        cur.execute(LOCK_SQL, (json.dumps(devices),))
        return recorded

    def settle(
        self, work: Work, geofences: GeofenceSet, recorded: bool, dropped: Iterable[str], spent: float | None
    ) -> None:
        """After COMMIT: memory takes the new states, forgets ``dropped``, and the work is counted
        (``spent``: the time it added to a batch; None: a repair)."""
        if not recorded:
            self._recorded.add(geofences.generation)
        self.cache.put_all(work.states)
        self.cache.drop(dropped)
        self.account(work, spent)

    def read_devices(
        self,
        cur: psycopg.Cursor[Any],
        devices: list[str],
        geofences: GeofenceSet,
        by_device: dict[str, list[Fix]],
    ) -> DeviceRead:
        """Each device's current (version, state): memory where it is current, else the store;
        the oldest fix a failed batch missed, of the devices marked so; and those whose stored
        state waits for this instance's reload."""
        held = self.cache.get_many(devices)
        versions = [h[0] if h is not None else None for h in held.values()]
        rows = cur.execute(READ_SQL, (json.dumps(list(zip(devices, versions, strict=True))),)).fetchall()
        out: dict[str, tuple[int, DeviceState]] = {}
        missed: dict[str, int] = {}
        deferred: list[str] = []
        adopted = self._adoptions(cur, rows, geofences)
        for device_id, version, stored, missed_us in rows:
            if missed_us is not None:
                missed[device_id] = missed_us
            if version == 0:  # a placeholder: never stored (cold, below)
                continue
            if stored is None:
                mine = held[device_id]
                assert mine is not None  # noqa: S101 (same version: memory holds it)
                out[device_id] = (version, mine[1])
                continue
            if adopted and self._ahead(stored.get("generation"), geofences, adopted):
                deferred.append(device_id)
                continue
            try:
                state = state_from_json(stored, self._versions(cur, stored.get("generation")), device_id)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("domain state of %s unreadable (%s): starting it afresh", device_id, exc)
                state = DeviceState(device_id)
            out[device_id] = (version, state)
        cold = [d for d in devices if d not in out and d not in deferred]
        if cold:  # resumed from before the oldest fix of the batch, or missed before it
            oldest = []
            for d in cold:
                times = [f.ts_us for f in by_device.get(d, ())] + ([missed[d]] if d in missed else [])
                if times:
                    oldest.append([d, min(times)])
            out.update((d, (0, state)) for d, state in self._resume(cur, oldest, geofences).items())
        return DeviceRead(out, missed, deferred)

    def _adoptions(
        self, cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]], geofences: GeofenceSet
    ) -> dict[str, dt.datetime]:
        """When the generations of the stored states read, other than this batch's, and this
        batch's were last adopted (one query, only when a batch meets another generation)."""
        ours = geofences.generation
        others = {
            g
            for _, version, stored, _ in rows
            if version and isinstance(stored, dict)
            if isinstance(g := stored.get("generation"), str) and g != ours
        }
        if not others:
            return {}
        return dict(cur.execute(ADOPTED_SQL, (sorted({*others, ours}),)).fetchall())

    def _ahead(self, generation: object, geofences: GeofenceSet, adopted: Mapping[str, dt.datetime]) -> bool:
        """Whether a stored state's geofence set may be newer than this batch's: adopted after
        it by some instance, and either this instance has reloaded since the batch took its set,
        or it met that generation after its last read of the table started. A reload is asked
        for at once; once a read that started after the first meeting is done, the set here is
        as new as the table: no longer ahead. (A state under a set adopted before, as after this
        instance's own reload or a restart, is reconciled as ever.)"""
        if not isinstance(generation, str) or generation == geofences.generation:
            return False
        theirs, ours = adopted.get(generation), adopted.get(geofences.generation)
        if theirs is None or ours is None or theirs <= ours:
            return False
        source = self.source
        assert source is not None  # noqa: S101 (domain on)
        if source.current is not geofences:  # reloaded since this batch began: the repair takes it
            return True
        met = self._foreign.get((generation, theirs))
        if met is None:
            if len(self._foreign) >= MAX_FOREIGN_GENERATIONS:
                self._foreign.clear()
            met = self._foreign[(generation, theirs)] = time.monotonic()
            log.info(
                "geofences: a device state is under generation %s, not %s here: reloading before"
                " its devices go on (the repair takes them after)",
                generation,
                geofences.generation,
            )
        if source.read_at >= met:
            return False
        self.request_reload()
        return True

    def _resume(
        self, cur: psycopg.Cursor[Any], oldest: list[list[Any]], geofences: GeofenceSet
    ) -> dict[str, DeviceState]:
        """Devices without a stored state (new, or the bookkeeping was lost): their membership from
        their newest timing record per geofence (an enter: inside) and their last valid fix before
        this batch, in one query. Without a fix it starts afresh; without timing records, inside
        what that fix is in (no past, no event either way)."""
        assert self._resume_sql is not None  # noqa: S101
        rows = cur.execute(self._resume_sql, (json.dumps(oldest),)).fetchall()
        ids = {str(gid): gid for gid in geofences.by_id}  # the column's type, as the set has it
        inside: dict[str, set[GeofenceId]] = {}
        last: dict[str, Fix] = {}
        for device_id, geofence, event, ts_us, lat, lon, speed in rows:
            if geofence is not None:
                members = inside.setdefault(device_id, set())
                if event == "enter" and geofence in ids:
                    members.add(ids[geofence])
            if ts_us is not None:
                last[device_id] = Fix(ts_us, lat, lon, True, speed)
        out: dict[str, DeviceState] = {}
        for device_id, _ in oldest:
            fix = last.get(device_id)
            if fix is None:
                out[device_id] = DeviceState(device_id)
                continue
            # no timing record (the domain was off when it drove): inside where that fix is
            now = inside[device_id] if device_id in inside else geofences.areas_at(fix.lon, fix.lat)
            out[device_id] = DeviceState.resume(device_id, now, fix, geofences)
        return out

    def _versions(self, cur: psycopg.Cursor[Any], generation: object) -> Mapping[GeofenceId, str] | None:
        if not isinstance(generation, str):
            return None
        known = self._fingerprints.get(generation)
        if known is None:
            row = cur.execute(GENERATION_SQL, (generation,)).fetchone()
            if row is None:
                return None
            known = {g: str(fp) for g, fp in row[0]}
            self._fingerprints[generation] = known
        return known

    def advance_devices(
        self,
        cur: psycopg.Cursor[Any],
        states: dict[str, tuple[int, DeviceState]],
        by_device: dict[str, list[Fix]],
        geofences: GeofenceSet,
        work: Work,
    ) -> list[tuple[str, int, DeviceState, Changes]]:
        """Each device's fixes through :func:`tpx.domain.advance` (a late one older than the
        history in memory replayed from positions first)."""
        results: list[tuple[str, int, DeviceState, Changes]] = []
        needs: dict[str, NeedsHistory] = {}
        for device_id, (version, state) in states.items():
            try:
                new, changes = advance(state, geofences, by_device[device_id], self.config)
            except NeedsHistory as need:
                needs[device_id] = need
                continue
            except Exception:  # one device's bug must not cost the others their records
                self._device_failed(device_id, work)
                continue
            results.append((device_id, version, new, changes))
        if needs:
            results += self._replay(cur, states, needs, by_device, geofences, work)
        return results

    def _replay(
        self,
        cur: psycopg.Cursor[Any],
        states: dict[str, tuple[int, DeviceState]],
        needs: dict[str, NeedsHistory],
        by_device: dict[str, list[Fix]],
        geofences: GeofenceSet,
        work: Work,
    ) -> list[tuple[str, int, DeviceState, Changes]]:
        """Late fixes older than the history in memory: replay the positions since the
        checkpoint before them (one query for all such devices; this batch's rows, and the
        fixes a failed batch missed that are not given back yet, left out)."""
        devices = sorted(needs)
        rows = cur.execute(
            HISTORY_SQL,
            {
                "devices": devices,
                "since": [needs[d].since_us for d in devices],
                "until": [needs[d].until_us for d in devices],
            },
        ).fetchall()
        loaded: dict[str, list[Fix]] = {d: [] for d in devices}
        for device_id, ts_us, lat, lon, speed in rows:
            loaded[device_id].append(Fix(ts_us, lat, lon, True, speed))
        results = []
        for device_id in devices:
            version, state = states[device_id]
            batch = by_device[device_id]
            mine = {f.ts_us for f in batch}
            try:
                history = [f for f in loaded[device_id] if f.ts_us not in mine]
                state = with_history(state, geofences, history, needs[device_id].since_us, self.config)
                new, changes = advance(state, geofences, batch, self.config)
            except Exception:  # as above: this device only
                self._device_failed(device_id, work)
                continue
            work.replays += 1
            results.append((device_id, version, new, changes))
        return results

    def _device_failed(self, device_id: str, work: Work) -> None:
        now = time.monotonic()
        if now - self._device_error_logged_at >= DEVICE_ERROR_LOG_EVERY_S:  # a bug repeats: not per batch
            self._device_error_logged_at = now
            log.exception("domain step failed for device %s; its records of this batch skipped", device_id)
        work.failed.append(device_id)
        if self.metrics is not None:
            self.metrics.device_errors.inc()

    def write_records(
        self, cur: psycopg.Cursor[Any], results: list[tuple[str, int, DeviceState, Changes]], work: Work
    ) -> None:
        """The timing records the devices' steps added and withdrew."""
        added = [e for *_, changes in results for e in changes.added]
        deleted = [e.id for *_, changes in results for e in changes.deleted]
        if deleted:
            assert self._delete is not None  # noqa: S101
            cur.execute(self._delete, (deleted,))
        if added:
            assert self._upsert is not None  # noqa: S101
            cur.execute(self._upsert, timing_params(added))
        work.changes += [changes for *_, changes in results]

    def write_states(
        self, cur: psycopg.Cursor[Any], changed: list[tuple[str, int, DeviceState]], work: Work
    ) -> None:
        """Each device's new (version, state), folded."""
        if changed:
            config = self.config
            dumps = json.dumps
            rows = ",".join([f"[{dumps(d)},{v},{state_text(fold(s, config))}]" for d, v, s in changed])
            cur.execute(WRITE_STATE_SQL, (f"[{rows}]",))
        work.states += changed

    def account(self, work: Work, spent: float | None) -> None:
        """Count a committed step's work (as :meth:`settle`)."""
        m = self.metrics
        if m is None:
            return
        if spent is not None:
            m.seconds.observe(spent)
        for changes in work.changes:
            for e in changes.added:
                m.records.labels(e.event).inc()
            if changes.deleted:
                m.withdrawn.inc(len(changes.deleted))
            if changes.too_late:
                m.late.inc(changes.too_late)
        if work.replays:
            m.replays.inc(work.replays)
        if work.oldest_entry_ms is not None:
            m.lag.observe(max(0.0, time.time() - work.oldest_entry_ms / 1000))


#: Generations of other instances' states remembered (cleared when full: each is met again).
MAX_FOREIGN_GENERATIONS = 256

#: A device whose step fails (a bug) is logged with its traceback at most once per this many
#: seconds per instance (tpx_domain_device_errors_total counts every one).
DEVICE_ERROR_LOG_EVERY_S = 30.0
#: Seconds between the reload thread's looks at the clock (a reload is due every
#: TPX_GEOFENCES_RELOAD_S, or at once on a request).
RELOAD_POLL_S = 0.5

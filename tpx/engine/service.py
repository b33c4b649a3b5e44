"""The engine: wires the reader, the queue, the writers and the HTTP listener.

Start-up order: reach Redis, migrate (unless turned off) or check the schema,
open the Postgres pool, start the writers, the reader, the HTTP listener.

Shutdown order (one time budget, ``drain_timeout_s``, shared by every step):

1. the reader stops reading; it queues the batch it holds if the queue has
   room, and exits (what it could not queue stays pending in the stream);
2. one stop sentinel per writer goes on the queue *behind* the queued batches,
   so the writers drain everything that was read before they stop;
3. the writers are joined; if the budget runs out first, ``abort`` is set: a
   writer stuck retrying gives up, leaving its batch unacknowledged (pending,
   to be redelivered — never lost, and idempotent when written again);
4. the tail, at most :data:`SHUTDOWN_TAIL_S` more, one deadline shared by every
   join and close that follows: the heartbeat (its key is deleted, so ops see the
   instance leave at once), the control listener, the HTTP listener, the pool and
   Redis are told to stop at once, then joined, each with what is left of the
   tail; a thread still blocked then (a query waiting on a lock, a socket to a
   server that stopped answering) is left behind: every thread is a daemon, and
   what it held stays pending.

So a stop takes at most ``drain_timeout_s + SHUTDOWN_TAIL_S`` (8 + 1 s by
default, inside Docker's 10 s).

Readers and writers only ever acknowledge what was committed (or
dead-lettered), so any exit, clean or not, keeps the delivery guarantee.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import psycopg
import redis
from psycopg_pool import ConnectionPool

from tpx import __version__, exitcodes, logs
from tpx.config import Settings
from tpx.connections import pg_connect, pg_pool, redis_client, writer_timeouts
from tpx.engine.budget import BatchQueue
from tpx.engine.collector import StreamCollector
from tpx.engine.commit import CREATE_STAGE_SQL
from tpx.engine.heartbeat import Control, Heartbeat
from tpx.engine.http import HealthServer
from tpx.engine.metrics import Metrics
from tpx.engine.probe import BoundedCheck
from tpx.engine.reader import Reader, ensure_group
from tpx.engine.stages import PostCommitStage, StageStartError, TransactionStage
from tpx.engine.state import DeviceStates
from tpx.engine.writer import Writer
from tpx.errors import first_line
from tpx.schema import SchemaBehind, Storage, current_version, latest_version, migrate_for, require_current

log = logging.getLogger(__name__)

#: Seconds a stop may take after the drain budget (TPX_DRAIN_TIMEOUT_S): every join and close
#: after the drain shares this one deadline, so 8 s of drain stops within 9 s, inside Docker's 10.
SHUTDOWN_TAIL_S = 1.0
#: Seconds between the main thread's looks at the stop flag and the threads' health (a crash is
#: also signalled at once through ``wake``).
WATCH_INTERVAL_S = 1.0
#: Seconds a stop sentinel may wait for room on the queue even once the drain budget is spent:
#: a writer that takes a batch at that moment still gets its sentinel.
SENTINEL_MIN_WAIT_S = 0.01
#: Seconds /readyz may take to answer: a probe that waits longer has already given up
#: (Kubernetes' default timeoutSeconds is 1), and a check that blocks says so instead.
READY_TIMEOUT_S = 1.0


class StartupError(Exception):
    """tpx cannot start (one line for the user) and the exit code that tells why.

    ``UNAVAILABLE`` (3, retry later) when a dependency does not answer; ``USAGE`` (2, fix the
    setup) when it answers "no": a taken port, a database or role that does not exist, a key
    of the wrong type. Restarting cannot fix those.
    """

    def __init__(self, message: str, code: int = exitcodes.UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


def require_current_schema(settings: Settings, advice: str) -> None:
    """Raise :class:`StartupError` unless the schema is at this tpx's version (``advice``: the
    other way out, after "run `tpx migrate`")."""
    try:
        with pg_connect(settings.database_url, "tpx-check") as conn:
            require_current(conn, settings.db_schema, advice)
    except psycopg.OperationalError as exc:
        code, message = exitcodes.postgres_connect_failure(exc, settings.database_url)
        raise StartupError(message, code) from None
    except SchemaBehind as exc:
        raise StartupError(str(exc)) from None


class Engine:
    def __init__(
        self,
        settings: Settings,
        stages: Sequence[PostCommitStage] = (),
        tx_stage: TransactionStage | None = None,
    ) -> None:
        self.settings = settings
        self.stages = list(stages)
        #: work committed with the positions (the domain stage), opened after the migrations
        self.tx_stage = tx_stage
        self.metrics = Metrics()
        self.states = DeviceStates(settings.device_cache_size)
        self.queue = BatchQueue(settings.queue_batches, settings.queue_bytes)
        self.stop_reading = threading.Event()
        self.abort = threading.Event()
        self.wake = threading.Event()
        self.started_at = time.time()
        #: what positions is, once migrated or checked (heartbeat, panic dump); "unknown" before
        self.storage: Storage | Literal["unknown"] = "unknown"
        self.client: redis.Redis | None = None
        self.pool: ConnectionPool | None = None
        self.reader: Reader | None = None
        self.writers: list[Writer] = []
        self.http: HealthServer | None = None
        self.stop_aux = threading.Event()  # heartbeat and control: the last to stop
        self.heartbeat: Heartbeat | None = None
        self.control: Control | None = None
        self.crash: tuple[str, BaseException] | None = None
        #: entry ids read but not yet finished (queued or being written), for the claim sweep
        self.inflight: set[bytes] = set()
        self._stopping = False
        self._saved_hooks: tuple[Any, Any] | None = None
        self._redis_check = BoundedCheck("redis", self._ping_redis)
        self._postgres_check = BoundedCheck("postgres", self._check_schema)
        m = self.metrics
        m.gauge("tpx_queue_depth", "Batches waiting for a writer", self.queue.qsize)
        m.gauge("tpx_device_cache_size", "Devices whose state is cached", lambda: len(self.states))
        m.gauge(
            "tpx_device_cache_hits",
            "Cache hits (records of cached devices)",
            lambda: self.states.hits,
        )
        m.gauge("tpx_device_cache_misses", "Cache misses", lambda: self.states.misses)
        m.gauge(
            "tpx_device_rehydrations",
            "Device states seeded from Postgres",
            lambda: self.states.rehydrations,
        )
        m.gauge("tpx_up", "1 while the engine runs", lambda: 0 if self._stopping else 1)

    # --- start ---

    def _connect_redis(self) -> redis.Redis:
        s = self.settings
        client = redis_client(s)
        try:
            client.ping()
            if ensure_group(client, s.stream, s.group):
                log.info("created consumer group %s on %s (reading from the start)", s.group, s.stream)
        except redis.AuthenticationError as exc:  # a ConnectionError, but retrying will not help
            raise StartupError(f"Redis refused tpx: {exc} (fix TPX_REDIS_URL)", exitcodes.USAGE) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StartupError(f"cannot reach Redis: {exc}") from None
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: the stream key holds something else
            raise StartupError(
                f"Redis refused to set up {s.stream} / {s.group}: {exc}", exitcodes.USAGE
            ) from None
        return client

    def _check_postgres(self) -> None:
        """Connect once, so that "no such database / role" is told apart from "not answering"."""
        try:
            pg_connect(self.settings.database_url, "tpx-check").close()
        except psycopg.OperationalError as exc:
            code, message = exitcodes.postgres_connect_failure(exc, self.settings.database_url)
            raise StartupError(message, code) from None

    def _prepare_schema(self) -> None:
        """Migrate (or, with --no-migrate, check the schema is current)."""
        s = self.settings
        if not s.migrate_on_start:
            require_current_schema(s, "or drop --no-migrate")
            return
        try:
            report = migrate_for(s)  # the same entry point as `tpx migrate`; it logs the report
        except psycopg.OperationalError as exc:
            raise StartupError(f"cannot reach PostgreSQL: {first_line(exc)}") from None
        self.storage = report.storage

    def _open_stage(self) -> None:
        stage = self.tx_stage
        if stage is None:
            return
        try:
            log.info("%s", stage.open(self.metrics.registry, self.stop_aux))
            self.metrics.stage_errors.labels(stage.name)  # exported as 0 from the start (alerts read it)
        except StageStartError as exc:
            raise StartupError(str(exc), exitcodes.USAGE if exc.usage else exitcodes.UNAVAILABLE) from None

    def start(self) -> None:
        s = self.settings
        logs.keep_recent_warnings()  # the heartbeat carries them: `tpx top` shows why writers fail
        self.client = self._connect_redis()
        self._check_postgres()
        self._prepare_schema()
        self._open_stage()
        self.pool = pg_pool(s, s.writers, "tpx-pg", [*writer_timeouts(s), CREATE_STAGE_SQL])
        self.pool.open(wait=False)
        self.writers = [
            Writer(
                i,
                s,
                self.pool,
                self.client,
                self.queue,
                self.states,
                self.metrics,
                self.stages,
                self.abort,
                self.inflight,
                self.tx_stage,
            )
            for i in range(s.writers)
        ]
        self.reader = Reader(s, self.client, self.queue, self.metrics, self.stop_reading, self.inflight)
        self.heartbeat = Heartbeat(s, self.client, self.metrics, self.stop_aux, self.summary)
        reload = self.tx_stage.request_reload if self.tx_stage is not None else None
        self.control = Control(s, self.client, self.states, self.stop_aux, reload)
        self.metrics.registry.register(StreamCollector(s, self.client))
        bind = s.http_bind
        if bind is not None:  # bound before any thread reads: a taken port fails with nothing in flight
            try:
                self.http = HealthServer(
                    bind, self.metrics.registry, self.alive, self.ready, self.device, s.http_access()
                )
            except OSError as exc:
                self.pool.close()
                raise StartupError(
                    f"cannot listen on {s.http_addr} (TPX_HTTP_ADDR): {exc.strerror}", exitcodes.USAGE
                ) from None
        self._saved_hooks = (threading.excepthook, sys.excepthook)
        threading.excepthook = self._thread_crashed
        sys.excepthook = self._main_crashed
        for writer in self.writers:
            writer.start()
        self.reader.start()
        self.heartbeat.start()
        self.control.start()
        if self.http is not None:
            self.http.start()
            log.info("metrics and health on http://%s", self.http.address)
        log.info(
            "tpx %s serving %s group %s as %s with %d writers",
            __version__,
            s.stream,
            s.group,
            s.consumer,
            s.writers,
        )

    # --- health and introspection ---

    def summary(self) -> dict[str, Any]:
        """What the heartbeat tells the ops commands about this instance."""
        return {
            "e2e_p50_s": (q := self.metrics.e2e_quantiles()) and q[0],
            "e2e_p95_s": q and q[1],
            "queue_depth": self.queue.qsize(),
            "queue_capacity": self.settings.queue_batches,
            "cache_size": len(self.states),
            "writers": self.settings.writers,
            "writers_failing": [w.name for w in self.writers if w.failing_since is not None],
            # since how long and why, for `tpx status` (``for_s``: seconds, as at the heartbeat's ``at``)
            "writers_failing_detail": [
                {"writer": w.name, "for_s": time.monotonic() - since, "reason": w.committer.health.last_error}
                for w in self.writers
                if (since := w.failing_since) is not None
            ],
            "http": self.http.address if self.http is not None else None,
            "storage": self.storage,
            # TPX_DOMAIN_DEFER in effect (the domain on, its batches queued): `tpx status` looks
            # for a `tpx domain` alive
            "domain_deferred": self.metrics.registry.get_sample_value("tpx_domain_deferred") == 1,
            "stopping": self._stopping,
        }

    def device(self, device_id: str) -> dict[str, Any] | None:
        """The cached state of one device (None when this process does not hold it)."""
        state = self.states.get(device_id)
        return None if state is None else state.to_dict()

    def alive(self) -> tuple[bool, dict[str, Any]]:
        threads = [self.reader, *self.writers]
        dead = [t.name for t in threads if t is not None and not t.is_alive()]
        return (not dead and self.crash is None), {"dead_threads": dead}

    def ready(self) -> tuple[bool, dict[str, Any]]:
        problems: list[str] = []
        ok, detail = self.alive()
        if not ok:
            problems.append("threads dead: " + ", ".join(detail["dead_threads"]))
        for writer in self.writers:  # a failing or stuck writer means the pipeline is paused
            if (problem := writer.health()) is not None:
                problems.append(problem)
        if self.reader is not None and (reader_problem := self.reader.problem()) is not None:
            problems.append(reader_problem)
        if problems:
            return False, {"problems": problems}
        notes = {}
        if self.tx_stage is not None and (note := self.tx_stage.health()) is not None:
            notes["notes"] = [note]  # positions still flow: ready, but say what is missing
        deadline = time.monotonic() + READY_TIMEOUT_S
        runs = [self._redis_check.begin(), self._postgres_check.begin()]  # at once: one bound
        problems += [problem for run in runs if (problem := run.wait(deadline)) is not None]
        if self._stopping:
            problems.append("shutting down")
        return not problems, {"problems": problems, **notes}

    def _ping_redis(self) -> str | None:
        assert self.client is not None  # noqa: S101
        self.client.ping()
        return None

    def _check_schema(self) -> str | None:
        assert self.pool is not None  # noqa: S101
        with self.pool.connection(timeout=READY_TIMEOUT_S) as conn:
            version = current_version(conn, self.settings.db_schema)
        if version is None or version < latest_version():
            return f"schema at version {version}, need {latest_version()}"
        return None

    # --- run and stop ---

    def request_stop(self) -> None:
        """Ask for a graceful stop (safe from a signal handler: it only sets flags)."""
        self._stopping = True
        self.wake.set()

    def run(self) -> int:
        """Block until a stop is requested or a thread dies; then shut down. Returns an exit code."""
        while not self._stopping:
            self.wake.wait(WATCH_INTERVAL_S)
            if self.crash is not None or not self.alive()[0]:
                return self._panic()
        return self.shutdown()

    def shutdown(self) -> int:
        self._stopping = True
        deadline = time.monotonic() + self.settings.drain_timeout_s
        log.info("stopping: draining queued batches (up to %.1fs)", self.settings.drain_timeout_s)
        self.stop_reading.set()
        if self.reader is not None:
            self.reader.join(max(0.0, deadline - time.monotonic()))
        for _ in self.writers:
            try:
                self.queue.put(None, timeout=max(SENTINEL_MIN_WAIT_S, deadline - time.monotonic()))
            except queue.Full:
                break
        for writer in self.writers:
            writer.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in (self.reader, *self.writers) if t is not None and t.is_alive()]
        if stuck:
            log.warning("drain budget spent; %s still busy: their entries stay pending", stuck)
        self._close(time.monotonic() + SHUTDOWN_TAIL_S)
        log.info("stopped")
        return exitcodes.OK

    def _close(self, deadline: float) -> None:
        """Tell every thread to stop at once, then join them all by one ``deadline``."""
        if self._saved_hooks is not None:  # an engine in a longer-lived process leaves no trace
            threading.excepthook, sys.excepthook = self._saved_hooks
        self.abort.set()  # a writer still retrying gives up; its batch stays pending
        self.stop_reading.set()
        self.stop_aux.set()
        threads: list[threading.Thread | None] = [self.reader, *self.writers, self.heartbeat, self.control]
        if self.tx_stage is not None:
            threads += self.tx_stage.threads()
        if self.http is not None:
            threads.append(self.http.stop())
        if self.pool is not None:  # closing fails the writers waiting for a connection at once
            threads.append(_in_thread("tpx-pg-close", self.pool.close, deadline - time.monotonic()))
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threads if t is not None and t.is_alive()]
        if left:
            log.warning("left behind at exit, still blocked: %s", ", ".join(left))
        if self.client is not None:
            self.client.close()

    # --- crashes ---

    def _thread_crashed(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread is not None else "?"
        exc = args.exc_value or RuntimeError("unknown")
        log.critical("thread %s crashed", name, exc_info=(args.exc_type, exc, args.exc_traceback))
        if self.crash is None:
            self.crash = (name, exc)
        self.wake.set()

    def _main_crashed(
        self, exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None
    ) -> None:
        """An exception nobody caught in the main thread: dump, then the exit code of a crash."""
        log.critical("main thread crashed", exc_info=(exc_type, exc, tb))
        if isinstance(exc, KeyboardInterrupt):
            return
        path = self.write_panic_dump("MainThread", exc)
        log.critical("panic dump written to %s; exiting %d", path, exitcodes.CRASH)
        logging.shutdown()
        os._exit(exitcodes.CRASH)

    def _panic(self) -> int:
        thread, exc = self.crash or ("?", RuntimeError("a thread died"))
        path = self.write_panic_dump(thread, exc)
        log.critical(
            "panic: %s died (%s); dump written to %s; exiting %d",
            thread,
            first_line(exc),
            path,
            exitcodes.CRASH,
        )
        self.abort.set()
        self.stop_reading.set()
        return exitcodes.CRASH

    def panic_state(self, thread: str, exc: BaseException) -> dict[str, Any]:
        frames = sys._current_frames()
        threads = []
        for t in threading.enumerate():
            frame = frames.get(t.ident) if t.ident is not None else None
            threads.append(
                {
                    "name": t.name,
                    "alive": t.is_alive(),
                    "daemon": t.daemon,
                    "stack": traceback.format_stack(frame)[-5:] if frame is not None else [],
                }
            )
        states = self.states.snapshot(limit=20)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "at": time.time(),
            "uptime_s": time.time() - self.started_at,
            "crashed_thread": thread,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exception(exc),
            "config": self.settings.masked(),
            "threads": threads,
            "e2e_p50_s": (q := self.metrics.e2e_quantiles()) and q[0],
            "e2e_p95_s": q and q[1],
            "queue_depth": self.queue.qsize(),
            "in_flight": {w.name: [i.decode() for i in w.in_flight[:1000]] for w in self.writers},
            "devices": {"cached": len(self.states), "newest": [d.to_dict() for d in states]},
        }

    def write_panic_dump(self, thread: str, exc: BaseException) -> Path:
        directory = Path(self.settings.panic_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"tpx-panic-{self.settings.consumer}-{int(time.time())}-{os.getpid()}.json"
        path.write_text(json.dumps(self.panic_state(thread, exc), indent=2, default=str))
        return path


def _in_thread(name: str, fn: Callable[[float], None], timeout: float) -> threading.Thread:
    """Run ``fn(timeout)`` in a daemon thread of its own, so that the caller's join bounds it."""
    thread = threading.Thread(target=fn, args=(max(0.0, timeout),), name=name, daemon=True)
    thread.start()
    return thread

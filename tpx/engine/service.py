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
4. the heartbeat stops (its key is deleted, so ops see the instance leave at
   once), then the control listener, the HTTP listener, the pool and Redis.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool

from tpx import __version__, exitcodes
from tpx.config import Settings
from tpx.connections import pg_pool, redis_client
from tpx.engine.budget import BatchQueue
from tpx.engine.collector import StreamCollector
from tpx.engine.heartbeat import Control, Heartbeat
from tpx.engine.http import HealthServer
from tpx.engine.metrics import Metrics
from tpx.engine.reader import Reader, ensure_group
from tpx.engine.stages import PostCommitStage
from tpx.engine.state import DeviceStates
from tpx.engine.writer import CREATE_STAGE_SQL, Writer
from tpx.errors import first_line
from tpx.schema import current_version, latest_version, migrate

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A dependency could not be reached at start-up (one line for the user)."""


class Engine:
    def __init__(self, settings: Settings, stages: Sequence[PostCommitStage] = ()) -> None:
        self.s = settings
        self.stages = list(stages)
        self.metrics = Metrics()
        self.states = DeviceStates(settings.device_cache_size)
        self.queue = BatchQueue(settings.queue_batches, settings.queue_bytes)
        self.stop_reading = threading.Event()
        self.abort = threading.Event()
        self.wake = threading.Event()
        self.started_at = time.time()
        self.storage = "unknown"
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
        s = self.s
        client = redis_client(s)
        try:
            client.ping()
            if ensure_group(client, s.stream, s.group):
                log.info("created consumer group %s on %s (reading from the start)", s.group, s.stream)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StartupError(f"cannot reach Redis: {exc}") from None
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: the stream key holds something else
            raise StartupError(f"Redis refused to set up {s.stream} / {s.group}: {exc}") from None
        return client

    def _prepare_schema(self) -> None:
        """Migrate (or, with --no-migrate, check the schema is current)."""
        s = self.s
        try:
            if not s.migrate_on_start:
                with psycopg.connect(s.database_url, connect_timeout=5) as conn:
                    version = current_version(conn, s.db_schema)
                if version is None or version < latest_version():
                    raise StartupError(
                        f"schema {s.db_schema} is at version {version or 0}, this tpx needs "
                        f"{latest_version()}: run `tpx migrate` (or drop --no-migrate)"
                    )
                return
            report = migrate(s.database_url, s.db_schema, s.compress_after, s.retain_for)
        except psycopg.OperationalError as exc:
            raise StartupError(f"cannot reach PostgreSQL: {first_line(exc)}") from None
        for name in report.applied:
            log.info("applied migration %s", name)
        self.storage = report.storage
        log.info("schema %s at version %d; %s", s.db_schema, report.current_version, report.storage_line())
        for policy in report.policies:
            log.info("timescaledb: %s", policy)

    def start(self) -> None:
        s = self.s
        self.client = self._connect_redis()
        self._prepare_schema()
        self.pool = pg_pool(s, s.writers, "tpx-pg", [CREATE_STAGE_SQL])
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
            )
            for i in range(s.writers)
        ]
        self.reader = Reader(s, self.client, self.queue, self.metrics, self.stop_reading, self.inflight)
        self.heartbeat = Heartbeat(s, self.client, self.metrics, self.stop_aux, self.summary)
        self.control = Control(s, self.client, self.states, self.stop_aux)
        self.metrics.registry.register(StreamCollector(s, self.client))
        bind = s.http_bind
        if bind is not None:  # bound before any thread reads: a taken port fails with nothing in flight
            try:
                self.http = HealthServer(bind, self.metrics.registry, self.alive, self.ready, self.device)
            except OSError as exc:
                self.pool.close()
                raise StartupError(
                    f"cannot listen on {s.http_addr} (TPX_HTTP_ADDR): {exc.strerror}"
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
            "queue_capacity": self.s.queue_batches,
            "cache_size": len(self.states),
            "writers": self.s.writers,
            "writers_failing": [w.name for w in self.writers if w.failing_since is not None],
            "http": self.http.address if self.http is not None else None,
            "storage": self.storage,
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
        for writer in self.writers:  # a failing writer means the pipeline is paused
            if writer.failing_since is not None:
                stalled = time.monotonic() - writer.failing_since
                problems.append(f"{writer.name} failing for {stalled:.0f}s: {writer.last_error}")
        if self.reader is not None and not self.reader.connected.is_set():
            problems.append("reader not connected to redis")
        if problems:
            return False, {"problems": problems}
        try:
            assert self.client is not None  # noqa: S101
            self.client.ping()
        except redis.RedisError as exc:
            problems.append(f"redis: {first_line(exc)}")
        try:
            assert self.pool is not None  # noqa: S101
            with self.pool.connection(timeout=1) as conn:
                version = current_version(conn, self.s.db_schema)
            if version is None or version < latest_version():
                problems.append(f"schema at version {version}, need {latest_version()}")
        except Exception as exc:  # PoolTimeout, OperationalError: any of them means not ready
            problems.append(f"postgres: {first_line(exc)}")
        if self._stopping:
            problems.append("shutting down")
        return not problems, {"problems": problems}

    # --- run and stop ---

    def request_stop(self) -> None:
        """Ask for a graceful stop (safe from a signal handler: it only sets flags)."""
        self._stopping = True
        self.wake.set()

    def run(self) -> int:
        """Block until a stop is requested or a thread dies; then shut down. Returns an exit code."""
        while not self._stopping:
            self.wake.wait(1.0)
            if self.crash is not None or not self.alive()[0]:
                return self._panic()
        return self.shutdown()

    def shutdown(self) -> int:
        self._stopping = True
        deadline = time.monotonic() + self.s.drain_timeout_s
        log.info("stopping: draining queued batches (up to %.1fs)", self.s.drain_timeout_s)
        self.stop_reading.set()
        if self.reader is not None:
            self.reader.join(max(0.0, deadline - time.monotonic()))
        for _ in self.writers:
            try:
                self.queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
            except queue.Full:
                break
        for writer in self.writers:
            writer.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in (self.reader, *self.writers) if t is not None and t.is_alive()]
        if stuck:
            log.warning("drain budget spent; %s still busy: their entries stay pending", stuck)
            self.abort.set()
            for thread in (self.reader, *self.writers):
                if thread is not None:
                    thread.join(1.0)
        self._close()
        log.info("stopped")
        return exitcodes.OK

    def _close(self) -> None:
        if self._saved_hooks is not None:  # an engine in a longer-lived process leaves no trace
            threading.excepthook, sys.excepthook = self._saved_hooks
        self.stop_aux.set()
        for thread in (self.heartbeat, self.control):
            if thread is not None and thread.is_alive():
                thread.join(2.0)
        if self.http is not None:
            self.http.stop()
        if self.pool is not None:
            self.pool.close(timeout=2.0)
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
            "config": self.s.masked(),
            "threads": threads,
            "e2e_p50_s": (q := self.metrics.e2e_quantiles()) and q[0],
            "e2e_p95_s": q and q[1],
            "queue_depth": self.queue.qsize(),
            "in_flight": {w.name: [i.decode() for i in w.in_flight[:1000]] for w in self.writers},
            "devices": {"cached": len(self.states), "newest": [d.to_dict() for d in states]},
        }

    def write_panic_dump(self, thread: str, exc: BaseException) -> Path:
        directory = Path(self.s.panic_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"tpx-panic-{self.s.consumer}-{int(time.time())}-{os.getpid()}.json"
        path.write_text(json.dumps(self.panic_state(thread, exc), indent=2, default=str))
        return path

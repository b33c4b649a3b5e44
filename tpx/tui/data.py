"""What the dashboard shows, gathered in one call from a worker thread.

:func:`collect` asks Redis (and, for the device fallback, Postgres) through
the same functions the ops commands use, and returns a :class:`Snapshot`. The
app never does I/O on its UI thread: it renders snapshots.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from tpx.config import Settings
from tpx.errors import first_line
from tpx.ops import control, dlq
from tpx.ops.dlq import DeadLetterView
from tpx.ops.inspect import PendingEntry, Status, pending, status

#: Samples kept for the sparklines (one per refresh).
HISTORY = 120


@dataclass
class Snapshot:
    status: Status | None = None
    letters: list[DeadLetterView] = field(default_factory=list)
    oldest_pending: list[PendingEntry] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    devices_from: str = "instances"  # or "positions"
    in_per_s: float | None = None
    dlq_per_min: float | None = None
    out_per_s: float = 0.0
    redis_error: str | None = None
    postgres_error: str | None = None
    at: float = field(default_factory=time.time)


class Collector:
    """Keeps the previous sample to turn counters into rates."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.client: redis.Redis | None = None
        self._last_len: tuple[float, int] | None = None
        self._last_dlq: tuple[float, int] | None = None
        self.in_history: deque[float] = deque(maxlen=HISTORY)
        self.out_history: deque[float] = deque(maxlen=HISTORY)

    def _redis(self) -> redis.Redis:
        if self.client is None:
            from tpx.connections import redis_client

            self.client = redis_client(self.s)
            self.client.connection_pool.connection_kwargs["socket_timeout"] = 3
        return self.client

    def collect(self) -> Snapshot:
        snap = Snapshot()
        try:
            client = self._redis()
            snap.status = status(client, self.s)
            snap.letters = dlq.list_letters(client, self.s, limit=100)
            if snap.status.group_exists:
                snap.oldest_pending = pending(client, self.s, limit=20)
            if snap.status.instances:
                snap.devices = control.cached_devices(client, self.s, alive=snap.status.instances)
        except (redis.RedisError, OSError) as exc:
            snap.redis_error = first_line(exc)
            if self.client is not None:
                self.client.close()
                self.client = None
        if snap.status is not None:
            now = time.monotonic()
            length = snap.status.stream_length
            if self._last_len is not None and now > self._last_len[0]:
                snap.in_per_s = max(0.0, (length - self._last_len[1]) / (now - self._last_len[0]))
            self._last_len = (now, length)
            if self._last_dlq is not None and now > self._last_dlq[0]:
                snap.dlq_per_min = (
                    (snap.status.dlq_length - self._last_dlq[1]) * 60 / (now - self._last_dlq[0])
                )
            self._last_dlq = (now, snap.status.dlq_length)
            snap.out_per_s = sum(i.written_per_s for i in snap.status.instances)
            self.in_history.append(snap.in_per_s or 0.0)
            self.out_history.append(snap.out_per_s)
        if snap.redis_error is None and not snap.devices:
            try:
                snap.devices = control.latest_rows(self.s)
                snap.devices_from = "positions"
            except psycopg.Error as exc:
                snap.postgres_error = first_line(exc)
        return snap

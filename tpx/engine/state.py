"""Per-device state: a bounded LRU, updated only after a batch commits.

The first time a device is seen by this process (it is not in the cache), its
state is seeded from its newest row in ``positions``; the writer asks for all
cold devices of a batch in one query (:data:`SEED_SQL`) before it inserts, so
the seed never sees the batch's own rows.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import filterfalse
from typing import Any

from tpx.records import Position

#: Newest row per device, one index probe each (works on hypertables too).
SEED_SQL = """
SELECT d.device_id,
       (extract(epoch FROM p.ts) * 1000000)::int8,
       p.latitude, p.longitude, p.speed, p.valid
FROM unnest(%s::text[]) AS d(device_id)
CROSS JOIN LATERAL (
    SELECT ts, latitude, longitude, speed, valid
    FROM positions
    WHERE positions.device_id = d.device_id
    ORDER BY ts DESC
    LIMIT 1
) AS p
"""


@dataclass(slots=True)
class DeviceState:
    device_id: str
    last_ts_us: int | None = None
    latitude: float | None = None
    longitude: float | None = None
    speed: float | None = None
    valid: bool | None = None
    records: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    last_seen: float | None = None  # wall clock (epoch s) of the last commit that touched it
    seeded: bool = False  # True when the latest position came from Postgres

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SeedRow = tuple[str, int, float, float, float | None, bool]


class DeviceStates:
    """Thread-safe LRU of :class:`DeviceState`, bounded to ``capacity`` devices."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._states: OrderedDict[str, DeviceState] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.rehydrations = 0

    def __len__(self) -> int:
        return len(self._states)

    def get(self, device_id: str) -> DeviceState | None:
        with self._lock:
            state = self._states.get(device_id)
            return None if state is None else DeviceState(**state.to_dict())

    def cold(self, device_ids: Iterable[str]) -> list[str]:
        """The devices of a batch that are not cached (their state must be seeded)."""
        with self._lock:
            return list(filterfalse(self._states.__contains__, set(device_ids)))

    def seed(self, cold: Sequence[str], rows: Iterable[SeedRow]) -> None:
        """Install seeds for ``cold`` devices; those without a row start empty."""
        found = {row[0]: row for row in rows}
        with self._lock:
            for device_id in cold:
                if device_id in self._states:  # another writer seeded it meanwhile
                    continue
                state = DeviceState(device_id)
                row = found.get(device_id)
                if row is not None:
                    (
                        _,
                        state.last_ts_us,
                        state.latitude,
                        state.longitude,
                        state.speed,
                        state.valid,
                    ) = row
                    state.seeded = True
                self._put(state)
                self.rehydrations += 1

    def _put(self, state: DeviceState) -> None:
        self._states[state.device_id] = state
        self._states.move_to_end(state.device_id)
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def apply(self, inserted: Sequence[Position], duplicates: Sequence[Position]) -> None:
        """Account a committed batch: positions written, and duplicates not written."""
        now = time.time()
        misses = 0
        with self._lock:
            states = self._states
            get = states.get
            seen = states.move_to_end
            for pos in inserted:
                # one unpacking instead of six attribute reads: this loop runs once per row written
                device_id, _, latitude, longitude, _, _, speed, _, _, _, valid, _, _, ts_us, _ = pos
                state = get(device_id)
                if state is None:
                    misses += 1
                    state = DeviceState(device_id)
                    self._put(state)
                else:
                    seen(device_id)
                state.records += 1
                state.last_seen = now
                last = state.last_ts_us
                if last is not None and ts_us < last:
                    state.out_of_order += 1  # stored, but not the latest position
                    continue
                state.last_ts_us = ts_us
                state.latitude = latitude
                state.longitude = longitude
                state.speed = speed
                state.valid = valid
                state.seeded = False
            self.misses += misses
            self.hits += len(inserted) - misses
            for pos in duplicates:
                state = get(pos.device_id)
                if state is None:
                    state = DeviceState(pos.device_id)
                    self._put(state)
                state.duplicates += 1
                state.last_seen = now

    def drop(self, device_id: str) -> bool:
        """Forget a device; it is reseeded from Postgres on its next record."""
        with self._lock:
            return self._states.pop(device_id, None) is not None

    def snapshot(self, limit: int | None = None) -> list[DeviceState]:
        """Copies of the most recently used states, newest first."""
        with self._lock:
            items = list(reversed(self._states.values()))
            if limit is not None:
                items = items[:limit]
            return [DeviceState(**s.to_dict()) for s in items]

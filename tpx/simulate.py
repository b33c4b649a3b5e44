"""`tpx simulate`: publish a synthetic fleet's records to the stream at a target rate.

The load source for the demo, the playbook, the benchmarks and the tests.
Records come from :class:`tpx.fleet.Fleet` (deterministic with a seed); they
are added with pipelined XADDs in small ticks so the rate stays even, and the
run ends after ``count`` records, after ``duration`` seconds, or on a stop
request, whichever comes first.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis

from tpx.config import parse_duration
from tpx.fleet import Fleet

#: Seconds per tick: each tick adds rate * TICK_S records in one pipeline.
TICK_S = 0.01
#: Records per pipeline when publishing as fast as possible: one round trip per thousand XADDs.
UNPACED_BATCH = 1000
#: Seconds between progress reports (what a terminal can show without flicker).
PROGRESS_EVERY_S = 0.5
#: Elapsed time never counts as less than this in a rate, so the first report divides by no zero.
_MIN_ELAPSED_S = 1e-6


#: Milliseconds between a device's fixes when the simulator publishes as fast as it can.
UNPACED_INTERVAL_MS = 1000


def start_ms(spec: str | None = None, now_ms: int | None = None) -> int:
    """A simulated fleet's first fix time, epoch ms: now, unless ``spec`` says otherwise.

    ``spec`` is a time before now (``-1h``, ``-90s``, ``-1d12h``: a tpx duration), an ISO 8601
    time (``2026-12-01T09:00:00Z``; without a zone, UTC) or epoch milliseconds."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if spec is None or not spec.strip():
        return now
    text = spec.strip()
    if text.startswith("-"):
        return now - int(parse_duration(text[1:]) * 1000)
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"not a start time: {spec!r} (use e.g. -1h, 2026-12-01T09:00:00Z or epoch ms)"
        ) from None
    return int((when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp() * 1000)


def paced_interval_ms(devices: int, rate: float | None) -> int:
    """The fix interval that keeps a fleet's clock on the wall clock at ``rate`` records/s.

    Each device sends every ``devices / rate`` seconds; with a fixed 1 s interval, 200 devices at
    1,000/s ran 5 s ahead each second and were hours in the future by the end of a demo."""
    return max(1, round(devices * 1000 / rate)) if rate else UNPACED_INTERVAL_MS


def _rate(produced: int, seconds: float) -> float:
    return produced / max(seconds, _MIN_ELAPSED_S)


@dataclass
class SimulationReport:
    produced: int
    valid: int
    duplicates: int
    late: int
    poison: int
    seconds: float
    rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(
    client: redis.Redis,
    stream: str,
    fleet: Fleet,
    rate: float | None = None,
    count: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[int, float], None] | None = None,
    maxlen: int | None = None,
) -> SimulationReport:
    """Publish until ``count`` records, ``duration`` seconds, or ``stop``.

    ``rate`` is records per second; None publishes as fast as possible.
    """
    if count is None and duration is None and stop is None:
        raise ValueError("give a count, a duration or a stop event")
    stop = stop or threading.Event()
    started = time.monotonic()
    produced = 0
    per_tick = max(1, round((rate or 0) * TICK_S)) if rate else UNPACED_BATCH
    next_tick = started
    last_report = started
    while not stop.is_set():
        now = time.monotonic()
        if duration is not None and now - started >= duration:
            break
        if count is not None and produced >= count:
            break
        n = per_tick if count is None else min(per_tick, count - produced)
        if rate:  # spread the remainder of a fractional per-tick rate over time
            due = int((now - started) * rate) - produced
            n = max(0, min(due, n if count is None else count - produced))
        if n:
            pipe = client.pipeline(transaction=False)
            for fields in fleet.entries(n):
                if maxlen:
                    pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
                else:
                    pipe.xadd(stream, fields)  # type: ignore[arg-type]
            pipe.execute()
            produced += n
        if progress and now - last_report >= PROGRESS_EVERY_S:
            progress(produced, _rate(produced, now - started))
            last_report = now
        if rate:
            next_tick += TICK_S
            stop.wait(max(0.0, next_tick - time.monotonic()))
    seconds = time.monotonic() - started
    st = fleet.stats
    if progress:
        progress(produced, _rate(produced, seconds))
    return SimulationReport(
        produced, st.valid, st.duplicates, st.late, st.poison, seconds, _rate(produced, seconds)
    )

"""A device's track: its valid fixes in fix-time order, joined by straight lon/lat segments.

A fix is kept when it is ``valid`` and does not imply a speed above ``max_speed_kmh`` from the
previous kept fix (the distance between the two by the equirectangular projection at their mean
latitude, Earth radius 6,371,008.8 m). A point on a segment at fraction u is
``p0 + u·(p1 - p0)`` at time ``t0 + u·(t1 - t0)``, rounded half up to the millisecond.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tpx.domain.shapes import M_PER_DEG

#: The default for ``TPX_MAX_SPEED_KMH``: faster than any road vehicle, slower than a GPS jump.
DEFAULT_MAX_SPEED_KMH = 500.0
US_PER_MS = 1_000
US_PER_S = 1_000_000
#: km/h per m/s.
KMH_PER_MS = 3.6


@dataclass(frozen=True, slots=True)
class Fix:
    """One position of one device: fix time in epoch microseconds, WGS84 degrees, speed in km/h."""

    ts_us: int
    lat: float
    lon: float
    valid: bool = True
    speed: float | None = None


def speed_kmh(a: Fix, b: Fix) -> float:
    """The speed implied by moving from ``a`` to ``b`` (infinite when they share a time)."""
    mean_lat = math.radians((a.lat + b.lat) / 2.0)
    dx = (b.lon - a.lon) * M_PER_DEG * math.cos(mean_lat)
    dy = (b.lat - a.lat) * M_PER_DEG
    dt_s = abs(b.ts_us - a.ts_us) / US_PER_S
    distance = math.hypot(dx, dy)
    if dt_s == 0.0:
        return 0.0 if distance == 0.0 else math.inf
    return distance / dt_s * KMH_PER_MS


def plausible(previous: Fix | None, fix: Fix, max_speed_kmh: float) -> bool:
    """Whether ``fix`` joins the track after the kept fix ``previous``."""
    return fix.valid and (previous is None or speed_kmh(previous, fix) <= max_speed_kmh)


def kept(fixes: Iterable[Fix], max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH) -> Iterator[Fix]:
    """The track of fixes already sorted by time (each time once)."""
    previous: Fix | None = None
    for fix in fixes:
        if plausible(previous, fix, max_speed_kmh):
            previous = fix
            yield fix


def time_at_ms(f0: Fix, f1: Fix, u: float) -> int:
    """The time at fraction u of the segment f0 → f1, epoch milliseconds, rounded half up."""
    return math.floor((f0.ts_us + u * (f1.ts_us - f0.ts_us)) / US_PER_MS + 0.5)


def position_at(f0: Fix, f1: Fix, u: float) -> tuple[float, float]:
    """(lat, lon) at fraction u of the segment f0 → f1."""
    return f0.lat + u * (f1.lat - f0.lat), f0.lon + u * (f1.lon - f0.lon)


def speed_at(f0: Fix, f1: Fix, u: float) -> float | None:
    """The reported speed interpolated along the segment (the one known when only one is)."""
    if f0.speed is None or f1.speed is None:
        return f1.speed if f0.speed is None else f0.speed
    return f0.speed + u * (f1.speed - f0.speed)

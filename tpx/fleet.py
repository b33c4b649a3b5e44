"""A synthetic fleet: contract records from devices moving along plausible tracks.

Deterministic for a given seed. It feeds the simulator (`tpx simulate`), the
benchmarks and the tests. Each device has a 15-digit IMEI, drives with a
heading that drifts and a speed that wanders, climbs and descends a little,
and now and then loses its fix (0 satellites, or 0/0 coordinates). The io map
looks like a Teltonika FMB's: small integers, a 64-bit odometer as a
``__bigint__`` sentinel and an iButton id as a ``__bytes__`` sentinel.

Optional fractions add duplicates (an earlier record sent again), late records
(a fix older than the device's newest) and poison records of each kind. Devices start anywhere
on Earth, or, given an :class:`Area`, inside it, and turn back towards its centre whenever they
drive out of it (`tpx demo`'s fleet drives its course of geofences for as long as it runs).
"""

from __future__ import annotations

import base64
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

#: The kinds of poison record the fleet can produce (each breaks the contract differently).
POISON_KINDS = (
    "bad_device_id",
    "not_json",
    "not_object",
    "missing_ts",
    "lat_out_of_range",
    "bad_bigint",
    "bad_base64",
    "ts_too_old",
)

#: Of the fixes: this fraction has no GPS (0 satellites), and of those this fraction also 0/0.
LOST_FIX_FRACTION = 0.01
ZERO_ZERO_FRACTION = 0.5
#: Records with priority 0 (low) and with event_io_id 0 (periodic), as a tracker mostly sends.
LOW_PRIORITY_FRACTION = 0.97
PERIODIC_FRACTION = 0.9
#: Above this speed (km/h) io 240, "movement", is 1.
MOVING_KMH = 3
#: How many of its recent records a device may send again as a duplicate.
RESEND_MEMORY = 8
#: Metres per degree of latitude (and of longitude at the equator), as the steps below count them.
M_PER_DEG = 111_320
#: Degrees a device outside its area turns back towards the centre per fix, at most.
TURN_BACK_DEG = 45.0


@dataclass(frozen=True)
class Area:
    """Where a fleet drives: within ``radius_m`` metres of a centre (degrees)."""

    lat: float
    lon: float
    radius_m: float

    def offset(self, lat: float, lon: float) -> tuple[float, float]:
        """Metres east and north of the centre (equirectangular, as the fleet steps)."""
        return (
            (lon - self.lon) * M_PER_DEG * math.cos(math.radians(self.lat)),
            (lat - self.lat) * M_PER_DEG,
        )

    def at(self, east_m: float, north_m: float) -> tuple[float, float]:
        """The point (lat, lon) that many metres east and north of the centre."""
        return (
            self.lat + north_m / M_PER_DEG,
            self.lon + east_m / (M_PER_DEG * math.cos(math.radians(self.lat))),
        )


@dataclass
class _Device:
    imei: str
    lat: float
    lon: float
    alt: float
    heading: float
    speed: float
    ts_ms: int
    odometer: int
    ibutton: bytes
    sent: list[dict[str, str]] = field(default_factory=list)


@dataclass
class FleetStats:
    produced: int = 0
    valid: int = 0
    duplicates: int = 0
    late: int = 0
    poison: int = 0


class Fleet:
    def __init__(
        self,
        devices: int = 100,
        seed: int = 1,
        start_ms: int = 1_700_000_000_000,
        interval_ms: int = 1000,
        duplicate_fraction: float = 0.0,
        late_fraction: float = 0.0,
        poison_fraction: float = 0.0,
        area: Area | None = None,
    ) -> None:
        self.rng = random.Random(seed)  # noqa: S311  (a simulation, not cryptography)
        self.interval_ms = interval_ms
        self.duplicate_fraction = duplicate_fraction
        self.late_fraction = late_fraction
        self.poison_fraction = poison_fraction
        self.area = area
        self.stats = FleetStats()
        rng = self.rng
        self.devices = [
            _Device(
                imei=f"35{rng.randrange(10**12, 10**13):013d}",
                lat=rng.uniform(-60, 70),
                lon=rng.uniform(-170, 170),
                alt=rng.uniform(0, 600),
                heading=rng.uniform(0, 360),
                speed=rng.uniform(0, 90),
                ts_ms=start_ms + rng.randrange(0, interval_ms),
                odometer=rng.randrange(2**40, 2**63),
                ibutton=rng.randbytes(8),
            )
            for _ in range(devices)
        ]
        if area is not None:  # drawn after the others: a fleet without an area is the same as ever
            for d in self.devices:
                reach, bearing = area.radius_m * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
                d.lat, d.lon = area.at(reach * math.sin(bearing), reach * math.cos(bearing))
        self._next = 0

    def _turn_back(self, d: _Device, area: Area) -> None:
        """Outside its area, a device turns towards the centre (by up to :data:`TURN_BACK_DEG`)."""
        east, north = area.offset(d.lat, d.lon)
        if math.hypot(east, north) <= area.radius_m:
            return
        home = math.degrees(math.atan2(-east, -north)) % 360
        off = (home - d.heading + 180) % 360 - 180
        d.heading = (d.heading + max(-TURN_BACK_DEG, min(TURN_BACK_DEG, off))) % 360

    def _step(self, d: _Device) -> dict[str, object]:
        rng = self.rng
        d.ts_ms += self.interval_ms
        d.heading = (d.heading + rng.gauss(0, 8)) % 360
        if self.area is not None:
            self._turn_back(d, self.area)
        d.speed = min(160.0, max(0.0, d.speed + rng.gauss(0, 4)))
        metres = d.speed / 3.6 * self.interval_ms / 1000
        d.lat = max(-89.9, min(89.9, d.lat + metres * math.cos(math.radians(d.heading)) / M_PER_DEG))
        d.lon += (
            metres * math.sin(math.radians(d.heading)) / (M_PER_DEG * max(0.1, math.cos(math.radians(d.lat))))
        )
        d.lon = (d.lon + 180) % 360 - 180
        d.alt = max(-50.0, d.alt + rng.gauss(0, 1.5))
        d.odometer += int(metres)
        lost = rng.random() < LOST_FIX_FRACTION
        satellites = 0 if lost else rng.randrange(4, 21)
        lat, lon = (
            (0.0, 0.0) if lost and rng.random() < ZERO_ZERO_FRACTION else (round(d.lat, 7), round(d.lon, 7))
        )
        return {
            "ts": d.ts_ms,
            "lat": lat,
            "lon": lon,
            "alt": round(d.alt, 1),
            "angle": round(d.heading, 1),
            "speed": round(d.speed, 1),
            "satellites": satellites,
            "priority": 0 if rng.random() < LOW_PRIORITY_FRACTION else rng.choice((1, 2)),
            "event_io_id": 0 if rng.random() < PERIODIC_FRACTION else rng.choice((239, 240, 247, 252)),
            "io": {
                "239": int(d.speed > 0),
                "240": int(d.speed > MOVING_KMH),
                "21": rng.randrange(1, 6),
                "69": 1,
                "66": rng.randrange(11_800, 14_400),
                "67": rng.randrange(3_600, 4_200),
                "181": rng.randrange(5, 30),
                "182": rng.randrange(5, 30),
                "16": {"__bigint__": str(d.odometer)},
                "78": {"__bytes__": base64.b64encode(d.ibutton).decode()},
            },
        }

    def _poison(self, d: _Device, kind: str) -> dict[str, str]:
        rec = self._step(d)
        if kind == "bad_device_id":
            return {"device_id": "not a device!", "record": json.dumps(rec)}
        if kind == "not_json":
            return {"device_id": d.imei, "record": json.dumps(rec)[:-7]}
        if kind == "not_object":
            return {"device_id": d.imei, "record": json.dumps([rec])}
        if kind == "missing_ts":
            rec.pop("ts")
        elif kind == "lat_out_of_range":
            rec["lat"] = 91.5
        elif kind == "bad_bigint":
            rec["io"]["16"] = {"__bigint__": "12x"}  # type: ignore[index]
        elif kind == "bad_base64":
            rec["io"]["78"] = {"__bytes__": "***"}  # type: ignore[index]
        elif kind == "ts_too_old":
            rec["ts"] = 915_148_800_000  # 1999-01-01
        return {"device_id": d.imei, "record": json.dumps(rec)}

    def entries(self, count: int, received_at_ms: int | None = None) -> Iterator[dict[str, str]]:
        """``count`` stream entries (field dicts), devices in turn."""
        rng = self.rng
        stats = self.stats
        for _ in range(count):
            d = self.devices[self._next]
            self._next = (self._next + 1) % len(self.devices)
            roll = rng.random()
            stats.produced += 1
            if roll < self.poison_fraction:
                stats.poison += 1
                yield self._poison(d, POISON_KINDS[stats.poison % len(POISON_KINDS)])
                continue
            roll -= self.poison_fraction
            if roll < self.duplicate_fraction and d.sent:
                stats.duplicates += 1
                yield dict(rng.choice(d.sent))
                continue
            roll -= self.duplicate_fraction
            rec = self._step(d)
            if roll < self.late_fraction:
                stats.late += 1
                rec["ts"] = d.ts_ms - self.interval_ms * rng.randrange(30, 300) - 1
            entry = {
                "device_id": d.imei,
                "record": json.dumps(rec, separators=(",", ":")),
                "codec": "8E",
                "received_at": str(received_at_ms if received_at_ms is not None else d.ts_ms + 150),
            }
            stats.valid += 1
            d.sent.append(entry)
            if len(d.sent) > RESEND_MEMORY:
                del d.sent[0]
            yield entry

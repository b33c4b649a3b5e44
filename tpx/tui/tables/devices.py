"""Tab 4: each device's newest state, from the instances' caches (or ``positions`` when none runs)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tpx.format import ago, fix_state, number, short_us_time
from tpx.tui.poller import Snapshot
from tpx.tui.tables.base import Column, SnapshotTable

#: Microseconds per second (device fix times are epoch microseconds).
US = 1_000_000


@dataclass(frozen=True)
class Device:
    """One device row; None where the source does not know (``positions`` keeps no counters)."""

    device_id: str
    last_ts_us: int | None
    age_s: float | None
    latitude: float | None
    longitude: float | None
    speed: float | None
    valid: bool | None
    records: int | None
    duplicates: int | None
    out_of_order: int | None
    by: str

    @classmethod
    def of(cls, state: dict[str, Any], snap: Snapshot) -> Device:
        """From a cached state (or a ``positions`` row) in the shape ``tpx.ops.control`` returns."""
        last = state.get("last_ts_us")
        return cls(
            device_id=str(state["device_id"]),
            last_ts_us=last,
            age_s=max(0.0, snap.at - last / US) if last else None,
            latitude=state.get("latitude"),
            longitude=state.get("longitude"),
            speed=state.get("speed"),
            valid=state.get("valid"),
            records=state.get("records"),
            duplicates=state.get("duplicates"),
            out_of_order=state.get("out_of_order"),
            by=str(state.get("consumer") or snap.devices_from),
        )


DEVICE_COLUMNS: tuple[Column[Device], ...] = (
    Column("device", lambda d: d.device_id),
    Column("last fix", lambda d: short_us_time(d.last_ts_us), lambda d: d.last_ts_us),
    Column("age", lambda d: ago(d.age_s), lambda d: d.age_s),
    Column("lat", lambda d: number(d.latitude, ".5f"), lambda d: d.latitude),
    Column("lon", lambda d: number(d.longitude, ".5f"), lambda d: d.longitude),
    Column("speed", lambda d: number(d.speed, ".1f"), lambda d: d.speed),
    Column("valid", lambda d: fix_state(d.valid)),
    Column("records", lambda d: number(d.records), lambda d: d.records),
    Column("dups", lambda d: number(d.duplicates), lambda d: d.duplicates),
    Column("late", lambda d: number(d.out_of_order), lambda d: d.out_of_order),
    Column("by", lambda d: d.by),
)


class DevicesTable(SnapshotTable[Device]):
    TAB = "devices"
    TITLE = "Devices"
    COLUMNS = DEVICE_COLUMNS

    def items(self, snap: Snapshot) -> Iterable[Device]:
        # by device id: the instances answer in any order, and rows must not jump between refreshes
        return sorted((Device.of(d, snap) for d in snap.devices), key=lambda d: d.device_id)

    def key(self, item: Device) -> str:
        return item.device_id

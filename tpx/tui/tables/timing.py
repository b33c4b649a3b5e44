"""Tab 5: the newest timing records (newest first), and why there are none when the domain is off."""

from __future__ import annotations

from collections.abc import Iterable

from tpx.format import ago, local_time, local_zone, number
from tpx.ops.timing import TimingRow
from tpx.tui.poller import Snapshot
from tpx.tui.tables.base import Column, SnapshotTable


def geofence_label(row: TimingRow) -> str:
    """The geofence's name; its id when its row is gone from the CMS."""
    return row.geofence_name if row.geofence_name is not None else f"#{row.geofence} (deleted)"


def direction_label(direction: int | None) -> str:
    """A gate crossing's direction (issue 16: 1 from the left of first→last point to its right)."""
    return {1: "L→R", -1: "R→L"}.get(direction, "-") if direction is not None else "-"


#: The time's header names the zone the times are shown in (this machine's).
TIMING_COLUMNS: tuple[Column[TimingRow], ...] = (
    Column("time", lambda r: local_time(r.ts), lambda r: r.ts, detail=local_zone),
    Column("device", lambda r: r.device_id),
    Column("geofence", geofence_label),
    Column("event", lambda r: r.event),
    Column("dir", lambda r: direction_label(r.direction)),
    Column("speed", lambda r: number(r.speed, ".1f"), lambda r: r.speed),
    Column("lat", lambda r: number(r.latitude, ".5f"), lambda r: r.latitude),
    Column("lon", lambda r: number(r.longitude, ".5f"), lambda r: r.longitude),
)


def timing_note(snap: Snapshot) -> str:
    """The one line the tab shows above its table when there is nothing, or nothing current."""
    if snap.timing_off is not None:
        return f"domain off: {snap.timing_off}"
    if snap.timing_error is not None:
        return f"timing records unavailable: {snap.timing_error} — retrying"
    if not snap.timing:
        return "no timing records yet"
    return ""


def timing_summary(snap: Snapshot) -> str:
    """The overview's timing line, short enough for an 80-column screen: the newest record's
    age and what it was, so that records arriving show on every tab."""
    if snap.timing_off is not None:
        return "timing: domain off (tab 5 says why)"
    if snap.timing_error is not None:
        return "timing: unavailable"
    if not snap.timing:
        return "timing: no records yet"
    newest = snap.timing[0]
    age = max(0.0, snap.at - newest.ts.timestamp())
    return f"timing newest {ago(age)} ago ({newest.event} {geofence_label(newest)})"


class TimingTable(SnapshotTable[TimingRow]):
    TAB = "timing"
    TITLE = "Timing"
    COLUMNS = TIMING_COLUMNS

    def items(self, snap: Snapshot) -> Iterable[TimingRow]:
        return snap.timing  # newest first, as tpx.ops.timing returns them

    def key(self, item: TimingRow) -> str:
        return str(item.id)

    def note(self, snap: Snapshot) -> str:
        return timing_note(snap)

    def record(self, key: str) -> TimingRow | None:
        return next((r for r in self.snapshot.timing if str(r.id) == key), None)

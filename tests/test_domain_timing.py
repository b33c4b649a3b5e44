"""The issue's crossing fixtures for the pure domain logic (no servers): what a track gives.

Times and positions are hand-computed where the issue fixes them: an event at fraction u of a
segment happens at t0 + u·(t1 - t0), rounded to the millisecond, at p0 + u·(p1 - p0).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import pytest

from tpx.domain.geofences import GeofenceSet
from tpx.domain.shapes import Frame
from tpx.domain.timing import (
    Base,
    Changes,
    DeviceState,
    Event,
    TimingConfig,
    advance,
    event_id,
    replay,
    state_text,
    state_to_json,
)
from tpx.domain.track import Fix

DEVICE = "356307042441013"
#: 2023-11-14T22:13:20Z, in epoch microseconds.
T0_US = 1_700_000_000_000_000
T0_MS = T0_US // 1000
#: The test course sits around this point (lon, lat).
ORIGIN = (13.4, 52.5)
LOCAL = Frame.at(*ORIGIN)


def at(east_m: float, north_m: float) -> tuple[float, float]:
    """(lon, lat) of a point so many metres east and north of ORIGIN."""
    return ORIGIN[0] + east_m / LOCAL.kx, ORIGIN[1] + north_m / LOCAL.ky


def fix(t_s: float, east_m: float, north_m: float, *, valid: bool = True, speed: float | None = None) -> Fix:
    lon, lat = at(east_m, north_m)
    return Fix(T0_US + round(t_s * 1_000_000), lat, lon, valid, speed)


def polygon(corners_m: Sequence[tuple[float, float]]) -> dict[str, object]:
    ring = [list(at(x, y)) for x, y in (*corners_m, corners_m[0])]
    return {"type": "Polygon", "coordinates": [ring]}


def zone(
    gid: int, x0: float, y0: float, x1: float, y1: float, margin: float | None = None
) -> dict[str, object]:
    """A rectangular zone between two corners (metres from ORIGIN)."""
    return {
        "id": gid,
        "name": f"zone {gid}",
        "kind": "zone",
        "geometry": polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]),
        "exit_margin_m": margin,
    }


def gate(gid: int, a: tuple[float, float], b: tuple[float, float]) -> dict[str, object]:
    coords = [list(at(*a)), list(at(*b))]
    return {
        "id": gid,
        "name": f"gate {gid}",
        "kind": "gate",
        "geometry": {"type": "LineString", "coordinates": coords},
    }


def circle(
    gid: int, centre: tuple[float, float], radius: float, margin: float | None = None
) -> dict[str, object]:
    return {
        "id": gid,
        "name": f"circle {gid}",
        "kind": "circle",
        "geometry": {"type": "Point", "coordinates": list(at(*centre))},
        "radius_m": radius,
        "exit_margin_m": margin,
    }


def fences(*rows: Mapping[str, object]) -> GeofenceSet:
    gs = GeofenceSet.from_rows(rows)
    assert not gs.invalid, gs.invalid
    return gs


def brief(events: Iterable[Event]) -> list[tuple[str, object, int]]:
    """(event, geofence, ms after T0) of each event, in order."""
    return [(e.event, e.geofence, e.ts_ms - T0_MS) for e in events]


class Store:
    """What the writer would hold in timing_records after applying each :class:`Changes`."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, Event] = {}
        self.too_late = 0

    def apply(self, changes: Changes) -> None:
        for ev in changes.deleted:
            assert ev.id in self.rows, f"deleting a record never written: {ev}"
            del self.rows[ev.id]
        for ev in changes.added:
            self.rows[ev.id] = ev
        self.too_late += changes.too_late

    def events(self) -> list[Event]:
        return sorted(self.rows.values(), key=Event.sort_key)


def feed(
    geofences: GeofenceSet,
    batches: Iterable[Sequence[Fix]],
    config: TimingConfig = TimingConfig(),  # noqa: B008
    state: DeviceState | None = None,
) -> tuple[Store, DeviceState]:
    store = Store()
    state = state or DeviceState(DEVICE)
    for batch in batches:
        state, changes = advance(state, geofences, batch, config)
        store.apply(changes)
    return store, state


def test_fast_pass_through_a_small_zone_gives_enter_then_exit_interpolated():
    # a 20 m box, fixes 30 s apart 300 m either side of it: the zone lies between 140 and
    # 160 m of the 300 m segment, so u = 140/300 and 160/300 of 30 s = 14 000 and 16 000 ms
    gs = fences(zone(1, 140, -10, 160, 10))
    fixes = [fix(0, 0, 0, speed=36.0), fix(30, 300, 0, speed=72.0)]
    events = replay(DEVICE, gs, fixes)
    assert brief(events) == [("enter", 1, 14_000), ("exit", 1, 16_000)]
    enter, leave = events
    assert (enter.longitude, enter.latitude) == pytest.approx(at(140, 0), abs=1e-9)
    assert (leave.longitude, leave.latitude) == pytest.approx(at(160, 0), abs=1e-9)
    assert enter.uncertainty_s == leave.uncertainty_s == 30.0
    assert enter.speed == pytest.approx(36.0 + 14 / 30 * 36.0)
    assert enter.direction is None
    assert enter.id == event_id(DEVICE, 1, "enter", T0_MS + 14_000)
    # the incremental step, fix by fix in time order, writes the same
    store, _ = feed(gs, [[f] for f in fixes])
    assert store.events() == events


def test_event_times_and_positions_by_hand_in_degrees():
    # everything in degrees, at latitude 60 (cos = 1/2): a zone from lon 10.001 to 10.0012 and a
    # circle of 100 m around (10.005, 60) on a track from lon 10 to 10.01 along lat 60 in 60 s
    # (t0 = T0). Zone: u = 0.1 and 0.12 -> 6 000 and 7 200 ms, at lon 10.001 and 10.0012.
    # Circle: 100 m is 100 / (6 371 008.8 * pi/180 * cos 60°) = 100 / 55 597.5398... =
    # 0.0017986407... degrees of longitude, so it is entered at lon 10.0032013593 (u = 0.32013593,
    # t = 19 208.16 ms -> 19 208) and left at lon 10.0067986407 (u = 0.67986407 -> 40 791.84 ->
    # 40 792 ms).
    square = [[10.001, 59.99], [10.0012, 59.99], [10.0012, 60.01], [10.001, 60.01], [10.001, 59.99]]
    gs = fences(
        {"id": "z", "kind": "zone", "geometry": {"type": "Polygon", "coordinates": [square]}},
        {
            "id": "c",
            "kind": "circle",
            "geometry": {"type": "Point", "coordinates": [10.005, 60.0]},
            "radius_m": 100,
        },
    )
    fixes = [Fix(T0_US, 60.0, 10.0), Fix(T0_US + 60_000_000, 60.0, 10.01)]
    events = replay(DEVICE, gs, fixes)
    assert brief(events) == [
        ("enter", "z", 6_000),
        ("exit", "z", 7_200),
        ("enter", "c", 19_208),
        ("exit", "c", 40_792),
    ]
    lons = [e.longitude for e in events]
    assert lons == pytest.approx([10.001, 10.0012, 10.0032013593, 10.0067986407], abs=1e-10)
    assert all(e.latitude == 60.0 for e in events)


def test_gate_crossed_both_ways_gives_directions():
    # a gate pointing north (first point south): going east crosses it from its left to its
    # right (direction 1), coming back west is -1. Gate at 100 m of a 500 m leg of 50 s: 10 s.
    gs = fences(gate(7, (100, -50), (100, 50)))
    fixes = [fix(0, 0, 0), fix(50, 500, 0), fix(100, 0, 0)]
    events = replay(DEVICE, gs, fixes)
    assert brief(events) == [("cross", 7, 10_000), ("cross", 7, 90_000)]
    assert [e.direction for e in events] == [1, -1]
    assert events[0].longitude == pytest.approx(at(100, 0)[0], abs=1e-9)


def test_gate_touched_at_a_fix_counts_once():
    gs = fences(gate(7, (100, -50), (100, 50)))
    # the device stops exactly on the gate, then leaves on the far side: one crossing, at the fix
    events = replay(DEVICE, gs, [fix(0, 0, 0), fix(10, 100, 0), fix(20, 200, 0)])
    assert brief(events) == [("cross", 7, 10_000)]


def jitter(n: int, inside_m: float, outside_m: float) -> list[Fix]:
    """A parked device on the east edge (x = 100) of a zone, alternating in and out."""
    return [fix(10 * i, 100 - inside_m if i % 2 == 0 else 100 + outside_m, 0) for i in range(n)]


def test_parked_device_jittering_on_an_edge_flaps_without_a_margin():
    gs = fences(zone(1, 0, -50, 100, 50))
    events = replay(DEVICE, gs, jitter(7, 2, 2))
    # the first fix is inside without an event; then every crossing of the edge counts
    assert [e.event for e in events] == ["exit", "enter"] * 3
    assert brief(events)[0] == ("exit", 1, 5_000)  # halfway between 98 m and 102 m


def test_exit_margin_suppresses_the_flapping_and_exits_beyond_it():
    gs = fences(zone(1, 0, -50, 100, 50, margin=5))
    assert replay(DEVICE, gs, jitter(7, 2, 2)) == []
    # it drives off east at 10 m/s from 98 m: it leaves the grown zone at 105 m, 0.7 s later
    fixes = [*jitter(7, 2, 2), fix(70, 98, 0), fix(80, 198, 0)]
    events = replay(DEVICE, gs, fixes)
    assert brief(events) == [("exit", 1, 70_700)]
    assert events[0].longitude == pytest.approx(at(105, 0)[0], abs=1e-9)


def test_exit_margin_rounds_the_corners_exactly():
    # leaving diagonally past the north-east corner of a zone with a 10 m margin: the grown zone's
    # corner is a quarter circle of 10 m around the corner (100, 50), so a track along the
    # diagonal from (90, 40) leaves it at 10 m past the corner: (107.0711, 57.0711)
    gs = fences(zone(1, 0, 0, 100, 50, margin=10))
    events = replay(DEVICE, gs, [fix(0, 90, 40), fix(10, 130, 80)])
    assert [e.event for e in events] == ["exit"]
    d = 10 / math.sqrt(2)
    assert (events[0].longitude, events[0].latitude) == pytest.approx(at(100 + d, 50 + d), abs=1e-9)
    # u = (10 * sqrt 2 + 10) / (40 * sqrt 2) of 10 s
    assert events[0].ts_ms - T0_MS == round((10 * math.sqrt(2) + 10) / (40 * math.sqrt(2)) * 10_000)


def test_overlapping_zones_are_independent_and_exits_come_first():
    # A spans 0..100, B 50..150 (overlapping), C 150..250 shares B's east edge
    gs = fences(zone(1, 0, -50, 100, 50), zone(2, 50, -50, 150, 50), zone(3, 150, -50, 250, 50))
    events = replay(DEVICE, gs, [fix(0, -100, 0), fix(40, 300, 0)])
    assert brief(events) == [
        ("enter", 1, 10_000),
        ("enter", 2, 15_000),
        ("exit", 1, 20_000),
        ("exit", 2, 25_000),  # B left and C entered at the same instant: the exit first
        ("enter", 3, 25_000),
        ("exit", 3, 35_000),
    ]


def test_a_circle_with_and_without_margin():
    gs = fences(circle(4, (0, 0), 50), circle(5, (0, 0), 50, margin=20))
    # through the centre from 100 m west to 100 m east in 20 s: in from -50 m (5 s) to +50 m
    # (15 s); the margin circle is left at +70 m (17 s)
    events = replay(DEVICE, gs, [fix(0, -100, 0), fix(20, 100, 0)])
    assert brief(events) == [
        ("enter", 4, 5_000),
        ("enter", 5, 5_000),
        ("exit", 4, 15_000),
        ("exit", 5, 17_000),
    ]


def test_boundary_is_inside_and_first_fix_sets_membership_without_event():
    gs = fences(zone(1, 0, -50, 100, 50), circle(2, (300, 0), 50))
    # switched on exactly on the zone's edge: inside, no event; leaving it is its exit
    store, state = feed(gs, [[fix(0, 100, 0)]])
    assert store.events() == [] and state.inside == {1}
    # leaving at once: the exit is at the fix; the circle's edge (x = 250) is 150 m of 160 m on
    store, state = feed(gs, [[fix(10, 260, 0)]], state=state)
    assert brief(store.events()) == [("exit", 1, 0), ("enter", 2, 9_375)]
    assert state.inside == {2}


def test_speed_filter_drops_jumps_and_invalid_fixes():
    gs = fences(zone(1, 10_000, -50, 10_100, 50))
    fixes = [
        fix(0, 0, 0),
        fix(10, 10_050, 0),  # 10 km in 10 s = 3 600 km/h: not on the track
        fix(20, 0, 0, valid=False),
        fix(30, 30, 0),
    ]
    assert replay(DEVICE, gs, fixes) == []
    store, state = feed(gs, [[f] for f in fixes])
    assert store.events() == [] and state.last_kept == fixes[3]
    # just under 500 km/h it is kept: 1 375 m in 10 s is 495 km/h through the zone at 1 000 m to
    # 1 100 m; 1 400 m in 10 s (504 km/h) is not
    fast = [fix(0, 9_000, 0), fix(10, 9_000 + 1_375, 0)]
    assert brief(replay(DEVICE, gs, fast)) == [("enter", 1, 7_273), ("exit", 1, 8_000)]
    assert replay(DEVICE, gs, [fix(0, 9_000, 0), fix(10, 9_000 + 1_400, 0)]) == []


def test_newest_first_backlog_gives_the_sorted_replay():
    gs = fences(
        zone(1, 140, -10, 160, 10), gate(2, (400, -50), (400, 50)), circle(3, (700, 0), 30, margin=10)
    )
    fixes = [fix(10 * i, 50 * i, 5 * (i % 3)) for i in range(20)]
    expected = replay(DEVICE, gs, fixes)
    assert len(expected) == 5
    one_by_one, _ = feed(gs, [[f] for f in reversed(fixes)])
    assert one_by_one.events() == expected
    whole, _ = feed(gs, [list(reversed(fixes))])
    assert whole.events() == expected


def test_late_fix_inside_the_window_changes_the_events_to_the_sorted_replay():
    gs = fences(zone(1, 140, -10, 160, 10), zone(2, 140, 190, 160, 210))
    first = [fix(0, 0, 0), fix(60, 300, 0), fix(120, 600, 0)]
    store, state = feed(gs, [[f] for f in first])
    assert brief(store.events()) == [("enter", 1, 28_000), ("exit", 1, 32_000)]
    # a fix late by 90 s: at 30 s the device was 200 m north, so it drove through zone 2
    late = fix(30, 150, 200)
    state, changes = advance(state, gs, [late])
    store.apply(changes)
    assert {e.geofence for e in changes.deleted} == {1}
    assert store.events() == replay(DEVICE, gs, [*first, late])
    # (0, 0) -> (150, 200) in 30 s reaches y = 190 at u = 0.95 (28.5 s); (150, 200) -> (300, 0)
    # in the next 30 s is back at y = 190 at u = 0.05 (31.5 s)
    assert brief(store.events()) == [("enter", 2, 28_500), ("exit", 2, 31_500)]


def test_late_fix_beyond_the_window_changes_nothing():
    gs = fences(zone(1, 140, -10, 160, 10), zone(2, 140, 190, 160, 210))
    config = TimingConfig(late_window_us=60_000_000)
    first = [fix(0, 0, 0), fix(60, 300, 0), fix(120, 600, 0)]
    store, state = feed(gs, [[f] for f in first], config)
    before = store.events()
    state, changes = advance(state, gs, [fix(30, 150, 200)], config)
    assert changes == Changes(too_late=1)
    # the history before the window is gone: only a summary of it (the base) is left
    assert [e.fix.ts_us for e in state.history] == [first[1].ts_us, first[2].ts_us]
    assert store.events() == before


def test_late_fix_at_the_window_edge_is_still_replayed():
    gs = fences(zone(1, 140, -10, 160, 10), zone(2, 140, 190, 160, 210))
    config = TimingConfig(late_window_us=90_000_000)
    first = [fix(0, 0, 0), fix(60, 300, 0), fix(120, 600, 0)]
    store, state = feed(gs, [[f] for f in first], config)
    late = fix(30, 150, 200)  # exactly 90 s behind the newest fix
    state, changes = advance(state, gs, [late], config)
    store.apply(changes)
    assert changes.too_late == 0
    assert store.events() == replay(DEVICE, gs, [*first, late])


def test_duplicate_fix_time_keeps_the_first():
    gs = fences(zone(1, 140, -10, 160, 10))
    store, state = feed(gs, [[fix(0, 0, 0)], [fix(30, 300, 0)]])
    state, changes = advance(state, gs, [fix(30, 0, 500)])
    assert changes == Changes(duplicates=1)
    assert len(store.events()) == 2


def test_geofence_edited_while_devices_are_inside_takes_membership_without_events():
    small = zone(1, 0, -50, 100, 50)
    store, state = feed(fences(small), [[fix(0, 50, 0)], [fix(10, 60, 0)]])
    assert state.inside == {1} and store.events() == []
    # moved away from the device: it is outside now, without an exit
    moved = fences({**small, "geometry": polygon([(500, -50), (600, -50), (600, 50), (500, 50)])})
    state, changes = advance(state, moved, [])
    assert changes == Changes() and state.inside == frozenset()
    state, changes = advance(state, moved, [fix(20, 70, 0)])
    assert changes == Changes()
    # moved back, larger: inside again without an enter; leaving it is an exit
    wide = fences({**small, "geometry": polygon([(0, -50), (200, -50), (200, 50), (0, 50)])})
    state, changes = advance(state, wide, [fix(30, 80, 0)])
    assert changes == Changes() and state.inside == {1}
    state, changes = advance(state, wide, [fix(40, 280, 0)])
    assert brief(changes.added) == [("exit", 1, 36_000)]


def test_late_fix_before_an_edit_does_not_replay_the_edited_geofence_past():
    a, b = zone(1, 140, -10, 160, 10), zone(2, 440, -10, 460, 10)
    store, state = feed(fences(a, b), [[fix(0, 0, 0)], [fix(60, 600, 0)]])
    assert [e.geofence for e in store.events()] == [1, 1, 2, 2]
    # zone 2 is edited (a new id fingerprint) after the device passed it; then a fix of 30 s
    # arrives late and puts the device 300 m north at that time: zone 1's events go (the device
    # never came near it), zone 2's past belongs to its old version and stays
    edited = fences(a, {**b, "name": "renamed", "exit_margin_m": 3})
    state, changes = advance(state, edited, [fix(30, 300, 300)])
    store.apply(changes)
    assert {(e.event, e.geofence) for e in changes.deleted} == {("enter", 1), ("exit", 1)}
    assert changes.added == ()
    assert [e.geofence for e in store.events()] == [2, 2]


def test_removed_geofence_records_stay_and_it_is_forgotten():
    a, b = zone(1, 140, -10, 160, 10), zone(2, 440, -10, 460, 10)
    store, state = feed(fences(a, b), [[fix(0, 0, 0)], [fix(60, 450, 0)]])
    assert state.inside == {2}
    state, changes = advance(state, fences(a), [fix(30, 200, 0)])
    assert state.inside == frozenset()
    # the late fix moved zone 1's events; zone 2 is gone: its record is not withdrawn
    store.apply(changes)
    # 200 m in 30 s: zone 1 from 140 m (21 s) to 160 m (24 s); zone 2 was entered at 440 m of
    # the first 450 m in 60 s (58.667 s)
    assert brief(store.events()) == [("enter", 1, 21_000), ("exit", 1, 24_000), ("enter", 2, 58_667)]


# --- the store's text ----------------------------------------------------------------------------


def test_the_store_text_is_the_state_as_json_whatever_it_holds() -> None:
    fix = Fix(1_700_000_000_123_456, 52.5000001, 13.4000001, True, None)
    checkpoint = Base(frozenset({3, "z9"}), Fix(1_700_000_000_000_000, -0.5, 179.9999999, True, 12.5), 17)
    state = DeviceState(
        'dev "1"\\',
        base=Base(frozenset({7}), fix, fix.ts_us),
        newest_us=fix.ts_us,
        generation='g"1',
        anchors={7: 5, "z9": 9},
        checkpoints=(Base(), checkpoint),
        rejected=(3, 4),
    )
    bare = DeviceState("dev-2")
    for s in (state, bare):
        for _ in range(2):  # the second time from the cached texts
            assert json.loads(state_text(s)) == json.loads(json.dumps(state_to_json(s, versions=False)))
    # a checkpoint changed by replace is another value: its text is written anew
    moved = replace(checkpoint, inside=frozenset({4}))
    changed = replace(state, checkpoints=(moved,))
    assert json.loads(state_text(changed))["checkpoints"] == [
        [[4], *json.loads(state_text(state))["checkpoints"][1][1:]]
    ]

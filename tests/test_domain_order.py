"""Order does not matter: whatever order a device's fixes arrive in, and however they are split
into batches, applying each step's changes leaves exactly the sequential replay's records."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_domain_timing import DEVICE, Store, at, circle, fences, fix, gate, zone
from tpx.domain.geofences import GeofenceSet
from tpx.domain.timing import (
    Changes,
    DeviceState,
    NeedsHistory,
    TimingConfig,
    advance,
    fold,
    replay,
    state_from_json,
    state_text,
    state_to_json,
    with_history,
)
from tpx.domain.track import Fix

#: A small course: overlapping zones (one with a margin), a circle with a margin, a bent gate.
COURSE = fences(
    zone(1, 0, 0, 200, 100),
    zone(2, 150, 50, 300, 250, margin=15),
    circle(3, (-150, 100), 60, margin=10),
    {
        "id": "g",
        "kind": "gate",
        "geometry": {
            "type": "LineString",
            "coordinates": [list(at(100, -200)), list(at(120, -20)), list(at(60, 300))],
        },
    },
    gate(5, (-300, 50), (400, 60)),
)
#: Everything arrives within the window and the history bound.
ROOMY = TimingConfig(late_window_us=10**12, max_history=10_000)

points = st.tuples(
    st.integers(min_value=1, max_value=40),  # seconds since the previous fix
    st.floats(min_value=-350, max_value=450, allow_nan=False),
    st.floats(min_value=-250, max_value=350, allow_nan=False),
    st.booleans().map(lambda b: not b) | st.just(True),  # mostly valid
    st.sampled_from([None, 0.0, 42.0]),
)


@st.composite
def tracks(draw: st.DrawFn) -> list[Fix]:
    steps = draw(st.lists(points, min_size=1, max_size=25))
    fixes, t = [], 0
    for dt, x, y, valid, speed in steps:
        t += dt
        fixes.append(fix(t, x, y, valid=valid, speed=speed))
    # a few GPS jumps far away, which the speed filter drops (or keeps, after a late fix)
    for i in draw(st.lists(st.integers(min_value=0, max_value=len(fixes) - 1), max_size=3)):
        jump = fixes[i]
        fixes[i] = Fix(jump.ts_us, jump.lat + 0.5, jump.lon, jump.valid, jump.speed)
    return fixes


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[list[Fix], list[list[Fix]]]:
    fixes = draw(tracks())
    order = draw(st.permutations(fixes))
    cuts = sorted(draw(st.lists(st.integers(min_value=1, max_value=max(1, len(order) - 1)), max_size=6)))
    batches, start = [], 0
    for cut in [*cuts, len(order)]:
        if cut > start:
            batches.append(order[start:cut])
            start = cut
    return fixes, batches


class Positions:
    """The positions table of one device, as the engine feeds the domain: the first row of each
    time stays, and a late fix older than the memory's history is replayed from here."""

    def __init__(self) -> None:
        self.rows: dict[int, Fix] = {}

    def step(
        self, state: DeviceState, geofences: GeofenceSet, batch: list[Fix], config: TimingConfig
    ) -> tuple[DeviceState, Changes]:
        try:
            result = advance(state, geofences, batch, config)
        except NeedsHistory as need:
            loaded = [
                f
                for t, f in self.rows.items()
                if f.valid
                and (need.since_us is None or t > need.since_us)
                and (need.until_us is None or t <= need.until_us)
            ]
            state = with_history(state, geofences, loaded, need.since_us, config)
            result = advance(state, geofences, batch, config)
        for f in batch:
            self.rows.setdefault(f.ts_us, f)
        return result


def stored(state: DeviceState) -> DeviceState:
    """The state through the store's compact JSON (history folded, fingerprints by generation)."""
    folded = fold(state)
    data = json.loads(state_text(folded))  # the text the stage writes, from cached checkpoints
    assert data == json.loads(json.dumps(state_to_json(folded, versions=False)))
    return state_from_json(data, versions=state.versions, device_id=state.device_id)


@settings(max_examples=400, deadline=None)
@given(arrivals(), st.booleans())
def test_any_arrival_order_and_batching_gives_the_sequential_replay(case, through_store):
    fixes, batches = case
    store, state, positions = Store(), DeviceState(DEVICE), Positions()
    for batch in batches:
        state, changes = positions.step(state, COURSE, batch, ROOMY)
        store.apply(changes)
        # the state survives a trip through JSON (a hot-state store) unchanged
        thawed = state_from_json(json.loads(json.dumps(state_to_json(state))))
        assert thawed == state
        # another instance resumes from the compact stored form (no history in it)
        state = stored(thawed) if through_store else thawed
    assert store.events() == replay(DEVICE, COURSE, fixes)
    assert store.too_late == 0
    # the membership now is the replay's too: a fresh device fed the sorted fixes at once
    sorted_state, _ = advance(DeviceState(DEVICE), COURSE, sorted(fixes, key=lambda f: f.ts_us), ROOMY)
    assert state.inside == sorted_state.inside


@settings(max_examples=200, deadline=None)
@given(arrivals(), st.integers(min_value=20, max_value=200), st.integers(min_value=1, max_value=30))
def test_a_bounded_window_matches_the_replay_of_what_it_accepted(case, window_s, max_history):
    # with a short window and history, a fix older than either is refused and counted: the
    # records must then be the replay of the accepted fixes, never a half-applied change
    fixes, batches = case
    config = TimingConfig(late_window_us=window_s * 1_000_000, max_history=max_history, max_checkpoints=3)
    store, state, positions = Store(), DeviceState(DEVICE), Positions()
    accepted: list[Fix] = []
    for batch in batches:
        valid = [f for f in batch if f.valid]
        if valid:
            # the rule: older than the window behind the newest fix, or at or before the oldest
            # checkpoint (older fixes than the history are replayed from positions)
            newest = max([f.ts_us for f in valid] + ([state.newest_us] if state.newest_us else []))
            horizon = state.replay_horizon_us
            accepted.extend(
                f
                for f in valid
                if f.ts_us >= newest - config.late_window_us and (horizon is None or f.ts_us > horizon)
            )
        state, changes = positions.step(state, COURSE, batch, config)
        store.apply(changes)
        assert len(state.history) <= max_history
        assert len(state.checkpoints) <= config.max_checkpoints
    assert store.too_late == sum(1 for f in fixes if f.valid) - len(accepted)
    assert store.events() == replay(DEVICE, COURSE, accepted)


def test_a_fix_refused_as_too_late_stays_out_of_a_replay_from_positions():
    # window 60 s, one fix of history in memory: the late fix of 45 s is older than the history
    # and is replayed from positions, which also hold the fix of 30 s that came after the window
    # had passed it (refused, too late): that one must stay out, as it was when it came
    gs = fences(zone(1, 280, -10, 320, 10), zone(7, 90, 290, 110, 310))
    config = TimingConfig(late_window_us=60_000_000, max_history=1)
    store, state, positions = Store(), DeviceState(DEVICE), Positions()
    accepted = [fix(0, 0, 0), fix(50, 200, 0), fix(100, 400, 0)]
    for f in accepted:
        state, changes = positions.step(state, gs, [f], config)
        store.apply(changes)
    refused = fix(30, 100, 300)  # inside zone 7: on the track, it would give zone 7's events
    state, changes = positions.step(state, gs, [refused], config)
    assert changes.too_late == 1
    late = fix(45, 180, 0)
    state, changes = positions.step(state, gs, [late], config)
    store.apply(changes)
    assert changes.too_late == 0
    assert store.events() == replay(DEVICE, gs, [*accepted, late])
    assert {e.geofence for e in store.events()} == {1}


def test_refused_fixes_beyond_what_the_state_remembers_stay_out_of_a_replay_too():
    # as above, with two fixes refused and room to remember one (max_rejected): the one it
    # forgets must not come back in the replay from positions either. The state gives up the
    # checkpoints a replay would take it back from (a fix before them is then too late)
    gs = fences(zone(1, 280, -10, 320, 10), zone(7, 90, 290, 110, 310))
    config = TimingConfig(late_window_us=60_000_000, max_history=1, max_rejected=1)
    store, state, positions = Store(), DeviceState(DEVICE), Positions()
    accepted = [fix(0, 0, 0), fix(50, 200, 0), fix(100, 400, 0)]
    for f in accepted:
        state, changes = positions.step(state, gs, [f], config)
        store.apply(changes)
    for refused in (fix(30, 100, 300), fix(35, 100, 300)):  # both inside zone 7
        state, changes = positions.step(state, gs, [refused], config)
        assert changes.too_late == 1
    late = fix(45, 180, 0)
    state, changes = positions.step(state, gs, [late], config)
    store.apply(changes)
    kept = [*accepted, late] if changes.too_late == 0 else accepted
    assert store.events() == replay(DEVICE, gs, kept)
    assert {e.geofence for e in store.events()} == {1}

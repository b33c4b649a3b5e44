"""Order does not matter: whatever order a device's fixes arrive in, and however they are split
into batches, applying each step's changes leaves exactly the sequential replay's records."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_domain_timing import DEVICE, Store, at, circle, fences, fix, gate, zone
from tpx.domain.timing import (
    DeviceState,
    TimingConfig,
    advance,
    replay,
    state_from_json,
    state_to_json,
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


@settings(max_examples=400, deadline=None)
@given(arrivals())
def test_any_arrival_order_and_batching_gives_the_sequential_replay(case):
    fixes, batches = case
    store, state = Store(), DeviceState(DEVICE)
    for batch in batches:
        state, changes = advance(state, COURSE, batch, ROOMY)
        store.apply(changes)
        # the state survives a trip through JSON (a hot-state store) unchanged
        thawed = state_from_json(json.loads(json.dumps(state_to_json(state))))
        assert thawed == state
        state = thawed
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
    config = TimingConfig(late_window_us=window_s * 1_000_000, max_history=max_history)
    store, state = Store(), DeviceState(DEVICE)
    accepted: list[Fix] = []
    for batch in batches:
        valid = [f for f in batch if f.valid]
        if valid:
            # the rule: older than the window behind the newest fix, or at or before the base
            newest = max([f.ts_us for f in valid] + ([state.newest_us] if state.newest_us else []))
            horizon = state.base.horizon_us
            accepted.extend(
                f
                for f in valid
                if f.ts_us >= newest - config.late_window_us and (horizon is None or f.ts_us > horizon)
            )
        state, changes = advance(state, COURSE, batch, config)
        store.apply(changes)
        assert len(state.history) <= max_history
    assert store.too_late == sum(1 for f in fixes if f.valid) - len(accepted)
    assert store.events() == replay(DEVICE, COURSE, accepted)

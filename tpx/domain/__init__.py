"""The domain: geofence membership and timing events from each device's fixes, as pure logic.

Nothing here touches the engine, a database or Redis: values in, values out. The engine's stage
feeds it each device's committed fixes and writes what it returns.

Modules
-------
- :mod:`tpx.domain.geofences` -- rows → :class:`Geofence` or :class:`Invalid` (never raised);
  :class:`GeofenceSet`, the active ones with an STRtree over their grown lon/lat boxes.
- :mod:`tpx.domain.shapes` -- each geofence projected once into local metres (equirectangular at
  its own latitude: a circle's centre, a zone's centroid; R = 6,371,008.8 m) and where a straight
  segment meets it. The projection is affine in lon/lat, so the fraction u along a segment is the
  same in both, and grown areas (zone + margin, circle radius + margin) are exact in metres.
- :mod:`tpx.domain.track` -- :class:`Fix`, the speed filter, interpolation of time and position.
- :mod:`tpx.domain.timing` -- the events: :func:`replay` (the definition) and :func:`advance`
  (the incremental step), :class:`DeviceState` and its JSON form.

Semantics (issue 16)
--------------------
The track is the valid fixes that imply at most ``max_speed_kmh`` from the previous kept fix, in
fix-time order. Zones and circles: a device is inside from where the track enters the area
(boundary included) until it leaves the area grown by ``exit_margin_m``; gates: each meeting of
the line is a ``cross`` (direction 1 from the left of the first→last chord to its right). An
event at fraction u of the segment (t0, p0) → (t1, p1) is at t0 + u·(t1 - t0), rounded half up to
the millisecond, and at p0 + u·(p1 - p0); ``uncertainty_s`` = t1 - t0. A gate met exactly at a
fix counts on the segment that ends there, not again on the one that starts there. Events are
ordered by time; at the same millisecond exits come first, except an exit that follows an enter
of the same geofence on the same segment (a touch). Ids are uuid5 over (device, geofence id,
event, time in ms), so a replay writes the same ids.

No past, no event: a device's first kept fix sets its membership from where it is. A geofence
that is new or edited (its fingerprint: kind, geometry, radius, margin -- not its name) is
*adopted* at the device's newest kept fix: membership there from where that fix is, no event, and
the geofence remembers that fix time as its *anchor*: segments starting before the anchor give
it no events (its past belonged to another version, and its records stay as written).

Order does not matter: the design
---------------------------------
What has been written must equal :func:`replay` of the fixes seen, whatever order they arrive in
and however they are batched. A device's :class:`DeviceState` keeps a bounded *history*: every
valid fix of the last ``late_window_us`` behind the newest one (at most ``max_history``), each
with the state just after it (kept or not, membership, last kept fix) and the events of the
segment that ends at it. Older history is folded into a *base* (the state before the oldest
entry, and its time, the *horizon*).

:func:`advance` (one device, one batch, any order):

1. reconcile the geofences (adopt new and edited ones, forget removed ones; no events);
2. sort the batch; a valid fix older than ``newest - late_window`` or at or before the horizon is
   *too late*: it changes nothing and is counted (the caller counts it as a late fix); a fix
   whose time the history already has is a duplicate (the first stays, as in ``positions``);
3. merge the accepted fixes into the history and replay from the checkpoint just before the
   first of them: the speed filter, membership and events are recomputed entry by entry (a late
   fix can make a dropped jump kept, or a kept fix dropped). The replay stops at the first old
   entry past the last new fix whose state (kept, membership, last kept fix) is unchanged: from
   there on everything is as before, so a newest-first backlog costs one segment per fix;
4. diff the replayed span's old events (those of current geofences, after their anchor) against
   the new ones by id: ``added`` (new or changed: upsert), ``deleted`` (no longer true: delete).
   Applying them leaves exactly the replay's records;
5. trim the history to the window and the bound.

Memory and stores: the history in memory is short (``max_history`` fixes); what is cut from it
becomes *checkpoints* (the state at a fix, a few hundred bytes), thinned to ``max_checkpoints``
across the window, the oldest being the newest one before the window (the replay origin). A late
fix older than the history raises :class:`NeedsHistory`: the caller loads the device's valid
fixes after the checkpoint before it (from ``positions``) and calls :func:`with_history`, which
replays them from that checkpoint; then :func:`advance` goes on as if they had been in memory.
Fixes refused as too late are remembered (``rejected``) while a replay could reach them, so a
replay from positions leaves them out as they were left out when they came. :func:`fold` turns
the history into checkpoints: that compact state is what the engine stores per device, so that
another process (another instance, or this one after a crash) resumes exactly where it was.

Limits: geometry is planar in each geofence's frame, so a geofence may not cross the
antimeridian (refused) and a segment is straight in lon/lat, not a great circle.
"""

from tpx.domain.geofences import Geofence, GeofenceId, GeofenceSet, Invalid, parse_geofence
from tpx.domain.timing import (
    Changes,
    DeviceState,
    Event,
    NeedsHistory,
    TimingConfig,
    advance,
    event_id,
    fold,
    replay,
    state_from_json,
    state_text,
    state_to_json,
    with_history,
)
from tpx.domain.track import Fix

__all__ = [
    "Changes",
    "DeviceState",
    "Event",
    "Fix",
    "Geofence",
    "GeofenceId",
    "GeofenceSet",
    "Invalid",
    "NeedsHistory",
    "TimingConfig",
    "advance",
    "event_id",
    "fold",
    "parse_geofence",
    "replay",
    "state_from_json",
    "state_text",
    "state_to_json",
    "with_history",
]

"""Timing events from a device's track: enter/exit of zones and circles, gate crossings.

:func:`replay` is the definition: the events of a device's whole history, its fixes sorted by
fix time. :func:`advance` is the incremental step a running process takes with each batch of one
device's fixes, in any order; it returns what to write (``added``, upserted by id) and what to
remove (``deleted``), so that what has been written always equals :func:`replay` of the fixes
seen (see the package docstring for the design and its limits).
"""

from __future__ import annotations

import bisect
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

from tpx.domain.geofences import Geofence, GeofenceId, GeofenceSet
from tpx.domain.shapes import Area, Interval, Line
from tpx.domain.track import (
    DEFAULT_MAX_SPEED_KMH,
    US_PER_S,
    Fix,
    kept,
    plausible,
    position_at,
    speed_at,
    time_at_ms,
)

EventKind: TypeAlias = Literal["enter", "exit", "cross"]
Membership: TypeAlias = frozenset[GeofenceId]
#: The uuid5 namespace of timing record ids (fixed forever: a replay must write the same ids).
EVENT_NAMESPACE = uuid.UUID("6b1f3c0e-0d4e-5c1a-9a57-7470782d7469")
#: Order of events at the same millisecond: exits first, then enters and crosses, then an exit
#: that follows an enter of the same geofence at that same millisecond (a touch).
RANK_EXIT, RANK_ENTER, RANK_EXIT_AFTER_ENTER = 0, 1, 2
NO_MEMBERSHIP: Membership = frozenset()


def event_id(device_id: str, geofence: GeofenceId, event: EventKind, ts_ms: int) -> uuid.UUID:
    """The timing record's id: uuid5 over device, geofence id, event and time in milliseconds."""
    return uuid.uuid5(EVENT_NAMESPACE, f"{device_id}\x1f{geofence}\x1f{event}\x1f{ts_ms}")


@dataclass(frozen=True, slots=True)
class Event:
    """One timing record."""

    id: uuid.UUID
    device_id: str
    geofence: GeofenceId
    event: EventKind
    ts_ms: int
    latitude: float
    longitude: float
    speed: float | None
    #: Gates: 1 from the left of the gate's first→last chord to its right, -1 the other way.
    direction: int | None
    #: The time between the two fixes the event was interpolated between.
    uncertainty_s: float
    #: The fix time the segment starts at (which geofence version's past the event belongs to).
    segment_start_us: int
    #: Its place among events of the same millisecond (part of equality, so that a replay that
    #: only reorders them re-sends them: the writer's order then matches).
    rank: int = RANK_ENTER

    def sort_key(self) -> tuple[int, int, str]:
        return (self.ts_ms, self.rank, repr(self.geofence))


def _event(
    device_id: str, g: Geofence, kind: EventKind, f0: Fix, f1: Fix, u: float, rank: int, direction: int | None
) -> Event:
    ts_ms = time_at_ms(f0, f1, u)
    lat, lon = position_at(f0, f1, u)
    return Event(
        id=event_id(device_id, g.id, kind, ts_ms),
        device_id=device_id,
        geofence=g.id,
        event=kind,
        ts_ms=ts_ms,
        latitude=lat,
        longitude=lon,
        speed=speed_at(f0, f1, u),
        direction=direction,
        uncertainty_s=(f1.ts_us - f0.ts_us) / US_PER_S,
        segment_start_us=f0.ts_us,
        rank=rank,
    )


def _walk(
    area: Area, inside: bool, xy0: tuple[float, float], xy1: tuple[float, float]
) -> tuple[bool, list[tuple[float, EventKind]]]:
    """Membership along one segment: inside from entering the area until leaving the grown area."""
    core = area.inside(*xy0, *xy1)
    # the grown area only matters from where the device is inside: most segments never are
    grown: list[Interval] | None = core if area.margin_m == 0.0 else None
    u, exited = 0.0, False
    hits: list[tuple[float, EventKind]] = []
    while True:
        if inside:
            if grown is None:
                grown = area.inside_grown(*xy0, *xy1)
            run = next((r for r in grown if r[0] <= u <= r[1]), None)
            if run is not None and run[1] >= 1.0:
                return True, hits
            u = u if run is None else run[1]  # not in the grown area at all: float noise, left here
            hits.append((u, "exit"))
            inside, exited = False, True
        else:
            start = next((r[0] for r in core if (r[0] > u if exited else r[0] >= u)), None)
            if start is None:
                return False, hits
            u = start
            hits.append((u, "enter"))
            inside = True


def _segment(
    device_id: str,
    f0: Fix | None,
    f1: Fix,
    inside: Membership,
    geofences: GeofenceSet,
    anchors: Mapping[GeofenceId, int],
) -> tuple[Membership, list[Event]]:
    """Membership after the kept fix ``f1`` and the events of the segment from ``f0``.

    No past, no event: without a previous fix, or for a geofence adopted (``anchors``) after
    ``f0``, membership at ``f1`` is where ``f1`` is.
    """
    if f0 is None:
        return geofences.areas_at(f1.lon, f1.lat), []
    near = geofences.near(f0.lon, f0.lat, f1.lon, f1.lat)
    stray = [geofences.by_id[i] for i in inside if i in geofences.by_id and geofences.by_id[i] not in near]
    now: set[GeofenceId] = set()
    events: list[Event] = []
    for g in (*near, *stray):
        shape = g.shape
        xy0, xy1 = shape.frame.xy(f0.lon, f0.lat), shape.frame.xy(f1.lon, f1.lat)
        anchor = anchors.get(g.id)
        if anchor is not None and f0.ts_us < anchor:
            if isinstance(shape, Area) and shape.contains(*xy1):
                now.add(g.id)
        elif isinstance(shape, Line):
            for u, direction in shape.crossings(*xy0, *xy1):
                events.append(_event(device_id, g, "cross", f0, f1, u, RANK_ENTER, direction))
        else:
            is_in, hits = _walk(shape, g.id in inside, xy0, xy1)
            entered_ms: int | None = None
            for u, kind in hits:
                if kind == "enter":
                    ev = _event(device_id, g, kind, f0, f1, u, RANK_ENTER, None)
                    entered_ms = ev.ts_ms
                else:
                    ev = _event(device_id, g, kind, f0, f1, u, RANK_EXIT, None)
                    if ev.ts_ms == entered_ms:
                        ev = replace(ev, rank=RANK_EXIT_AFTER_ENTER)
                events.append(ev)
            if is_in:
                now.add(g.id)
    return frozenset(now), events


def ordered(events: Iterable[Event]) -> list[Event]:
    """Events in time order (exits first at the same millisecond), each id once (the first)."""
    unique: dict[uuid.UUID, Event] = {}
    for ev in events:
        unique.setdefault(ev.id, ev)
    return sorted(unique.values(), key=Event.sort_key)


def replay(
    device_id: str,
    geofences: GeofenceSet,
    fixes: Iterable[Fix],
    max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH,
) -> list[Event]:
    """The events of a device's whole history: its fixes sorted by fix time, each time once."""
    by_time: dict[int, Fix] = {}
    for fix in fixes:
        if fix.valid:
            by_time.setdefault(fix.ts_us, fix)
    events: list[Event] = []
    previous: Fix | None = None
    inside = NO_MEMBERSHIP
    for fix in kept(sorted(by_time.values(), key=_fix_time), max_speed_kmh):
        inside, found = _segment(device_id, previous, fix, inside, geofences, {})
        events.extend(found)
        previous = fix
    return ordered(events)


def _evolve(
    state: DeviceState,
    *,
    base: Base | None = None,
    history: tuple[Entry, ...] | None = None,
    newest_us: int | None = None,
    checkpoints: tuple[Base, ...] | None = None,
    anchors: Mapping[GeofenceId, int] | None = None,
    rejected: tuple[int, ...] | None = None,
) -> DeviceState:
    """``state`` with some fields replaced, by the constructor: on the path of every fix, where
    ``dataclasses.replace`` (which inspects the fields each time) costs several times more."""
    return DeviceState(
        state.device_id,
        state.base if base is None else base,
        state.history if history is None else history,
        state.newest_us if newest_us is None else newest_us,
        state.generation,
        state.versions,
        state.anchors if anchors is None else anchors,
        state.checkpoints if checkpoints is None else checkpoints,
        state.rejected if rejected is None else rejected,
    )


def _fix_time(fix: Fix) -> int:
    return fix.ts_us


def _entry_time(entry: Entry) -> int:
    return entry.fix.ts_us


# --------------------------------------------------------------------------- incremental state


@dataclass(frozen=True, slots=True)
class TimingConfig:
    #: ``TPX_MAX_SPEED_KMH``: a fix implying more from the previous kept fix is not on the track.
    max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH
    #: How late a fix may be (behind the device's newest) and still change the events.
    late_window_us: int = 600 * US_PER_S
    #: At most this many recent fixes per device are kept in memory for replaying late ones;
    #: a fix older than those is replayed from the positions table (:class:`NeedsHistory`).
    max_history: int = 2_000
    #: At most this many checkpoints (states at older fixes) span the window behind the history:
    #: a late fix older than the history replays the positions from the checkpoint before it.
    max_checkpoints: int = 4
    #: At most this many too-late fix times are remembered (so that a replay from positions
    #: leaves them out, as they were when they came); beyond, the oldest checkpoints go.
    max_rejected: int = 256


@dataclass(frozen=True, slots=True)
class Entry:
    """One valid fix of the recent history and the state just after it."""

    fix: Fix
    kept: bool
    inside: Membership
    #: The newest kept fix at or before this one.
    last_kept: Fix | None
    #: The events of the segment ending at this fix.
    events: tuple[Event, ...]
    #: The state after it as a checkpoint, once :func:`as_base` made it (its text then cached).
    base: Base | None = field(default=None, init=False, compare=False, repr=False)

    def as_base(self) -> Base:
        """The state just after this entry, as a checkpoint (one object per entry)."""
        base = self.base
        if base is None:
            base = Base(self.inside, self.last_kept, self.fix.ts_us)
            object.__setattr__(self, "base", base)  # a cache on a frozen value: equality ignores it
        return base


@dataclass(frozen=True, slots=True)
class Base:
    """The state just before the oldest entry of the history."""

    inside: Membership = NO_MEMBERSHIP
    last_kept: Fix | None = None
    #: Fixes at or before this time can no longer be replayed (trimmed, or before a resume).
    horizon_us: int | None = None
    #: Its JSON text, once :func:`state_text` wrote it (a checkpoint outlives many batches).
    text: str | None = field(default=None, init=False, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DeviceState:
    device_id: str
    base: Base = Base()
    history: tuple[Entry, ...] = ()
    #: The newest valid fix time seen: the late window counts back from here.
    newest_us: int | None = None
    #: The :attr:`GeofenceSet.generation` membership was last reconciled with.
    generation: str | None = None
    #: Each geofence's fingerprint when the device adopted it (the set's shared mapping).
    versions: Mapping[GeofenceId, str] = field(default_factory=dict)
    #: Geofences adopted after the device's first fix: the fix time they were adopted at.
    anchors: Mapping[GeofenceId, int] = field(default_factory=dict)
    #: Older states than ``base`` (oldest first) still inside the window: a late fix older than
    #: the history is replayed from the newest one before it, with the fixes from positions.
    checkpoints: tuple[Base, ...] = ()
    #: Times of valid fixes refused as too late that lie after the oldest checkpoint: a replay
    #: from positions leaves them out (they changed nothing when they came, and never will).
    rejected: tuple[int, ...] = ()

    @classmethod
    def resume(
        cls, device_id: str, inside: Iterable[GeofenceId], last_fix: Fix | None, geofences: GeofenceSet
    ) -> DeviceState:
        """A device seen before by another process: its membership (from its newest timing
        records) and its last valid fix; nothing before that fix can be replayed."""
        return cls(
            device_id,
            Base(frozenset(inside), last_fix, None if last_fix is None else last_fix.ts_us),
            newest_us=None if last_fix is None else last_fix.ts_us,
            generation=geofences.generation,
            versions=geofences.fingerprints,
        )

    @property
    def inside(self) -> Membership:
        """The zones and circles the device is in now."""
        return self.history[-1].inside if self.history else self.base.inside

    @property
    def last_kept(self) -> Fix | None:
        return self.history[-1].last_kept if self.history else self.base.last_kept

    @property
    def replay_horizon_us(self) -> int | None:
        """Fixes at or before this time can no longer be replayed (None: every fix can)."""
        return self.checkpoints[0].horizon_us if self.checkpoints else self.base.horizon_us

    def now(self) -> Base:
        """The state after the newest fix, as a checkpoint."""
        if not self.history:
            return self.base
        last = self.history[-1]
        return Base(last.inside, last.last_kept, last.fix.ts_us)


class NeedsHistory(Exception):  # noqa: N818 (a request to the caller, not an error)
    """:func:`advance` needs the device's valid fixes after ``since_us`` up to its newest
    (from positions): a late fix is older than the history kept in memory. Load them and
    call :func:`with_history`, then :func:`advance` again."""

    def __init__(self, device_id: str, since_us: int | None, until_us: int | None) -> None:
        super().__init__(f"{device_id}: fixes after {since_us} needed")
        self.device_id = device_id
        self.since_us = since_us
        self.until_us = until_us


@dataclass(frozen=True, slots=True)
class Changes:
    """What one :func:`advance` changes in timing_records."""

    #: New or changed records (upsert by id), in time order.
    added: tuple[Event, ...] = ()
    #: Records no longer true (delete by id): a late fix changed the track.
    deleted: tuple[Event, ...] = ()
    #: Valid fixes too late to change anything (older than the window or the history).
    too_late: int = 0
    #: Valid fixes whose time this device already has (the first one stays).
    duplicates: int = 0


def reconcile(state: DeviceState, geofences: GeofenceSet) -> DeviceState:
    """Adopt new and edited geofences at the device's newest kept fix, without events, and
    forget removed ones."""
    if state.generation == geofences.generation:
        return state
    versions = geofences.fingerprints
    last = state.last_kept
    if last is None and not state.anchors:  # nothing seen yet: nothing to adopt
        return replace(state, generation=geofences.generation, versions=versions)
    changed, gone = _diff(state.generation, state.versions, geofences)
    anchors = {gid: t for gid, t in state.anchors.items() if gid not in gone}
    if last is None or not gone:
        return replace(state, generation=geofences.generation, versions=versions, anchors=anchors)
    anchors.update(dict.fromkeys(changed, last.ts_us))
    now = geofences.areas_at(last.lon, last.lat) & changed

    def adopt(inside: Membership, at_or_after_last: bool) -> Membership:
        kept_part = inside - gone
        return kept_part | now if at_or_after_last else kept_part

    history = tuple(replace(e, inside=adopt(e.inside, e.fix.ts_us >= last.ts_us)) for e in state.history)
    base = replace(state.base, inside=adopt(state.base.inside, state.base.last_kept == last))
    checkpoints = tuple(replace(c, inside=adopt(c.inside, c.last_kept == last)) for c in state.checkpoints)
    return replace(
        state,
        base=base,
        history=history,
        checkpoints=checkpoints,
        generation=geofences.generation,
        versions=versions,
        anchors=anchors,
    )


#: (old generation, new generation) -> (changed, gone): every device reconciles the same pair.
_DIFFS: dict[tuple[str | None, str], tuple[frozenset[GeofenceId], frozenset[GeofenceId]]] = {}
MAX_CACHED_DIFFS = 64


def _diff(
    generation: str | None, old: Mapping[GeofenceId, str], geofences: GeofenceSet
) -> tuple[frozenset[GeofenceId], frozenset[GeofenceId]]:
    """The geofences new or edited since ``old`` (changed), and those plus the removed (gone)."""
    key = (generation, geofences.generation)
    # only a known old set is cached: without its fingerprints every geofence counts as changed,
    # which must not stick to that generation for the devices that come later
    cacheable = generation is not None and bool(old)
    cached = _DIFFS.get(key) if cacheable else None
    if cached is not None:
        return cached
    versions = geofences.fingerprints
    changed = frozenset(gid for gid, fp in versions.items() if old.get(gid) != fp)
    gone = frozenset(gid for gid in old if gid not in versions) | changed
    if cacheable:
        if len(_DIFFS) >= MAX_CACHED_DIFFS:
            _DIFFS.clear()
        _DIFFS[key] = (changed, gone)
    return changed, gone


def _comparable(ev: Event, geofences: GeofenceSet, anchors: Mapping[GeofenceId, int]) -> bool:
    """Whether a stored event is the current geofences' to confirm or withdraw (not the past of a
    version since edited or removed)."""
    if ev.geofence not in geofences.by_id:
        return False
    anchor = anchors.get(ev.geofence)
    return anchor is None or ev.segment_start_us >= anchor


def advance(
    state: DeviceState,
    geofences: GeofenceSet,
    fixes: Sequence[Fix],
    config: TimingConfig = TimingConfig(),
) -> tuple[DeviceState, Changes]:
    """One device's batch of fixes (any order) → its new state and the timing record changes.

    Raises :class:`NeedsHistory` when a late fix is older than the history kept in memory but
    not than the oldest checkpoint: the caller loads the fixes it names and calls
    :func:`with_history` first.
    """
    state = reconcile(state, geofences)
    if len(fixes) == 1:  # most batches hold one fix of a device, newer than its others
        appended = _append_one(state, geofences, fixes[0], config)
        if appended is not None:
            return appended
    return _merge(state, geofences, fixes, config)


def _merge(
    state: DeviceState, geofences: GeofenceSet, fixes: Sequence[Fix], config: TimingConfig
) -> tuple[DeviceState, Changes]:
    """:func:`advance`'s general path (the state reconciled): fixes in any order, late ones
    merged into the history."""
    valid = sorted((f for f in fixes if f.valid), key=_fix_time)
    if not valid:
        return state, Changes()
    newest = max(valid[-1].ts_us, state.newest_us if state.newest_us is not None else valid[-1].ts_us)
    floor = newest - config.late_window_us
    horizon = state.base.horizon_us
    replayable = state.replay_horizon_us
    history = state.history
    # the common batch only appends: then the history's times are never needed
    last = history[-1].fix.ts_us if history else horizon
    appends = last is None or valid[0].ts_us > last
    times = [] if appends else [e.fix.ts_us for e in history]
    rejected = set(state.rejected)
    accepted: list[Fix] = []
    refused: list[int] = []
    duplicates = 0
    for fix in valid:
        t = fix.ts_us
        if appends and t >= floor and (not rejected or t not in rejected):
            if accepted and accepted[-1].ts_us == t:
                duplicates += 1
            else:
                accepted.append(fix)
        elif t < floor or (replayable is not None and t <= replayable):
            refused.append(t)
        elif t in rejected or (accepted and accepted[-1].ts_us == t) or _has(times, t) or t == horizon:
            duplicates += 1
        elif horizon is not None and t < horizon:
            raise NeedsHistory(state.device_id, _checkpoint_before(state, t).horizon_us, state.newest_us)
        else:
            accepted.append(fix)
    if refused:
        state = _remember(state, refused, config)
    if not accepted:
        return state, Changes(too_late=len(refused), duplicates=duplicates)
    start = len(history) if appends else bisect.bisect_left(times, accepted[0].ts_us)
    new_history, added, deleted = _replay_from(state, geofences, accepted, start, config)
    state = _trim(_evolve(state, history=new_history, newest_us=newest), floor, config)
    return state, Changes(tuple(added), tuple(deleted), len(refused), duplicates)


def _append_one(
    state: DeviceState, geofences: GeofenceSet, fix: Fix, config: TimingConfig
) -> tuple[DeviceState, Changes] | None:
    """:func:`advance` of one valid fix newer than every fix of the history, inside the window
    and not refused before: its segment from the newest kept fix, appended (what the general
    path computes for it, without its merge and its comparisons). None: not that case."""
    if not fix.valid:
        return None
    t = fix.ts_us
    history = state.history
    if history:
        previous = history[-1]
        if t <= previous.fix.ts_us:
            return None
        inside, last_kept = previous.inside, previous.last_kept
    else:
        base = state.base
        if base.horizon_us is not None and t <= base.horizon_us:
            return None
        inside, last_kept = base.inside, base.last_kept
    newest = t if state.newest_us is None or t > state.newest_us else state.newest_us
    floor = newest - config.late_window_us
    # a time refused before is older than the floor or than the history: never here, unless the
    # window changed since (a restart with a longer TPX_DOMAIN_LATE_WINDOW); the general path
    # then decides (``rejected`` is sorted)
    if t < floor or (state.rejected and t <= state.rejected[-1]):
        return None
    added: tuple[Event, ...] = ()
    if plausible(last_kept, fix, config.max_speed_kmh):
        inside, found = _segment(state.device_id, last_kept, fix, inside, geofences, state.anchors)
        entry = Entry(fix, True, inside, fix, tuple(found))
        if found:
            added = tuple(ordered(found))
    else:
        entry = Entry(fix, False, inside, last_kept, ())
    appended = _evolve(state, history=(*history, entry), newest_us=newest)
    return _trim(appended, floor, config), Changes(added)


def _checkpoint_before(state: DeviceState, t: int) -> Base:
    """The newest checkpoint strictly before ``t`` (the caller knows one is)."""
    before = [c for c in state.checkpoints if c.horizon_us is None or c.horizon_us < t]
    return before[-1] if before else state.checkpoints[0]


def _remember(state: DeviceState, refused: list[int], config: TimingConfig) -> DeviceState:
    """The state remembering the too-late times a replay from positions must leave out: those
    after the oldest checkpoint (older ones can never be replayed anyway), at most
    ``max_rejected``. Beyond, the checkpoints before the newest time forgotten go, so that no
    replay from positions can take a forgotten time back in (a late fix before the oldest
    checkpoint left is then refused as too late, as one older than the window is)."""
    replayable = state.replay_horizon_us
    times = sorted({*state.rejected, *(t for t in refused if replayable is None or t > replayable)})
    keep = config.max_rejected
    if len(times) <= keep:
        return _evolve(state, rejected=tuple(times))
    forgotten = times[-keep - 1]
    left = tuple(c for c in state.checkpoints if c.horizon_us is not None and c.horizon_us >= forgotten)
    return _evolve(state, rejected=tuple(times[len(times) - keep :]), checkpoints=left)


def with_history(
    state: DeviceState,
    geofences: GeofenceSet,
    fixes: Iterable[Fix],
    since_us: int | None,
    config: TimingConfig = TimingConfig(),
) -> DeviceState:
    """The state with its history rebuilt from the checkpoint at ``since_us`` and the valid
    ``fixes`` after it (from positions; this batch's own rows left out), as :class:`NeedsHistory`
    asked. The records of that history were written when its fixes came, so nothing is
    returned: :func:`advance` then replays the late fix against it."""
    state = reconcile(state, geofences)
    points = [*state.checkpoints, state.base]
    at = next((i for i, c in enumerate(points) if c.horizon_us == since_us), None)
    if at is None:
        raise ValueError(f"{state.device_id}: no checkpoint at {since_us}")
    origin = points[at]
    rejected = set(state.rejected)
    by_time: dict[int, Fix] = {}
    for fix in fixes:
        t = fix.ts_us
        if fix.valid and (since_us is None or t > since_us) and t not in rejected:
            by_time.setdefault(t, fix)
    rebuilt = replace(state, base=origin, checkpoints=tuple(points[:at]), history=())
    accepted = sorted(by_time.values(), key=_fix_time)
    if not accepted:
        return rebuilt
    history, _, _ = _replay_from(rebuilt, geofences, accepted, 0, config)
    return replace(rebuilt, history=history)


def _has(times: list[int], t: int) -> bool:
    i = bisect.bisect_left(times, t)
    return i < len(times) and times[i] == t


def _replay_from(
    state: DeviceState, geofences: GeofenceSet, accepted: list[Fix], start: int, config: TimingConfig
) -> tuple[tuple[Entry, ...], list[Event], list[Event]]:
    """Merge the accepted fixes into the history and replay from the first of them until the state
    after an old entry is what it was; return the history and the events added and withdrawn."""
    old = state.history
    before = old[start - 1] if start else None
    inside = before.inside if before else state.base.inside
    last_kept = before.last_kept if before else state.base.last_kept
    newest_new = accepted[-1].ts_us
    out: list[Entry] = []
    old_events: list[Event] = []
    new_events: list[Event] = []
    i, k = start, 0
    while i < len(old) or k < len(accepted):
        is_new = k < len(accepted) and (i >= len(old) or accepted[k].ts_us < old[i].fix.ts_us)
        fix = accepted[k] if is_new else old[i].fix
        if plausible(last_kept, fix, config.max_speed_kmh):
            inside, found = _segment(state.device_id, last_kept, fix, inside, geofences, state.anchors)
            entry = Entry(fix, True, inside, fix, tuple(found))
            last_kept = fix
        else:
            entry = Entry(fix, False, inside, last_kept, ())
        out.append(entry)
        new_events.extend(entry.events)
        if is_new:
            k += 1
            continue
        previous = old[i]
        old_events.extend(e for e in previous.events if _comparable(e, geofences, state.anchors))
        i += 1
        if (
            fix.ts_us > newest_new
            and entry.kept == previous.kept
            and entry.inside == previous.inside
            and entry.last_kept == previous.last_kept
        ):
            break  # the same state as before from here on: the rest of the history stands
    was = {e.id: e for e in old_events}
    now = {e.id: e for e in ordered(new_events)}
    added = [e for eid, e in now.items() if was.get(eid) != e]
    deleted = ordered(e for eid, e in was.items() if eid not in now)
    return (*old[:start], *out, *old[i:]), added, deleted


def _trim(state: DeviceState, floor: int, config: TimingConfig) -> DeviceState:
    """Keep the history's fixes inside the window, at most ``max_history``; what is cut becomes
    checkpoints (thinned), and checkpoints older than the newest one before the window go."""
    history = state.history
    if history and history[0].fix.ts_us >= floor and len(history) <= config.max_history:
        cut = 0  # nothing to cut (the common case): no pass over the history
    else:
        cut = bisect.bisect_left(history, floor, key=_entry_time)  # no list of the times
        cut = max(cut, len(history) - config.max_history)
    if cut > 0:
        dropped = [e.as_base() for e in history[:cut]]
        points = [*state.checkpoints, state.base, *dropped]
        state = _evolve(state, base=points[-1], history=history[cut:], checkpoints=tuple(points[:-1]))
    return _prune(state, floor, config)


def _prune(state: DeviceState, floor: int, config: TimingConfig) -> DeviceState:
    """Checkpoints: the newest before the window (the replay origin), then at most
    ``max_checkpoints`` spaced across the window; anchors and rejected times no replay reaches."""
    points = [*state.checkpoints, state.base]
    origin = max((i for i, c in enumerate(points) if c.horizon_us is None or c.horizon_us < floor), default=0)
    kept_points = _thin(points[origin:-1], config)
    if not state.anchors and not state.rejected and len(kept_points) == len(state.checkpoints):
        return state  # the common state: nothing to prune
    checkpoints = tuple(kept_points)
    replayable = checkpoints[0].horizon_us if checkpoints else state.base.horizon_us
    if replayable is None:
        return _evolve(state, checkpoints=checkpoints)
    # an anchor no replay can reach any more (every segment still to compute starts after it)
    oldest = checkpoints[0] if checkpoints else state.base
    reach = oldest.last_kept.ts_us if oldest.last_kept is not None else replayable
    anchors = {gid: t for gid, t in state.anchors.items() if t > reach}
    rejected = tuple(t for t in state.rejected if t > replayable)
    return _evolve(state, checkpoints=checkpoints, anchors=anchors, rejected=rejected)


def _thin(points: list[Base], config: TimingConfig) -> list[Base]:
    """The first point and at most ``max_checkpoints`` - 1 more, spaced evenly in time."""
    if len(points) <= config.max_checkpoints:
        return points
    spacing = config.late_window_us / max(1, config.max_checkpoints - 1)
    out = [points[0]]
    for c in points[1:]:
        last = out[-1].horizon_us
        if last is None or c.horizon_us is None or c.horizon_us - last >= spacing:
            out.append(c)
    return out[: config.max_checkpoints]


# --------------------------------------------------------------------------- serialisation
# A device's state as plain JSON values (lists, numbers, strings), for a hot-state store or a
# panic dump. Geofence ids keep their type (JSON object keys would turn them into strings).


def _fix_json(fix: Fix | None) -> list[object] | None:
    return None if fix is None else [fix.ts_us, fix.lat, fix.lon, fix.valid, fix.speed]


def _fix_from(value: object) -> Fix | None:
    if value is None:
        return None
    ts, lat, lon, valid, speed = _items(value, 5)
    return Fix(_int(ts), _float(lat), _float(lon), bool(valid), None if speed is None else _float(speed))


def _event_json(ev: Event) -> list[object]:
    return [
        str(ev.id),
        ev.geofence,
        ev.event,
        ev.ts_ms,
        ev.latitude,
        ev.longitude,
        ev.speed,
        ev.direction,
        ev.uncertainty_s,
        ev.segment_start_us,
        ev.rank,
    ]


_EVENT_KINDS: dict[object, EventKind] = {"enter": "enter", "exit": "exit", "cross": "cross"}


def _kind(value: object) -> EventKind:
    kind = _EVENT_KINDS.get(value)
    if kind is None:
        raise ValueError(f"expected enter, exit or cross, got {value!r}")
    return kind


def _event_from(device_id: str, value: object) -> Event:
    eid, gid, kind, ts_ms, lat, lon, speed, direction, uncertainty, start, rank = _items(value, 11)
    return Event(
        uuid.UUID(str(eid)),
        device_id,
        _gid(gid),
        _kind(kind),
        _int(ts_ms),
        _float(lat),
        _float(lon),
        None if speed is None else _float(speed),
        None if direction is None else _int(direction),
        _float(uncertainty),
        _int(start),
        _int(rank),
    )


def fold(state: DeviceState, config: TimingConfig = TimingConfig()) -> DeviceState:
    """The state with its history folded into checkpoints: what a store keeps (a few hundred
    bytes, whatever the history). A late fix older than the newest then needs the positions
    after the checkpoint before it (:class:`NeedsHistory`), and replays the same."""
    history = state.history
    if not history:
        return state
    # a few of the history's entries, spaced from the newest back (found by bisection: a history
    # can be long, and this runs for every device of every batch)
    spacing = config.late_window_us / max(1, config.max_checkpoints - 1)
    picked: list[Entry] = []
    hi = len(history) - 1
    until = history[-1].fix.ts_us - spacing
    while hi > 0 and len(picked) < config.max_checkpoints:
        i = bisect.bisect_right(history, until, 0, hi, key=_entry_time) - 1
        if i < 0:
            break
        picked.append(history[i])
        hi, until = i, history[i].fix.ts_us - spacing
    picked.reverse()
    last = history[-1]
    points = [*state.checkpoints, state.base, *(e.as_base() for e in picked)]
    return DeviceState(
        state.device_id,
        # not last.as_base(): every entry is the last once, and a Base with its text on each
        # of them would cost ~3 KB a device; only the picked ones (checkpoints) keep theirs
        Base(last.inside, last.last_kept, last.fix.ts_us),
        (),
        state.newest_us,
        state.generation,
        state.versions,
        state.anchors,
        tuple(_thin(points, config)),
        state.rejected,
    )


def _base_json(base: Base) -> list[object]:
    return [sorted(base.inside, key=repr), _fix_json(base.last_kept), base.horizon_us]


def _base_from(value: object) -> Base:
    inside, last_kept, horizon = _items(value, 3)
    return Base(frozenset(_gid(g) for g in _items(inside)), _fix_from(last_kept), _opt_int(horizon))


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _base_text(base: Base) -> str:
    text = base.text
    if text is None:
        text = _dumps(_base_json(base))
        object.__setattr__(base, "text", text)  # a cache on a frozen value: equality ignores it
    return text


def state_text(state: DeviceState) -> str:
    """``state_to_json(state, versions=False)`` as compact JSON text, for the store: the same
    document, built from each checkpoint's text written once (a device's checkpoints stay the
    same over many batches: this runs for every device of every batch)."""
    if state.history:
        return _dumps(state_to_json(state, versions=False))
    newest = "null" if state.newest_us is None else str(state.newest_us)
    generation = "null" if state.generation is None else _dumps(state.generation)
    anchors = _dumps([[gid, t] for gid, t in state.anchors.items()]) if state.anchors else "[]"
    rejected = _dumps(list(state.rejected)) if state.rejected else "[]"
    checkpoints = ",".join([_base_text(c) for c in state.checkpoints])
    return (
        f'{{"base":{_base_text(state.base)},"history":[],"newest_us":{newest},'
        f'"generation":{generation},"anchors":{anchors},"checkpoints":[{checkpoints}],'
        f'"rejected":{rejected}}}'
    )


def state_to_json(state: DeviceState, *, versions: bool = True) -> dict[str, object]:
    """The state as JSON values; :func:`state_from_json` reads it back equal. ``versions=False``
    (what a store keeps, next to the device's id) leaves out the geofence fingerprints (the
    reader has them by ``generation``) and the device id."""
    data: dict[str, object] = {
        "base": _base_json(state.base),
        "history": [
            [_fix_json(e.fix), e.kept, sorted(e.inside, key=repr), [_event_json(ev) for ev in e.events]]
            for e in state.history
        ],
        "newest_us": state.newest_us,
        "generation": state.generation,
        "anchors": [[gid, t] for gid, t in state.anchors.items()],
        "checkpoints": [_base_json(c) for c in state.checkpoints],
        "rejected": list(state.rejected),
    }
    if versions:
        data["versions"] = [[gid, fp] for gid, fp in state.versions.items()]
        data["device_id"] = state.device_id
    return data


def state_from_json(
    data: Mapping[str, object],
    versions: Mapping[GeofenceId, str] | None = None,
    device_id: str | None = None,
) -> DeviceState:
    """A state from :func:`state_to_json`; ``versions``: the fingerprints of its generation,
    when the data leaves them out (none known: every geofence counts as changed); ``device_id``
    when the data leaves it out."""
    device_id = str(data["device_id"]) if device_id is None else device_id
    base = _base_from(data["base"])
    history: list[Entry] = []
    previous = base.last_kept
    for item in _items(data["history"]):
        raw_fix, was_kept, members, events = _items(item, 4)
        entry_fix = _fix_from(raw_fix)
        if entry_fix is None:
            raise ValueError("a history entry without its fix")
        if was_kept:
            previous = entry_fix
        history.append(
            Entry(
                entry_fix,
                bool(was_kept),
                frozenset(_gid(g) for g in _items(members)),
                previous,
                tuple(_event_from(device_id, ev) for ev in _items(events)),
            )
        )
    generation = data.get("generation")
    if "versions" in data:
        versions = {_gid(g): str(fp) for g, fp in (_items(p, 2) for p in _items(data["versions"]))}
    return DeviceState(
        device_id,
        base,
        tuple(history),
        _opt_int(data.get("newest_us")),
        None if generation is None else str(generation),
        versions if versions is not None else {},
        {_gid(g): _int(t) for g, t in (_items(p, 2) for p in _items(data["anchors"]))},
        tuple(_base_from(c) for c in _items(data.get("checkpoints", []))),
        tuple(_int(t) for t in _items(data.get("rejected", []))),
    )


def _items(value: object, n: int | None = None) -> list[object]:
    if not isinstance(value, list | tuple) or (n is not None and len(value) != n):
        raise ValueError(f"expected a list of {n if n is not None else 'any number of'} items, got {value!r}")
    return list(value)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _opt_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _gid(value: object) -> GeofenceId:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a geofence id, got {value!r}")
    return value

"""Timing events from a device's track: enter/exit of zones and circles, gate crossings.

:func:`replay` is the definition: the events of a device's whole history, its fixes sorted by
fix time. :func:`advance` is the incremental step a running process takes with each batch of one
device's fixes, in any order; it returns what to write (``added``, upserted by id) and what to
remove (``deleted``), so that what has been written always equals :func:`replay` of the fixes
seen (see the package docstring for the design and its limits).
"""

from __future__ import annotations

import bisect
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
    grown: list[Interval] = core if area.margin_m == 0.0 else area.inside_grown(*xy0, *xy1)
    u, exited = 0.0, False
    hits: list[tuple[float, EventKind]] = []
    while True:
        if inside:
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


def _fix_time(fix: Fix) -> int:
    return fix.ts_us


# --------------------------------------------------------------------------- incremental state


@dataclass(frozen=True, slots=True)
class TimingConfig:
    #: ``TPX_MAX_SPEED_KMH``: a fix implying more from the previous kept fix is not on the track.
    max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH
    #: How late a fix may be (behind the device's newest) and still change the events.
    late_window_us: int = 600 * US_PER_S
    #: At most this many fixes per device are kept for replaying late ones (memory bound).
    max_history: int = 2_000


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


@dataclass(frozen=True, slots=True)
class Base:
    """The state just before the oldest entry of the history."""

    inside: Membership = NO_MEMBERSHIP
    last_kept: Fix | None = None
    #: Fixes at or before this time can no longer be replayed (trimmed, or before a resume).
    horizon_us: int | None = None


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
    changed = {gid for gid, fp in versions.items() if state.versions.get(gid) != fp}
    gone = {gid for gid in state.versions if gid not in versions} | changed
    anchors = {gid: t for gid, t in state.anchors.items() if gid not in gone}
    last = state.last_kept
    if last is None or not gone:
        return replace(state, generation=geofences.generation, versions=versions, anchors=anchors)
    anchors.update(dict.fromkeys(changed, last.ts_us))
    now = geofences.areas_at(last.lon, last.lat) & changed

    def adopt(inside: Membership, at_or_after_last: bool) -> Membership:
        kept_part = inside - gone
        return kept_part | now if at_or_after_last else kept_part

    history = tuple(replace(e, inside=adopt(e.inside, e.fix.ts_us >= last.ts_us)) for e in state.history)
    base = replace(state.base, inside=adopt(state.base.inside, state.base.last_kept == last))
    return replace(
        state, base=base, history=history, generation=geofences.generation, versions=versions, anchors=anchors
    )


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
    """One device's batch of fixes (any order) → its new state and the timing record changes."""
    state = reconcile(state, geofences)
    valid = sorted((f for f in fixes if f.valid), key=_fix_time)
    if not valid:
        return state, Changes()
    newest = max(valid[-1].ts_us, state.newest_us if state.newest_us is not None else valid[-1].ts_us)
    floor = newest - config.late_window_us
    horizon = state.base.horizon_us
    times = [e.fix.ts_us for e in state.history]
    accepted: list[Fix] = []
    too_late = duplicates = 0
    for fix in valid:
        t = fix.ts_us
        if t < floor or (horizon is not None and t <= horizon):
            too_late += 1
        elif (accepted and accepted[-1].ts_us == t) or _has(times, t):
            duplicates += 1
        else:
            accepted.append(fix)
    if not accepted:
        return state, Changes(too_late=too_late, duplicates=duplicates)
    start = bisect.bisect_left(times, accepted[0].ts_us)
    history, added, deleted = _replay_from(state, geofences, accepted, start, config)
    state = _trim(replace(state, history=history, newest_us=newest), floor, config.max_history)
    return state, Changes(tuple(added), tuple(deleted), too_late, duplicates)


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


def _trim(state: DeviceState, floor: int, max_history: int) -> DeviceState:
    """Drop history older than the window or beyond the bound; the last dropped becomes the base."""
    history = state.history
    cut = bisect.bisect_left([e.fix.ts_us for e in history], floor)
    cut = max(cut, len(history) - max_history)
    if cut <= 0:
        return state
    last = history[cut - 1]
    base = Base(last.inside, last.last_kept, last.fix.ts_us)
    # an anchor no replay can reach any more (every segment still to compute starts after it)
    reach = base.last_kept.ts_us if base.last_kept is not None else last.fix.ts_us
    anchors = {gid: t for gid, t in state.anchors.items() if t > reach}
    return replace(state, base=base, history=history[cut:], anchors=anchors)


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


def state_to_json(state: DeviceState) -> dict[str, object]:
    """The state as JSON values; :func:`state_from_json` reads it back equal."""
    return {
        "device_id": state.device_id,
        "base": [sorted(state.base.inside, key=repr), _fix_json(state.base.last_kept), state.base.horizon_us],
        "history": [
            [_fix_json(e.fix), e.kept, sorted(e.inside, key=repr), [_event_json(ev) for ev in e.events]]
            for e in state.history
        ],
        "newest_us": state.newest_us,
        "generation": state.generation,
        "versions": [[gid, fp] for gid, fp in state.versions.items()],
        "anchors": [[gid, t] for gid, t in state.anchors.items()],
    }


def state_from_json(data: Mapping[str, object]) -> DeviceState:
    device_id = str(data["device_id"])
    inside, last_kept, horizon = _items(data["base"], 3)
    base = Base(frozenset(_gid(g) for g in _items(inside)), _fix_from(last_kept), _opt_int(horizon))
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
    return DeviceState(
        device_id,
        base,
        tuple(history),
        _opt_int(data.get("newest_us")),
        None if generation is None else str(generation),
        {_gid(g): str(fp) for g, fp in (_items(p, 2) for p in _items(data["versions"]))},
        {_gid(g): _int(t) for g, t in (_items(p, 2) for p in _items(data["anchors"]))},
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

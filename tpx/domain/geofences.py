"""Geofences: rows as the CMS stores them, checked, projected once and indexed.

:func:`parse_geofence` turns one row (``id``, ``name``, ``kind``, ``geometry`` as GeoJSON text or
a dict in lon/lat order, ``radius_m``, ``exit_margin_m``, ``active``, ``date_updated``) into a
:class:`Geofence`, or into an :class:`Invalid` that says why: a bad row is a value to report,
never an exception. :class:`GeofenceSet` holds the active ones with an STRtree over their grown
bounding boxes in lon/lat, so a track segment only meets the few geofences near it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Literal, TypeAlias

import numpy as np
import shapely
import shapely.errors

from tpx.domain.shapes import Area, Disc, FloatArray, Frame, Line, Zone

GeofenceId: TypeAlias = int | str
Kind: TypeAlias = Literal["zone", "gate", "circle"]
KINDS: dict[str, Kind] = {"zone": "zone", "gate": "gate", "circle": "circle"}
#: The GeoJSON type each kind is stored as.
GEOMETRY_TYPES: dict[str, tuple[str, ...]] = {
    "zone": ("Polygon", "MultiPolygon"),
    "gate": ("LineString",),
    "circle": ("Point",),
}
#: A geofence wider than this in longitude would cross the antimeridian, which the flat
#: projection cannot represent.
MAX_LON_SPAN_DEG = 180.0
#: Metres per degree of longitude used to widen a bounding box never drop below this (a
#: geofence centred on a pole: its box then spans every longitude, which is still correct).
MIN_KX = 1e-9


@dataclass(frozen=True, slots=True)
class Invalid:
    """A geofence row that cannot be used, and why (for the log and ``tpx geofences``)."""

    id: object
    reason: str


class _RowError(ValueError):
    """Raised inside the parser only; :func:`parse_geofence` turns it into :class:`Invalid`."""


@dataclass(frozen=True, slots=True)
class Geofence:
    id: GeofenceId
    name: str
    kind: Kind
    #: The GeoJSON geometry, lon/lat order, as stored.
    geometry: Mapping[str, object]
    radius_m: float | None
    exit_margin_m: float
    active: bool
    date_updated: datetime | str | None
    #: The geometry projected into its own frame (metres).
    shape: Area | Line = field(compare=False, repr=False)
    #: Bounding box (min lon, min lat, max lon, max lat) of the area grown by the margin.
    bbox: tuple[float, float, float, float] = field(compare=False, repr=False)

    @property
    def fingerprint(self) -> str:
        """Changes when anything that decides membership or crossings changes (not the name)."""
        canonical = json.dumps(
            [self.kind, self.geometry, self.radius_m, self.exit_margin_m], sort_keys=True, default=str
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def is_area(self) -> bool:
        return self.kind != "gate"


def parse_geofence(row: Mapping[str, object]) -> Geofence | Invalid:
    """One row → a usable :class:`Geofence`, or :class:`Invalid` with a one-line reason."""
    gid = row.get("id")
    try:
        return _parse(row)
    except _RowError as exc:
        return Invalid(gid, str(exc))
    # what a hostile value can still raise past the checks: a coordinate too large for a float
    # (a JSON integer of 400 digits), nesting too deep, GEOS refusing the shape
    except (OverflowError, RecursionError, ValueError, TypeError, shapely.errors.GEOSException) as exc:
        return Invalid(gid, f"unusable geometry: {type(exc).__name__}: {exc}"[:200])


def _parse(row: Mapping[str, object]) -> Geofence:
    gid = row.get("id")
    if isinstance(gid, bool) or not isinstance(gid, int | str) or gid == "":
        raise _RowError(f"id must be an integer or a string, got {gid!r}")
    raw_kind = row.get("kind")
    kind = KINDS.get(raw_kind) if isinstance(raw_kind, str) else None
    if kind is None:
        raise _RowError(f"kind must be zone, gate or circle, got {raw_kind!r}")
    geometry = _geojson(row.get("geometry"))
    gtype = geometry.get("type")
    if gtype not in GEOMETRY_TYPES[kind]:
        expected = " or ".join(GEOMETRY_TYPES[kind])
        raise _RowError(f"a {kind} needs a {expected} geometry, got {gtype!r}")
    margin = _metres(row.get("exit_margin_m"), "exit_margin_m", default=0.0, positive=False)
    radius: float | None = None
    coords = geometry.get("coordinates")
    shape: Area | Line
    if kind == "zone":
        shape, lon_lat = _zone(str(gtype), coords, margin)
    elif kind == "gate":
        shape, lon_lat = _gate(coords)
    else:
        radius = _metres(row.get("radius_m"), "radius_m", default=None, positive=True)
        lon, lat = _position(coords)
        shape = Disc(Frame.at(lon, lat), radius, margin)
        lon_lat = np.array([[lon, lat]])
    grow = (radius or 0.0) + (margin if kind != "gate" else 0.0)
    name = row.get("name")
    active = row.get("active")
    updated = row.get("date_updated")
    return Geofence(
        id=gid,
        name="" if name is None else str(name),
        kind=kind,
        geometry=geometry,
        radius_m=radius,
        exit_margin_m=margin,
        active=True if active is None else bool(active),
        date_updated=updated if isinstance(updated, datetime | str) else None,
        shape=shape,
        bbox=_grown_bbox(lon_lat, shape.frame, grow),
    )


def _geojson(value: object) -> Mapping[str, object]:
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise _RowError(f"geometry is not JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise _RowError(f"geometry must be a GeoJSON object, got {type(value).__name__}")
    return value


def _metres(value: object, name: str, *, default: float | None, positive: bool) -> float:
    if value is None:
        if default is None:
            raise _RowError(f"{name} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _RowError(f"{name} must be a number of metres, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise _RowError(f"{name} must be {'positive' if positive else 'zero or more'}, got {value!r}")
    return float(value)


def _coordinate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _RowError(f"a coordinate must be a finite number, got {value!r}")
    return float(value)


#: GeoJSON (RFC 7946): a position is [lon, lat] (more values, e.g. altitude, are ignored), WGS84.
POSITION_VALUES = 2
MAX_LON = 180.0
MAX_LAT = 90.0
#: A linear ring is closed: at least 4 positions, the first repeated as the last (RFC 7946 3.1.6).
MIN_RING_POSITIONS = 4
#: A gate is a line: at least two distinct points.
MIN_GATE_POINTS = 2


def _position(value: object) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < POSITION_VALUES:
        raise _RowError(f"a position must be [lon, lat], got {value!r}")
    lon, lat = _coordinate(value[0]), _coordinate(value[1])
    if not -MAX_LON <= lon <= MAX_LON or not -MAX_LAT <= lat <= MAX_LAT:
        raise _RowError(f"position [{lon}, {lat}] is out of range (lon -180..180, lat -90..90)")
    return lon, lat


def _positions(value: object, what: str) -> FloatArray:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _RowError(f"{what} must be a list of positions")
    return np.array([_position(p) for p in value], dtype=float).reshape(-1, 2)


def _ring(value: object) -> FloatArray:
    ring = _positions(value, "a polygon ring")
    if len(ring) < MIN_RING_POSITIONS:
        raise _RowError(f"a polygon ring needs at least 4 positions, got {len(ring)}")
    if not np.array_equal(ring[0], ring[-1]):
        raise _RowError("a polygon ring must end where it starts")
    return ring


def _zone(gtype: str, coords: object, margin: float) -> tuple[Zone, FloatArray]:
    if not isinstance(coords, Sequence) or isinstance(coords, str) or not coords:
        raise _RowError(f"{gtype} coordinates must be a non-empty list")
    polygons = [coords] if gtype == "Polygon" else list(coords)
    parts: list[shapely.Geometry] = []
    for polygon in polygons:
        if not isinstance(polygon, Sequence) or isinstance(polygon, str) or not polygon:
            raise _RowError("a polygon must be a non-empty list of rings")
        rings = [_ring(r) for r in polygon]
        parts.append(shapely.Polygon(rings[0], rings[1:]))
    lon_lat_geom = parts[0] if gtype == "Polygon" else shapely.MultiPolygon(parts)
    if not shapely.is_valid(lon_lat_geom):
        raise _RowError(f"invalid polygon: {shapely.is_valid_reason(lon_lat_geom)}")
    lon_lat = np.asarray(shapely.get_coordinates(lon_lat_geom))
    _check_span(lon_lat)
    centroid = shapely.centroid(lon_lat_geom)
    frame = Frame.at(float(shapely.get_x(centroid)), float(shapely.get_y(centroid)))
    local = shapely.transform(lon_lat_geom, lambda c: _project(frame, c))
    return Zone(frame, local, margin), lon_lat


def _gate(coords: object) -> tuple[Line, FloatArray]:
    points = _positions(coords, "LineString coordinates")
    if len(np.unique(points, axis=0)) < MIN_GATE_POINTS:
        raise _RowError(f"a gate needs two distinct points, got {len(points)} position(s)")
    if np.array_equal(points[0], points[-1]):
        raise _RowError("a gate's first and last points coincide: its direction is undefined")
    _check_span(points)
    frame = Frame.at(float(points[:, 0].mean()), float(points[:, 1].mean()))
    return Line(frame, _project(frame, points)), points


def _check_span(lon_lat: FloatArray) -> None:
    if float(np.ptp(lon_lat[:, 0])) > MAX_LON_SPAN_DEG:
        raise _RowError("spans more than 180° of longitude (the antimeridian is not supported)")


def _project(frame: Frame, lon_lat: FloatArray) -> FloatArray:
    return np.column_stack(((lon_lat[:, 0] - frame.lon0) * frame.kx, (lon_lat[:, 1] - frame.lat0) * frame.ky))


def _grown_bbox(lon_lat: FloatArray, frame: Frame, grow_m: float) -> tuple[float, float, float, float]:
    # distances are measured in the geofence's own frame, so a margin of m metres is m / kx
    # degrees of longitude and m / ky of latitude wherever the point is
    dlon, dlat = grow_m / max(frame.kx, MIN_KX), grow_m / frame.ky
    return (
        float(lon_lat[:, 0].min()) - dlon,
        float(lon_lat[:, 1].min()) - dlat,
        float(lon_lat[:, 0].max()) + dlon,
        float(lon_lat[:, 1].max()) + dlat,
    )


#: The grid's cells are this many times the median grown box (width and height apart).
CELL_BOXES = 2.0
#: A box covering more cells than this is not put in the grid but checked on every lookup.
MAX_BOX_CELLS = 64
#: A lookup box covering more cells than this asks the STRtree instead.
MAX_QUERY_CELLS = 16
#: Cell indices beyond this (a box far from every geofence, or not finite) ask the STRtree.
MAX_CELL_INDEX = 2.0**40
#: The cell size when no box has an extent (degrees).
DEFAULT_CELL_DEG = 0.01

Box: TypeAlias = tuple[float, float, float, float]


class _Grid:
    """A uniform grid over the grown boxes, in plain dicts: the geofences whose box may meet a
    small box in a few dict lookups (an STRtree query costs ~10 µs of call overhead, mostly
    building the query geometry). Boxes that would cover too many cells are kept apart and
    checked on every lookup; a lookup too big for the grid returns None (ask the tree)."""

    __slots__ = ("_cells", "_scale", "_wide")

    def __init__(self, boxes: Sequence[Box]) -> None:
        widths = sorted(b[2] - b[0] for b in boxes)
        heights = sorted(b[3] - b[1] for b in boxes)
        cell_x = widths[len(widths) // 2] * CELL_BOXES if widths else 0.0
        cell_y = heights[len(heights) // 2] * CELL_BOXES if heights else 0.0
        cell_x = cell_x if cell_x > 0.0 else cell_y if cell_y > 0.0 else DEFAULT_CELL_DEG
        cell_y = cell_y if cell_y > 0.0 else cell_x
        self._scale = (1.0 / cell_x, 1.0 / cell_y)
        self._cells: dict[tuple[int, int], list[int]] = {}
        self._wide: list[int] = []
        for i, box in enumerate(boxes):
            span = self._span(*box)
            if span is None or (span[2] - span[0] + 1) * (span[3] - span[1] + 1) > MAX_BOX_CELLS:
                self._wide.append(i)
                continue
            for cx in range(span[0], span[2] + 1):
                for cy in range(span[1], span[3] + 1):
                    self._cells.setdefault((cx, cy), []).append(i)

    def _span(self, lo_x: float, lo_y: float, hi_x: float, hi_y: float) -> tuple[int, int, int, int] | None:
        """The cells (x0, y0, x1, y1) a box covers; None when they are out of the grid's range
        (or not finite). Cells come from a monotone map of each coordinate, so two boxes that
        meet share a cell."""
        sx, sy = self._scale
        fx0, fy0, fx1, fy1 = lo_x * sx, lo_y * sy, hi_x * sx, hi_y * sy
        if not (abs(fx0) < MAX_CELL_INDEX > abs(fx1) and abs(fy0) < MAX_CELL_INDEX > abs(fy1)):
            return None
        return math.floor(fx0), math.floor(fy0), math.floor(fx1), math.floor(fy1)

    def candidates(self, lo_x: float, lo_y: float, hi_x: float, hi_y: float) -> list[int] | None:
        """Indices of the boxes that may meet the box (a superset), or None: ask the tree."""
        span = self._span(lo_x, lo_y, hi_x, hi_y)
        if span is None:
            return None
        x0, y0, x1, y1 = span
        if x0 == x1 and y0 == y1:
            found = self._cells.get((x0, y0), [])
            return [*self._wide, *found] if self._wide else found
        if (x1 - x0 + 1) * (y1 - y0 + 1) > MAX_QUERY_CELLS:
            return None
        cells = self._cells
        union = set(self._wide)
        for cx in range(x0, x1 + 1):
            for cy in range(y0, y1 + 1):
                union.update(cells.get((cx, cy), ()))
        return list(union)


class GeofenceSet:
    """The active geofences, indexed; ``generation`` changes when any of them changes."""

    __slots__ = ("_boxes", "_grid", "_list", "by_id", "fingerprints", "generation", "invalid", "tree")

    def __init__(self, geofences: Iterable[Geofence], invalid: Sequence[Invalid] = ()) -> None:
        active = [g for g in geofences if g.active]
        self.by_id: dict[GeofenceId, Geofence] = {g.id: g for g in active}
        self._list: list[Geofence] = list(self.by_id.values())
        self._boxes: list[Box] = [g.bbox for g in self._list]
        self.invalid: tuple[Invalid, ...] = tuple(invalid)
        self.tree = shapely.STRtree(shapely.box(*np.array(self._boxes).reshape(-1, 4).T))
        self._grid = _Grid(self._boxes)
        #: Each geofence's fingerprint; one mapping that every device reconciled with it shares.
        self.fingerprints: Mapping[GeofenceId, str] = MappingProxyType(
            {g.id: g.fingerprint for g in self._list}
        )
        digest = hashlib.sha256()
        for gid in sorted(self.by_id, key=repr):
            digest.update(f"{gid!r}={self.fingerprints[gid]};".encode())
        self.generation = digest.hexdigest()[:20]

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, object]]) -> GeofenceSet:
        parsed = [parse_geofence(r) for r in rows]
        return cls(
            (p for p in parsed if isinstance(p, Geofence)),
            [p for p in parsed if isinstance(p, Invalid)],
        )

    def __len__(self) -> int:
        return len(self._list)

    def near(self, lon0: float, lat0: float, lon1: float, lat1: float) -> list[Geofence]:
        """The geofences whose grown bounding box meets the segment's bounding box (in the set's
        order)."""
        lo_x, hi_x = (lon0, lon1) if lon0 <= lon1 else (lon1, lon0)
        lo_y, hi_y = (lat0, lat1) if lat0 <= lat1 else (lat1, lat0)
        candidates = self._grid.candidates(lo_x, lo_y, hi_x, hi_y)
        if candidates is None:
            hits = sorted(self.tree.query(shapely.box(lo_x, lo_y, hi_x, hi_y)).tolist())
            return [self._list[i] for i in hits]
        if not candidates:
            return []
        boxes = self._boxes
        hits = [
            i
            for i in candidates
            if boxes[i][0] <= hi_x and lo_x <= boxes[i][2] and boxes[i][1] <= hi_y and lo_y <= boxes[i][3]
        ]
        if len(hits) > 1:
            hits.sort()
        return [self._list[i] for i in hits]

    def areas_at(self, lon: float, lat: float) -> frozenset[GeofenceId]:
        """The zones and circles that contain the point (boundary included)."""
        inside: set[GeofenceId] = set()
        for g in self.near(lon, lat, lon, lat):
            shape = g.shape
            if isinstance(shape, Area) and shape.contains(*shape.frame.xy(lon, lat)):
                inside.add(g.id)
        return frozenset(inside)

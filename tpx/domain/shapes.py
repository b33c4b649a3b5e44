"""Geofence shapes in local metres, and where a straight segment meets them.

Each geofence is projected once into its own equirectangular frame (metres east and north of
its reference point, see :class:`Frame`). That projection is an affine map of (lon, lat), so a
segment straight in lon/lat is straight in the frame and the fraction ``u`` along it is the same
in both: every answer here is a fraction of the segment, in ``[0, 1]``.

An area (zone or circle) answers two questions about a segment: the closed sub-intervals of
``[0, 1]`` where the segment lies in the area (boundary included), and the same for the area
grown by ``exit_margin_m``. Grown zones are computed exactly, not with a buffered polygon: a
point is in the grown zone when its distance to the zone is at most the margin, and the
boundary of that set lies on the edges shifted by the margin and the circles of that radius
around the vertices, so those lines give every place where the answer can change.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import shapely

#: Mean Earth radius (IUGG), metres: the radius the issue fixes for every distance.
EARTH_RADIUS_M = 6_371_008.8
#: Metres per degree of latitude on that sphere.
M_PER_DEG = EARTH_RADIUS_M * math.pi / 180.0
#: Distances within this many metres of a margin count as on it (float noise of the distance).
DISTANCE_TOLERANCE_M = 1e-9

#: Bounding boxes of edges are widened by this many metres before the cheap "can the segment
#: meet this edge at all" test: far more than float noise on coordinates of up to thousands of
#: km, and than DISTANCE_TOLERANCE_M, so an edge skipped is one the segment cannot come near
#: (where membership cannot change).
BOX_SLACK_M = 1e-6
#: Edges are tested in runs of this many consecutive ones, each run with its bounding box.
EDGE_RUN = 8

Interval: TypeAlias = tuple[float, float]
FloatArray: TypeAlias = npt.NDArray[np.float64]
#: An edge or a segment in a frame: (ax, ay, bx, by), metres.
Edge: TypeAlias = tuple[float, float, float, float]
Point: TypeAlias = tuple[float, float]
#: Which of the points (xs, ys) are in a set.
Membership: TypeAlias = Callable[[list[float], list[float]], list[bool]]


@dataclass(frozen=True, slots=True)
class Frame:
    """An equirectangular projection at a reference point: x metres east, y metres north."""

    lon0: float
    lat0: float
    kx: float  # metres per degree of longitude at lat0
    ky: float = M_PER_DEG

    @classmethod
    def at(cls, lon0: float, lat0: float) -> Frame:
        return cls(lon0, lat0, M_PER_DEG * math.cos(math.radians(lat0)))

    def xy(self, lon: float, lat: float) -> tuple[float, float]:
        return (lon - self.lon0) * self.kx, (lat - self.lat0) * self.ky


def _cross_hits(x0: float, y0: float, x1: float, y1: float, edges: Iterable[Edge]) -> list[float]:
    """Fractions u of the segment (x0, y0) → (x1, y1) where it meets the edges (ax, ay, bx, by).

    A collinear overlap contributes both of its ends. Plain float arithmetic, in the order numpy
    used to do it on arrays (the same values, bit for bit): a few edges per segment are far
    cheaper this way than numpy's ~1 µs per call on tiny arrays.
    """
    dx, dy = x1 - x0, y1 - y0
    norm = dx * dx + dy * dy
    hits: list[float] = []
    for ax, ay, bx, by in edges:
        ex, ey = bx - ax, by - ay
        qx, qy = ax - x0, ay - y0
        denom = dx * ey - dy * ex
        num_s = qx * dy - qy * dx
        if denom != 0.0:
            u = (qx * ey - qy * ex) / denom
            s = num_s / denom
            if 0.0 <= u <= 1.0 and 0.0 <= s <= 1.0:
                hits.append(u)
        elif num_s == 0.0 and norm > 0.0:  # collinear
            ua = (qx * dx + qy * dy) / norm
            ub = ((bx - x0) * dx + (by - y0) * dy) / norm
            lo, hi = (ua, ub) if ua <= ub else (ub, ua)
            if hi >= 0.0 and lo <= 1.0:
                hits.append(min(max(lo, 0.0), 1.0))
                hits.append(min(max(hi, 0.0), 1.0))
    return hits


def _circle_hits(
    x0: float, y0: float, x1: float, y1: float, centres: Iterable[Point], r: float
) -> list[float]:
    """Fractions u in [0, 1] where the segment meets the circles of radius r around the centres."""
    dx, dy = x1 - x0, y1 - y0
    a = dx * dx + dy * dy
    hits: list[float] = []
    if a == 0.0:
        return hits
    rr = r**2
    for vx, vy in centres:
        # the segment against the circle: a·u² + b·u + c = 0
        px, py = x0 - vx, y0 - vy
        b = 2.0 * (px * dx + py * dy)
        c = px * px + py * py - rr
        disc = b * b - 4.0 * a * c
        if disc >= 0.0:
            root = math.sqrt(disc)
            for u in ((-b - root) / (2.0 * a), (-b + root) / (2.0 * a)):
                if 0.0 <= u <= 1.0:
                    hits.append(u)
    return hits


def _point_segment_distance(px: float, py: float, ax: float, ay: float, bx: float, by: float) -> float:
    """The distance from a point to a segment, computed as GEOS computes it (Distance::pointToSegment),
    so that it agrees with ``shapely.distance`` to the last bits."""
    if ax == bx and ay == by:
        return math.sqrt((px - ax) * (px - ax) + (py - ay) * (py - ay))
    ex, ey = bx - ax, by - ay
    len2 = ex * ex + ey * ey
    r = ((px - ax) * ex + (py - ay) * ey) / len2
    if r <= 0.0:
        return math.sqrt((px - ax) * (px - ax) + (py - ay) * (py - ay))
    if r >= 1.0:
        return math.sqrt((px - bx) * (px - bx) + (py - by) * (py - by))
    s = ((ay - py) * ex - (ax - px) * ey) / len2
    return abs(s) * math.sqrt(len2)


class _Edges:
    """A shape's edges as plain floats, for asking which of them a small box can meet.

    The edges are kept in runs of :data:`EDGE_RUN` consecutive ones (a ring's consecutive edges
    lie together), each edge and each run with its bounding box widened by ``reach`` (how far
    from the edge an answer about it can lie: the margin for the grown zone) and by
    :data:`BOX_SLACK_M`, so a short segment skips most runs with four comparisons.
    """

    __slots__ = ("_runs", "box")

    def __init__(self, edges: FloatArray, reach: float) -> None:
        grow = reach + BOX_SLACK_M
        boxed: list[tuple[float, float, float, float, Edge]] = []
        for ax, ay, bx, by in edges.tolist():
            boxed.append(
                (
                    min(ax, bx) - grow,
                    min(ay, by) - grow,
                    max(ax, bx) + grow,
                    max(ay, by) + grow,
                    (ax, ay, bx, by),
                )
            )
        self._runs: list[
            tuple[float, float, float, float, list[tuple[float, float, float, float, Edge]]]
        ] = []
        for i in range(0, len(boxed), EDGE_RUN):
            run = boxed[i : i + EDGE_RUN]
            self._runs.append(
                (
                    min(b[0] for b in run),
                    min(b[1] for b in run),
                    max(b[2] for b in run),
                    max(b[3] for b in run),
                    run,
                )
            )
        #: The widened bounding box of all the edges (min x, min y, max x, max y).
        self.box = (
            min((r[0] for r in self._runs), default=math.inf),
            min((r[1] for r in self._runs), default=math.inf),
            max((r[2] for r in self._runs), default=-math.inf),
            max((r[3] for r in self._runs), default=-math.inf),
        )

    def meeting(self, lo_x: float, lo_y: float, hi_x: float, hi_y: float) -> list[Edge]:
        """The edges whose widened box meets the box (lo_x, lo_y) - (hi_x, hi_y)."""
        found: list[Edge] = []
        for rx0, ry0, rx1, ry1, run in self._runs:
            if rx0 <= hi_x and lo_x <= rx1 and ry0 <= hi_y and lo_y <= ry1:
                found.extend(
                    e
                    for ex0, ey0, ex1, ey1, e in run
                    if ex0 <= hi_x and lo_x <= ex1 and ey0 <= hi_y and lo_y <= ey1
                )
        return found

    def meets(self, lo_x: float, lo_y: float, hi_x: float, hi_y: float) -> bool:
        box = self.box
        return box[0] <= hi_x and lo_x <= box[2] and box[1] <= hi_y and lo_y <= box[3]


def _runs(breaks: Sequence[float], at_break: Sequence[bool], between: Sequence[bool]) -> list[Interval]:
    """Closed intervals from sorted breakpoints, whether each breakpoint is in the set and whether
    the open stretch after each one (up to the next) is."""
    runs: list[Interval] = []
    start: float | None = None
    last = len(breaks) - 1
    for i, b in enumerate(breaks):
        inside_here = at_break[i] or (i > 0 and between[i - 1]) or (i < last and between[i])
        if inside_here and start is None:
            start = b
        if start is not None and not (i < last and between[i]):
            runs.append((start, b))
            start = None
    return runs


def _segment_sets(
    x0: float, y0: float, x1: float, y1: float, cuts: Iterable[float], member: Membership
) -> list[Interval]:
    breaks = sorted({0.0, 1.0, *cuts})
    us = breaks + [(a + b) / 2.0 for a, b in itertools.pairwise(breaks)]
    dx, dy = x1 - x0, y1 - y0
    xs, ys = [x0 + u * dx for u in us], [y0 + u * dy for u in us]
    # the end fix where it is, not x0 + 1·(x1 - x0), which may round elsewhere: a fix on a
    # boundary is inside whichever segment it ends or starts
    last = len(breaks) - 1
    xs[last], ys[last] = x1, y1
    inside = member(xs, ys)
    n = len(breaks)
    return _runs(breaks, inside[:n], inside[n:])


def _box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
    return (x0, y0, x1, y1) if x0 <= x1 and y0 <= y1 else (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


class Area:
    """A zone or a circle in its frame."""

    frame: Frame
    margin_m: float

    def contains(self, x: float, y: float) -> bool:
        """The point is in the area (its boundary included)."""
        raise NotImplementedError

    def inside(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        """Where the segment lies in the area: sorted, disjoint closed intervals of u."""
        raise NotImplementedError

    def inside_grown(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        """Where the segment lies in the area grown by the margin."""
        raise NotImplementedError


class Disc(Area):
    """A circle: centre at the frame's origin, radius in metres."""

    __slots__ = ("frame", "margin_m", "radius_m")

    def __init__(self, frame: Frame, radius_m: float, margin_m: float) -> None:
        self.frame = frame
        self.radius_m = radius_m
        self.margin_m = margin_m

    def contains(self, x: float, y: float) -> bool:
        return x * x + y * y <= self.radius_m * self.radius_m

    @staticmethod
    def _within(x0: float, y0: float, x1: float, y1: float, r: float) -> list[Interval]:
        dx, dy = x1 - x0, y1 - y0
        a = dx * dx + dy * dy
        c = x0 * x0 + y0 * y0 - r * r
        if a == 0.0:
            return [(0.0, 1.0)] if c <= 0.0 else []
        b = 2.0 * (x0 * dx + y0 * dy)
        disc = b * b - 4.0 * a * c
        if disc < 0.0:
            return []
        root = math.sqrt(disc)
        lo = max((-b - root) / (2.0 * a), 0.0)
        hi = min((-b + root) / (2.0 * a), 1.0)
        # the fixes themselves are decided exactly, not by the rounded roots
        if x0 * x0 + y0 * y0 <= r * r:
            lo = 0.0
        if x1 * x1 + y1 * y1 <= r * r:
            hi = 1.0
        return [(lo, hi)] if lo <= hi else []

    def inside(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        return self._within(x0, y0, x1, y1, self.radius_m)

    def inside_grown(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        return self._within(x0, y0, x1, y1, self.radius_m + self.margin_m)


class Zone(Area):
    """A Polygon or MultiPolygon in its frame (metres), prepared for point tests.

    Membership of points is GEOS's (robust: a point on an edge is inside); where a segment can
    change membership, and the distance to the zone for the grown area, are plain float
    arithmetic over the few edges near the segment (:class:`_Edges`).
    """

    __slots__ = ("_core", "_grown", "_polygon", "_shifted", "edges", "frame", "margin_m")

    def __init__(self, frame: Frame, polygon: shapely.Geometry, margin_m: float) -> None:
        self.frame = frame
        self.margin_m = margin_m
        shapely.prepare(polygon)
        self._polygon = polygon
        rings = [np.asarray(shapely.get_coordinates(r)) for r in _rings(polygon)]
        self.edges: FloatArray = np.concatenate([np.hstack((r[:-1], r[1:])) for r in rings])
        self._core = _Edges(self.edges, 0.0)
        # the edges again, widened by the margin: near them lie the grown zone's boundary (each
        # edge shifted by ±margin along its normal, each vertex's circle) and the points within
        # the margin of the zone
        self._grown = _Edges(self.edges, margin_m + DISTANCE_TOLERANCE_M)
        ax, ay, bx, by = self.edges.T
        length = np.hypot(bx - ax, by - ay)
        nx, ny = -(by - ay) / length * margin_m, (bx - ax) / length * margin_m
        self._shifted: dict[Edge, tuple[Edge, Edge]] = {
            edge: (plus, minus)
            for edge, plus, minus in zip(
                map(tuple, self.edges.tolist()),
                map(tuple, np.column_stack((ax + nx, ay + ny, bx + nx, by + ny)).tolist()),
                map(tuple, np.column_stack((ax - nx, ay - ny, bx - nx, by - ny)).tolist()),
                strict=True,
            )
        }

    def contains(self, x: float, y: float) -> bool:
        # outside the box of its edges, a point is outside (as GEOS decides first, too)
        return self._core.meets(x, y, x, y) and bool(shapely.intersects_xy(self._polygon, x, y))

    def _all_or_nothing(self, x0: float, y0: float) -> list[Interval]:
        """A segment that comes near no edge (farther than the boxes' widening from every one)
        does not meet the boundary: it is all in, or all out, as its start is."""
        return [(0.0, 1.0)] if self.contains(x0, y0) else []

    def _in(self, xs: list[float], ys: list[float]) -> list[bool]:
        inside: list[bool] = shapely.intersects_xy(self._polygon, xs, ys).tolist()
        return inside

    def _near(self, xs: list[float], ys: list[float]) -> list[bool]:
        """Whether each point is within the margin of the zone (its distance, as GEOS computes it,
        at most the margin plus :data:`DISTANCE_TOLERANCE_M`)."""
        limit = self.margin_m + DISTANCE_TOLERANCE_M
        near = self._in(xs, ys)
        for i, (px, py) in enumerate(zip(xs, ys, strict=True)):
            if not near[i]:
                near[i] = any(
                    _point_segment_distance(px, py, *edge) <= limit
                    for edge in self._grown.meeting(px, py, px, py)
                )
        return near

    def inside(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        box = _box(x0, y0, x1, y1)
        if not self._core.meets(*box):
            return []  # every point of the segment is outside the zone's box
        edges = self._core.meeting(*box)
        if not edges:
            return self._all_or_nothing(x0, y0)
        return _segment_sets(x0, y0, x1, y1, _cross_hits(x0, y0, x1, y1, edges), self._in)

    def inside_grown(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        if self.margin_m == 0.0:
            return self.inside(x0, y0, x1, y1)
        box = _box(x0, y0, x1, y1)
        if not self._grown.meets(*box):
            return []  # every point of the segment is farther than the margin from the zone
        edges = self._grown.meeting(*box)
        if not edges:
            return self._all_or_nothing(x0, y0)
        shifted = [e for edge in edges for e in self._shifted[edge]]
        cuts = _cross_hits(x0, y0, x1, y1, shifted)
        cuts += _circle_hits(x0, y0, x1, y1, ((e[0], e[1]) for e in edges), self.margin_m)
        return _segment_sets(x0, y0, x1, y1, cuts, self._near)


def _rings(polygon: shapely.Geometry) -> list[shapely.Geometry]:
    parts = shapely.get_parts(polygon)
    rings: list[shapely.Geometry] = []
    for part in parts:
        rings.append(shapely.get_exterior_ring(part))
        rings.extend(shapely.get_interior_ring(part, i) for i in range(shapely.get_num_interior_rings(part)))
    return rings


class Line:
    """A gate: a LineString in its frame, with the direction of its first→last chord."""

    __slots__ = ("_edges", "chord", "edges", "frame")

    def __init__(self, frame: Frame, points: FloatArray) -> None:
        self.frame = frame
        self.edges: FloatArray = np.hstack((points[:-1], points[1:]))
        self._edges = _Edges(self.edges, 0.0)
        self.chord = (float(points[-1, 0] - points[0, 0]), float(points[-1, 1] - points[0, 1]))

    def crossings(self, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, int]]:
        """Where the segment meets the gate, u in (0, 1] (u = 0 was the previous segment's 1),
        each with its direction: 1 from the chord's left to its right, -1 the other way."""
        box = _box(x0, y0, x1, y1)
        if not self._edges.meets(*box):
            return []
        us = sorted({u for u in _cross_hits(x0, y0, x1, y1, self._edges.meeting(*box)) if u > 0.0})
        if not us:
            return []
        side = self.chord[0] * (y1 - y0) - self.chord[1] * (x1 - x0)
        direction = -1 if side > 0.0 else 1
        return [(u, direction) for u in us]

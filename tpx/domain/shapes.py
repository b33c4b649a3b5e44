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

import math
from collections.abc import Callable, Sequence
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

Interval: TypeAlias = tuple[float, float]
FloatArray: TypeAlias = npt.NDArray[np.float64]
#: Which of the points (xs, ys) are in a set.
Membership: TypeAlias = Callable[[FloatArray, FloatArray], npt.NDArray[np.bool_]]


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


def _cross_hits(
    x0: float, y0: float, dx: float, dy: float, edges: FloatArray, closed_start: bool
) -> FloatArray:
    """Fractions u of the segment (x0, y0) + u·(dx, dy) where it meets the edges (Nx4: ax ay bx by).

    A collinear overlap contributes both of its ends. ``closed_start`` keeps u = 0.
    """
    ax, ay, bx, by = edges[:, 0], edges[:, 1], edges[:, 2], edges[:, 3]
    ex, ey = bx - ax, by - ay
    qx, qy = ax - x0, ay - y0
    denom = dx * ey - dy * ex
    num_u = qx * ey - qy * ex
    num_s = qx * dy - qy * dx
    hits: list[FloatArray] = []
    crossing = denom != 0.0
    if crossing.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            u = num_u[crossing] / denom[crossing]
            s = num_s[crossing] / denom[crossing]
        hits.append(u[(u >= 0.0) & (u <= 1.0) & (s >= 0.0) & (s <= 1.0)])
    collinear = ~crossing & (num_s == 0.0)
    norm = dx * dx + dy * dy
    if collinear.any() and norm > 0.0:
        ua = (qx[collinear] * dx + qy[collinear] * dy) / norm
        ub = ((bx[collinear] - x0) * dx + (by[collinear] - y0) * dy) / norm
        lo, hi = np.minimum(ua, ub), np.maximum(ua, ub)
        keep = (hi >= 0.0) & (lo <= 1.0)
        hits.append(np.clip(lo[keep], 0.0, 1.0))
        hits.append(np.clip(hi[keep], 0.0, 1.0))
    if not hits:
        return np.empty(0)
    found = np.concatenate(hits)
    return found if closed_start else found[found > 0.0]


def _runs(breaks: FloatArray, at_break: Sequence[bool], between: Sequence[bool]) -> list[Interval]:
    """Closed intervals from sorted breakpoints, whether each breakpoint is in the set and whether
    the open stretch after each one (up to the next) is."""
    runs: list[Interval] = []
    start: float | None = None
    last = len(breaks) - 1
    for i, b in enumerate(breaks):
        inside_here = at_break[i] or (i > 0 and between[i - 1]) or (i < last and between[i])
        if inside_here and start is None:
            start = float(b)
        if start is not None and not (i < last and between[i]):
            runs.append((start, float(b)))
            start = None
    return runs


def _segment_sets(
    x0: float, y0: float, x1: float, y1: float, cuts: FloatArray, member: Membership
) -> list[Interval]:
    breaks = np.unique(np.concatenate(([0.0, 1.0], cuts)))
    mids = (breaks[:-1] + breaks[1:]) / 2.0
    us = np.concatenate((breaks, mids))
    xs, ys = x0 + us * (x1 - x0), y0 + us * (y1 - y0)
    # the end fix where it is, not x0 + 1·(x1 - x0), which may round elsewhere: a fix on a
    # boundary is inside whichever segment it ends or starts
    last = len(breaks) - 1
    xs[last], ys[last] = x1, y1
    inside = member(xs, ys)
    n = len(breaks)
    return _runs(breaks, inside[:n].tolist(), inside[n:].tolist())


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


def _in_polygon(polygon: shapely.Geometry) -> Membership:
    def member(xs: FloatArray, ys: FloatArray) -> npt.NDArray[np.bool_]:
        return np.asarray(shapely.intersects_xy(polygon, xs, ys), dtype=bool)

    return member


def _near_polygon(polygon: shapely.Geometry, margin_m: float) -> Membership:
    limit = margin_m + DISTANCE_TOLERANCE_M

    def member(xs: FloatArray, ys: FloatArray) -> npt.NDArray[np.bool_]:
        return np.asarray(shapely.distance(polygon, shapely.points(xs, ys)) <= limit, dtype=bool)

    return member


class Zone(Area):
    """A Polygon or MultiPolygon in its frame (metres), prepared for point tests."""

    __slots__ = ("_grown_edges", "_in", "_near", "_vertices", "edges", "frame", "margin_m")

    def __init__(self, frame: Frame, polygon: shapely.Geometry, margin_m: float) -> None:
        self.frame = frame
        self.margin_m = margin_m
        shapely.prepare(polygon)
        rings = [np.asarray(shapely.get_coordinates(r)) for r in _rings(polygon)]
        self.edges: FloatArray = np.concatenate([np.hstack((r[:-1], r[1:])) for r in rings])
        self._in = _in_polygon(polygon)
        self._near = _near_polygon(polygon, margin_m)
        # every edge shifted by ±margin along its normal, and every vertex: where the grown
        # zone's boundary can be
        ax, ay, bx, by = self.edges.T
        length = np.hypot(bx - ax, by - ay)
        nx, ny = -(by - ay) / length * margin_m, (bx - ax) / length * margin_m
        self._grown_edges: FloatArray = np.vstack(
            (
                np.column_stack((ax + nx, ay + ny, bx + nx, by + ny)),
                np.column_stack((ax - nx, ay - ny, bx - nx, by - ny)),
            )
        )
        self._vertices: FloatArray = self.edges[:, :2]

    def contains(self, x: float, y: float) -> bool:
        return bool(self._in(np.array([x]), np.array([y]))[0])

    def inside(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        dx, dy = x1 - x0, y1 - y0
        return _segment_sets(x0, y0, x1, y1, _cross_hits(x0, y0, dx, dy, self.edges, True), self._in)

    def inside_grown(self, x0: float, y0: float, x1: float, y1: float) -> list[Interval]:
        if self.margin_m == 0.0:
            return self.inside(x0, y0, x1, y1)
        dx, dy = x1 - x0, y1 - y0
        cuts = [_cross_hits(x0, y0, dx, dy, self._grown_edges, True)]
        a = dx * dx + dy * dy
        if a > 0.0:
            # the segment against each vertex circle: a·u² + b·u + c = 0
            px, py = x0 - self._vertices[:, 0], y0 - self._vertices[:, 1]
            b = 2.0 * (px * dx + py * dy)
            c = px * px + py * py - self.margin_m**2
            disc = b * b - 4.0 * a * c
            real = disc >= 0.0
            root = np.sqrt(disc[real])
            for u in ((-b[real] - root) / (2.0 * a), (-b[real] + root) / (2.0 * a)):
                cuts.append(u[(u >= 0.0) & (u <= 1.0)])
        return _segment_sets(x0, y0, x1, y1, np.concatenate(cuts), self._near)


def _rings(polygon: shapely.Geometry) -> list[shapely.Geometry]:
    parts = shapely.get_parts(polygon)
    rings: list[shapely.Geometry] = []
    for part in parts:
        rings.append(shapely.get_exterior_ring(part))
        rings.extend(shapely.get_interior_ring(part, i) for i in range(shapely.get_num_interior_rings(part)))
    return rings


class Line:
    """A gate: a LineString in its frame, with the direction of its first→last chord."""

    __slots__ = ("chord", "edges", "frame")

    def __init__(self, frame: Frame, points: FloatArray) -> None:
        self.frame = frame
        self.edges: FloatArray = np.hstack((points[:-1], points[1:]))
        self.chord = (float(points[-1, 0] - points[0, 0]), float(points[-1, 1] - points[0, 1]))

    def crossings(self, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, int]]:
        """Where the segment meets the gate, u in (0, 1] (u = 0 was the previous segment's 1),
        each with its direction: 1 from the chord's left to its right, -1 the other way."""
        dx, dy = x1 - x0, y1 - y0
        us = np.unique(_cross_hits(x0, y0, dx, dy, self.edges, False))
        if not len(us):
            return []
        side = self.chord[0] * dy - self.chord[1] * dx
        direction = -1 if side > 0.0 else 1
        return [(float(u), direction) for u in us]

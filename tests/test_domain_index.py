"""The geofence index and the shapes' shortcuts give what the plain definitions give.

GeofenceSet.near must return exactly the geofences whose grown box meets the query box, in the
set's order, wherever the box falls: one grid cell, several, too many for the grid (the STRtree
answers), boxes too wide for the grid (checked on every lookup), not finite. A zone's segment
that comes near no edge is all in or all out; one that does is cut where it meets them.
"""

from __future__ import annotations

import math
import random

import pytest

from tpx.domain.geofences import Geofence, GeofenceSet
from tpx.domain.shapes import Zone

ORIGIN = (13.4, 52.5)


def ring(lon: float, lat: float, half: float) -> list[list[float]]:
    return [
        [lon - half, lat - half],
        [lon + half, lat - half],
        [lon + half, lat + half],
        [lon - half, lat + half],
        [lon - half, lat - half],
    ]


def square(gid: object, lon: float, lat: float, half: float, **fields: object) -> dict[str, object]:
    geometry = {"type": "Polygon", "coordinates": [ring(lon, lat, half)]}
    return {"id": gid, "kind": "zone", "geometry": geometry, **fields}


def city(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [
        square(
            f"z{i}",
            ORIGIN[0] + rng.uniform(-0.1, 0.1),
            ORIGIN[1] + rng.uniform(-0.1, 0.1),
            rng.uniform(5e-4, 3e-3),
        )
        for i in range(150)
    ]
    rows.append(square("country", ORIGIN[0], ORIGIN[1], 3.0))  # far too wide for the grid's cells
    rows.append(
        {
            "id": "pole",
            "kind": "circle",
            "geometry": {"type": "Point", "coordinates": [0, 90]},
            "radius_m": 500,
        }
    )
    rows.append(
        {
            "id": "gate",
            "kind": "gate",
            "geometry": {"type": "LineString", "coordinates": [[13.4, 52.45], [13.4, 52.55]]},  # no width
        }
    )
    return rows


def brute_force(gs: GeofenceSet, lon0: float, lat0: float, lon1: float, lat1: float) -> list[Geofence]:
    lo_x, hi_x, lo_y, hi_y = min(lon0, lon1), max(lon0, lon1), min(lat0, lat1), max(lat0, lat1)
    return [
        g
        for g in gs.by_id.values()
        if g.bbox[0] <= hi_x and lo_x <= g.bbox[2] and g.bbox[1] <= hi_y and lo_y <= g.bbox[3]
    ]


@pytest.mark.timeout(60)
def test_near_is_every_box_that_meets_the_query_in_the_sets_order():
    rng = random.Random(16)
    gs = GeofenceSet.from_rows(city(rng))
    assert not gs.invalid
    queries = [
        (ORIGIN[0], ORIGIN[1], ORIGIN[0], ORIGIN[1]),
        (0.0, 90.0, 0.0, 90.0),
        (-180.0, -90.0, 180.0, 90.0),
    ]
    for _ in range(4000):
        lon, lat = ORIGIN[0] + rng.uniform(-0.12, 0.12), ORIGIN[1] + rng.uniform(-0.12, 0.12)
        size = rng.choice([0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0])  # one cell, a few, too many
        queries.append((lon, lat, lon + rng.uniform(-size, size), lat + rng.uniform(-size, size)))
    # a box that touches another only on its edge meets it (closed boxes)
    g = gs.by_id["z0"]
    queries.append((g.bbox[2], g.bbox[3], g.bbox[2] + 1e-3, g.bbox[3] + 1e-3))
    for q in queries:
        assert [x.id for x in gs.near(*q)] == [x.id for x in brute_force(gs, *q)], q
    assert gs.near(math.nan, 52.5, 13.4, 52.5) == []
    assert gs.near(math.inf, 0.0, math.inf, 0.0) == []


@pytest.mark.timeout(30)
def test_near_on_an_empty_set_and_on_boxes_without_extent():
    assert GeofenceSet.from_rows([]).near(13.4, 52.5, 13.5, 52.6) == []
    gs = GeofenceSet.from_rows(city(random.Random(1))[-1:])  # only the gate: a box of zero width
    assert [g.id for g in gs.near(13.4, 52.5, 13.4, 52.5)] == ["gate"]
    assert gs.near(13.41, 52.5, 13.42, 52.5) == []


@pytest.mark.timeout(30)
def test_a_segment_near_no_edge_is_all_in_or_all_out_and_one_near_an_edge_is_cut():
    rings = [ring(*ORIGIN, 0.01), ring(*ORIGIN, 0.005)]  # a square with a square hole
    holed = {
        "id": 1,
        "kind": "zone",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "exit_margin_m": 20,
    }
    gs = GeofenceSet.from_rows([holed])
    assert not gs.invalid
    zone = gs.by_id[1].shape
    assert isinstance(zone, Zone)
    east, _ = zone.frame.xy(ORIGIN[0] + 0.01, ORIGIN[1])  # the east edge, metres from the centroid
    inner, _ = zone.frame.xy(ORIGIN[0] + 0.005, ORIGIN[1])  # the hole's east edge
    band = (inner + east) / 2  # between the hole and the outer edge, far from both
    assert zone.inside(band - 50, -50, band + 50, 50) == [(0.0, 1.0)]
    assert zone.inside(-50, -50, 50, 50) == []  # in the hole, far from its edges
    assert zone.inside_grown(-50, -50, 50, 50) == []
    assert zone.inside(east + 100, 0, east + 200, 0) == []  # beyond the zone's box
    assert zone.inside_grown(east + 10, 0, east + 15, 0) == [(0.0, 1.0)]  # within the margin
    assert zone.inside_grown(east + 30, 0, east + 40, 0) == []
    # across the east edge and back out of the margin: cut at the edge, and at the margin
    ((lo, hi),) = zone.inside(east - 10, 0, east + 30, 0)
    assert lo == 0.0
    assert hi == pytest.approx(0.25)
    ((lo, hi),) = zone.inside_grown(east - 10, 0, east + 30, 0)
    assert lo == 0.0
    assert hi == pytest.approx(0.75)

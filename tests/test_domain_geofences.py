"""Geofence rows: usable ones load, invalid ones become values with a reason, never exceptions."""

from __future__ import annotations

import json
import math

import pytest

from tpx.domain.geofences import Geofence, GeofenceSet, Invalid, parse_geofence
from tpx.domain.shapes import EARTH_RADIUS_M

SQUARE = [[13.40, 52.50], [13.41, 52.50], [13.41, 52.51], [13.40, 52.51], [13.40, 52.50]]


def row(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": 1,
        "name": "start",
        "kind": "zone",
        "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
    }
    return {**base, **fields}


def test_zone_from_geojson_text_with_defaults():
    g = parse_geofence(row(geometry=json.dumps({"type": "Polygon", "coordinates": [SQUARE]})))
    assert isinstance(g, Geofence)
    assert (g.kind, g.exit_margin_m, g.active, g.radius_m) == ("zone", 0.0, True, None)
    # projected at its centroid: 0.01° of longitude at 52.505° is R·π/180·cos(52.505°)·0.01 m
    frame = g.shape.frame
    assert (frame.lon0, frame.lat0) == pytest.approx((13.405, 52.505))
    assert frame.kx == pytest.approx(EARTH_RADIUS_M * math.pi / 180 * math.cos(math.radians(52.505)))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (
            {"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}},
            "invalid polygon: Self-intersection",
        ),
        (
            {"kind": "gate", "geometry": {"type": "LineString", "coordinates": [[13.4, 52.5]]}},
            "two distinct points",
        ),
        (
            {"kind": "gate", "geometry": {"type": "LineString", "coordinates": [[13.4, 52.5], [13.4, 52.5]]}},
            "two distinct points",
        ),
        (
            {"kind": "circle", "geometry": {"type": "Point", "coordinates": [13.4, 52.5]}},
            "radius_m is missing",
        ),
        (
            {"kind": "circle", "geometry": {"type": "Point", "coordinates": [13.4, 52.5]}, "radius_m": 0},
            "radius_m must be positive",
        ),
        ({"kind": "gate"}, "a gate needs a LineString geometry, got 'Polygon'"),
        (
            {"geometry": {"type": "Point", "coordinates": [13.4, 52.5]}},
            "a zone needs a Polygon or MultiPolygon",
        ),
        (
            {"geometry": {"type": "Polygon", "coordinates": [[[200, 0], [201, 0], [201, 1], [200, 0]]]}},
            "out of range",
        ),
        (
            {"geometry": {"type": "Polygon", "coordinates": [[[0, 95], [1, 95], [1, 96], [0, 95]]]}},
            "out of range",
        ),
        ({"geometry": {"type": "Polygon", "coordinates": [SQUARE[:-1]]}}, "must end where it starts"),
        ({"geometry": "{not json"}, "geometry is not JSON"),
        ({"geometry": None}, "geometry must be a GeoJSON object"),
        ({"kind": "area"}, "kind must be zone, gate or circle"),
        ({"exit_margin_m": -1}, "exit_margin_m must be zero or more"),
        ({"id": None}, "id must be an integer or a string"),
    ],
)
def test_invalid_rows_are_values_with_their_reason(fields, reason):
    result = parse_geofence(row(**fields))
    assert isinstance(result, Invalid)
    assert reason in result.reason
    assert result.id == fields.get("id", 1)


def test_set_keeps_active_valid_ones_and_reports_the_rest():
    rows = [
        row(id=1),
        row(id=2, active=False),
        row(id=3, kind="gate"),
        {
            "id": "c",
            "kind": "circle",
            "geometry": {"type": "Point", "coordinates": [13.5, 52.5]},
            "radius_m": 25,
        },
    ]
    gs = GeofenceSet.from_rows(rows)
    assert sorted(gs.by_id, key=str) == [1, "c"]
    assert [(i.id, i.reason) for i in gs.invalid] == [
        (3, "a gate needs a LineString geometry, got 'Polygon'")
    ]


def test_generation_changes_with_geometry_not_with_name():
    a = GeofenceSet.from_rows([row()])
    assert GeofenceSet.from_rows([row(name="renamed")]).generation == a.generation
    assert GeofenceSet.from_rows([row(exit_margin_m=5)]).generation != a.generation


def test_circle_box_covers_its_radius_in_its_own_frame():
    # a 1 km circle at 60°N: 1 000 m is 1000 / (R·π/180·cos 60°) = 0.017987° of longitude
    gs = GeofenceSet.from_rows(
        [
            {
                "id": 1,
                "kind": "circle",
                "geometry": {"type": "Point", "coordinates": [10, 60]},
                "radius_m": 1000,
            }
        ]
    )
    lon_lo, lat_lo, lon_hi, lat_hi = gs.by_id[1].bbox
    dlon, dlat = 1000 / (EARTH_RADIUS_M * math.pi / 180 * 0.5), 1000 / (EARTH_RADIUS_M * math.pi / 180)
    assert (lon_lo, lat_lo, lon_hi, lat_hi) == pytest.approx((10 - dlon, 60 - dlat, 10 + dlon, 60 + dlat))
    assert gs.areas_at(10 + 0.017, 60) == {1}
    assert gs.areas_at(10 + 0.0181, 60) == frozenset()


def test_multipolygon_with_a_hole():
    outer = [[0, 0], [0.01, 0], [0.01, 0.01], [0, 0.01], [0, 0]]
    hole = [[0.004, 0.004], [0.006, 0.004], [0.006, 0.006], [0.004, 0.006], [0.004, 0.004]]
    other = [[0.02, 0], [0.03, 0], [0.03, 0.01], [0.02, 0.01], [0.02, 0]]
    gs = GeofenceSet.from_rows(
        [
            {
                "id": 9,
                "kind": "zone",
                "geometry": {"type": "MultiPolygon", "coordinates": [[outer, hole], [other]]},
            }
        ]
    )
    assert not gs.invalid
    assert gs.areas_at(0.002, 0.002) == {9}
    assert gs.areas_at(0.005, 0.005) == frozenset()  # in the hole
    assert gs.areas_at(0.004, 0.005) == {9}  # on the hole's edge: boundary is inside
    assert gs.areas_at(0.025, 0.005) == {9}
    assert gs.areas_at(0.015, 0.005) == frozenset()


def test_hostile_geometry_values_are_invalid_rows_never_exceptions():
    # a JSON integer of 400 digits is a Python int that no float holds (math.isfinite raises
    # OverflowError), and 100,000 brackets go deeper than the JSON parser: each is one invalid row
    huge = '{"type": "Point", "coordinates": [1' + "0" * 400 + ", 2]}"
    for geometry in (huge, "[" * 100_000):
        parsed = parse_geofence({"id": 9, "kind": "circle", "geometry": geometry, "radius_m": 5})
        assert isinstance(parsed, Invalid) and parsed.id == 9
        assert parsed.reason.startswith("unusable geometry: ")

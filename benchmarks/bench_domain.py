"""Domain logic speed: fixes per second that tpx.domain.advance sustains, pure (no I/O).

A city of 1,000 geofences (mostly ~20-vertex zones, some gates and circles, a quarter with an
exit margin) and 10,000 devices driving random walks; each round gives every device one fix
(the engine's batches hold about one fix per device). A share of the fixes can arrive late
(``--late``: swapped with the device's previous fix, so each late one is replayed). ``--warm``
rounds run untimed first, so that the timed ones see a fuller history (at one fix per 10 s, 60
rounds fill the default 600 s late window: the steady state of a long-running process). Also
measures the alternatives the design chose between: the grid lookup that ``GeofenceSet.near``
does per segment box against an STRtree query and a numpy mask over all boxes, and prepared
against unprepared point-in-polygon. Reported, not asserted: the machine is shared, repeat runs.

    python benchmarks/bench_domain.py [--devices 10000] [--geofences 1000] [--rounds 5] [--late 0.05]
        [--warm 0] [--max-history 16]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import shapely

from tpx.domain import DeviceState, Fix, GeofenceSet, TimingConfig, advance
from tpx.domain.shapes import Frame

ORIGIN = (13.4, 52.5)
CITY_M = 20_000.0
STEP_S = 10
T0_US = 1_700_000_000_000_000


def city(n: int, rng: random.Random) -> list[dict[str, object]]:
    frame = Frame.at(*ORIGIN)

    def lonlat(x: float, y: float) -> list[float]:
        return [ORIGIN[0] + x / frame.kx, ORIGIN[1] + y / frame.ky]

    rows: list[dict[str, object]] = []
    for gid in range(n):
        cx, cy = rng.uniform(-CITY_M / 2, CITY_M / 2), rng.uniform(-CITY_M / 2, CITY_M / 2)
        margin = rng.choice([0, 0, 0, 10])
        kind = rng.random()
        if kind < 0.85:  # a star-shaped 20-gon of 50..300 m
            radius = rng.uniform(50, 300)
            ring = [
                lonlat(cx + radius * r * math.cos(a), cy + radius * r * math.sin(a))
                for a, r in ((2 * math.pi * i / 20, rng.uniform(0.6, 1.0)) for i in range(20))
            ]
            geometry: dict[str, object] = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
            rows.append({"id": gid, "kind": "zone", "geometry": geometry, "exit_margin_m": margin})
        elif kind < 0.95:  # a gate of 30..100 m
            half, a = rng.uniform(15, 50), rng.uniform(0, math.pi)
            coords = [
                lonlat(cx - half * math.cos(a), cy - half * math.sin(a)),
                lonlat(cx + half * math.cos(a), cy + half * math.sin(a)),
            ]
            rows.append(
                {"id": gid, "kind": "gate", "geometry": {"type": "LineString", "coordinates": coords}}
            )
        else:
            rows.append(
                {
                    "id": gid,
                    "kind": "circle",
                    "geometry": {"type": "Point", "coordinates": lonlat(cx, cy)},
                    "radius_m": rng.uniform(30, 200),
                    "exit_margin_m": margin,
                }
            )
    return rows


def drive(devices: int, rounds: int, late: float, rng: random.Random) -> list[list[tuple[str, Fix]]]:
    """Per round, one fix per device (a random walk at ~10 m/s); a share swapped with the last."""
    frame = Frame.at(*ORIGIN)
    pos = [
        (rng.uniform(-CITY_M / 2, CITY_M / 2), rng.uniform(-CITY_M / 2, CITY_M / 2)) for _ in range(devices)
    ]
    heading = [rng.uniform(0, 2 * math.pi) for _ in range(devices)]
    out: list[list[tuple[str, Fix]]] = []
    for r in range(rounds + 1):
        batch = []
        for d in range(devices):
            heading[d] += rng.gauss(0, 0.3)
            x, y = pos[d]
            x, y = x + 100 * math.cos(heading[d]), y + 100 * math.sin(heading[d])
            pos[d] = (x, y)
            fix = Fix(
                T0_US + r * STEP_S * 1_000_000, ORIGIN[1] + y / frame.ky, ORIGIN[0] + x / frame.kx, True, 36.0
            )
            batch.append((f"dev{d:05d}", fix))
        out.append(batch)
    if late > 0:  # swap a share of devices' fixes between consecutive rounds: one arrives late
        for r in range(1, len(out) - 1):
            for d in range(devices):
                if rng.random() < late:
                    out[r][d], out[r + 1][d] = out[r + 1][d], out[r][d]
    return out


def run(
    gs: GeofenceSet, rounds: list[list[tuple[str, Fix]]], warm: int = 0, max_history: int = 16
) -> tuple[float, int, int, int]:
    config = TimingConfig(max_history=max_history)
    states: dict[str, DeviceState] = {}
    for device, fix in rounds[0]:  # first fixes: membership only, not timed
        states[device], _ = advance(DeviceState(device), gs, [fix], config)
    for batch in rounds[1 : 1 + warm]:  # not timed either: a fuller history
        for device, fix in batch:
            states[device], _ = advance(states[device], gs, [fix], config)
    added = deleted = fixes = 0
    started = time.perf_counter()
    for batch in rounds[1 + warm :]:
        for device, fix in batch:
            states[device], changes = advance(states[device], gs, [fix], config)
            added += len(changes.added)
            deleted += len(changes.deleted)
            fixes += 1
    return time.perf_counter() - started, fixes, added, deleted


def compare_lookups(gs: GeofenceSet, rng: random.Random, n: int = 20_000) -> None:
    boxes = np.array([g.bbox for g in gs.by_id.values()])
    frame = Frame.at(*ORIGIN)
    segs = []
    for _ in range(n):
        x, y = rng.uniform(-CITY_M / 2, CITY_M / 2), rng.uniform(-CITY_M / 2, CITY_M / 2)
        lon, lat = ORIGIN[0] + x / frame.kx, ORIGIN[1] + y / frame.ky
        segs.append((lon, lat, lon + 100 / frame.kx, lat + 50 / frame.ky))
    started = time.perf_counter()
    hits_grid = sum(len(gs.near(*s)) for s in segs)
    grid_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    hits_tree = sum(len(gs.tree.query(shapely.box(*s))) for s in segs)
    tree_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    hits_mask = 0
    for lo_x, lo_y, hi_x, hi_y in segs:
        mask = (boxes[:, 0] <= hi_x) & (boxes[:, 2] >= lo_x) & (boxes[:, 1] <= hi_y) & (boxes[:, 3] >= lo_y)
        hits_mask += int(mask.sum())
    mask_us = (time.perf_counter() - started) / n * 1e6
    print(
        f"candidates per segment box: grid (near) {grid_us:.1f} µs, STRtree {tree_us:.1f} µs, "
        f"numpy mask {mask_us:.1f} µs ({hits_grid} = {hits_tree} = {hits_mask} hits)"
    )
    zone = next(g for g in gs.by_id.values() if g.kind == "zone")
    poly, prepared = (shapely.from_geojson(json.dumps(zone.geometry)) for _ in range(2))
    shapely.prepare(prepared)
    xs, ys = np.full(3, poly.centroid.x), np.full(3, poly.centroid.y)
    for label, geom in (("unprepared", poly), ("prepared", prepared)):
        started = time.perf_counter()
        for _ in range(n):
            shapely.intersects_xy(geom, xs, ys)
        took_us = (time.perf_counter() - started) / n * 1e6
        print(f"point-in-20-gon (3 points, one call), {label}: {took_us:.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--geofences", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--late", type=float, default=0.0, help="share of fixes arriving one step late")
    parser.add_argument("--warm", type=int, default=0, help="untimed rounds before the timed ones")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--max-history", type=int, default=16, help="fixes kept per device (TPX_DOMAIN_MAX_HISTORY's default)"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    gs = GeofenceSet.from_rows(city(args.geofences, rng))
    kinds = {k: sum(1 for g in gs.by_id.values() if g.kind == k) for k in ("zone", "gate", "circle")}
    built_s = time.perf_counter() - started
    print(f"{len(gs)} geofences {kinds}, {len(gs.invalid)} invalid, built in {built_s:.2f} s")
    compare_lookups(gs, rng)
    for late in sorted({0.0, args.late}):
        rounds = drive(args.devices, args.warm + args.rounds, late, random.Random(args.seed + 1))
        elapsed, fixes, added, deleted = run(gs, rounds, args.warm, args.max_history)
        warm = f", after {args.warm} rounds" if args.warm else ""
        print(
            f"advance, {args.devices} devices{warm}, late {late:.0%}: {fixes} fixes in {elapsed:.2f} s = "
            f"{fixes / elapsed:,.0f} fixes/s ({added} records added, {deleted} deleted)"
        )


if __name__ == "__main__":
    main()

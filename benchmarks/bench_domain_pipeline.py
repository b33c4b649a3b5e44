"""The domain stage's cost in the pipeline: tpx with TPX_DOMAIN=off and =on, same records, one run.

10,000 devices drive random walks (~10 m/s, a fix every 10 s) through a 20 km city of 1,000
geofences (mostly ~20-vertex zones, some gates and circles: ``bench_domain.city``); the records
are loaded as a backlog and a real ``tpx serve`` drains them into a fresh schema, once with the
domain off and once with the CMS tables (deploy/directus/no-postgis.sql) and the geofences in
place, and once more with TPX_DOMAIN_DEFER=true and a `tpx domain` beside it (serve only queues the
fixes; the worker writes the timing records: also reported, when its last record was written).
Reported: records/s of each, their ratio to the domain off (issue 16 asks for ≥ 0.80), the CPU
per record, and how long serve took to start (the clock starts once serve and `tpx domain` answer
/healthz: loading 1,000 geofences is start-up, not throughput). Repeat runs: the machine is shared
and noisy.

    python benchmarks/bench_domain_pipeline.py [--devices 10000] [--rounds 10] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg import sql

from benchmarks.bench_domain import city, drive
from benchmarks.bench_pipeline import _cpu_text, run_tpx, start_serve

ROOT = Path(__file__).resolve().parent.parent
NO_POSTGIS_DDL = ROOT / "deploy" / "directus" / "no-postgis.sql"
#: Fixes start this long before now (inside TPX_MAX_FUTURE_S, like a backlog of the last hours).
BACKLOG_S = 6 * 3600


def entries_for(devices: int, rounds: int, seed: int, start_s: float | None = None) -> list[dict[str, str]]:
    """One fix per device per round, round after round, from ``start_s`` (default: a backlog of
    the last hours)."""
    rng = random.Random(seed)
    start = time.time() - BACKLOG_S if start_s is None else start_s
    shift_us = int(start * 1_000_000) - 1_700_000_000_000_000
    out = []
    for batch in drive(devices, rounds, 0.0, rng):
        for device, fix in batch:
            record: dict[str, object] = {
                "ts": (fix.ts_us + shift_us) // 1000,
                "lat": round(fix.lat, 7),
                "lon": round(fix.lon, 7),
                "speed": fix.speed,
                "satellites": 9,
                "io": {},
            }
            out.append({"device_id": device, "record": json.dumps(record), "codec": "8E"})
    return out


def queued(dsn: str, schema: str) -> int:
    """Fixes whose timing records wait for `tpx domain` (a deferred batch not moved yet: 1)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {0}.tpx_domain_missed)"
                " + (SELECT count(*) FROM {0}.tpx_domain_queue)"
            ).format(sql.Identifier(schema))
        ).fetchone()
    return int(row[0]) if row is not None else 0


def cms_tables(dsn: str, schema: str, geofences: list[dict[str, Any]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute(NO_POSTGIS_DDL.read_text())
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO geofences (id, name, kind, geometry, radius_m, exit_margin_m)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (
                        g["id"],
                        f"g{g['id']}",
                        g["kind"],
                        json.dumps(g["geometry"]),
                        g.get("radius_m"),
                        g.get("exit_margin_m") or 0,
                    )
                    for g in geofences
                ],
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--geofences", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--tpx-env", action="append", default=[], help="KEY=VALUE for the tpx subprocess")
    parser.add_argument(
        "--redis-url", default=os.environ.get("TPX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TPX_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1/test"),
    )
    parser.add_argument(
        "--modes",
        default="off,on,defer",
        help="of off, on, defer (TPX_DOMAIN_DEFER with `tpx domain`), queue (TPX_DOMAIN_DEFER alone:"
        " what queueing costs serve)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    geofences = city(args.geofences, random.Random(1))
    entries = entries_for(args.devices, args.rounds, seed=2)
    expected = len(entries)
    base_env = list(args.tpx_env)
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):
        for mode in modes:
            domain = {"off": ["TPX_DOMAIN=off"], "on": ["TPX_DOMAIN=on"]}.get(mode) or [
                "TPX_DOMAIN=on",
                "TPX_DOMAIN_DEFER=true",
            ]
            args.tpx_env = [*base_env, *domain]

            def prepare(schema: str, mode: str = mode) -> None:
                if mode != "off":
                    cms_tables(args.database_url, schema, geofences)

            def worker(schema: str, key: str, port: int) -> subprocess.Popen[bytes]:
                return start_serve(args, schema, key, ("domain",), port)

            defer = mode == "defer"
            result = run_tpx(
                args,
                entries,
                expected,
                prepare,
                companion=worker if defer else None,
                settled=(lambda schema: queued(args.database_url, schema) == 0) if defer else None,
            )
            result["rate"] = result["records"] / result["seconds"]
            runs[mode].append(result)
            settled = result["settled_seconds"]
            print(
                f"  domain {mode:<5} {result['rate']:>10,.0f} rec/s ({result['seconds']:.2f}s"
                + f"; serve up in {result['startup_seconds']:.2f}s"
                + (f"; timing records done after {settled:.2f}s" if settled is not None else "")
                + f")  {_cpu_text(result['cpu_us'])}",
                file=sys.stderr,
            )
    summary: dict[str, Any] = {"records": expected, "devices": args.devices, "geofences": args.geofences}
    for mode, results in runs.items():
        summary[f"rates_{mode}"] = [round(r["rate"]) for r in results]
        if mode != "off" and "off" in runs:  # each repeat against the domain off of the same repeat
            ratios = [r["rate"] / off["rate"] for off, r in zip(runs["off"], results, strict=True)]
            summary[f"{mode}_vs_off_each_repeat"] = [round(x, 2) for x in ratios]
        if mode == "defer":
            summary["defer_timing_done_s"] = [round(r["settled_seconds"], 2) for r in results]
            summary["defer_domain_rate"] = [round(r["records"] / r["settled_seconds"]) for r in results]
        summary[f"startup_s_{mode}"] = [round(r["startup_seconds"], 2) for r in results]
        summary[f"cpu_us_{mode}"] = results[-1]["cpu_us"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""End-to-end latency of tpx at a steady publishing rate: p50 / p99 / max, per rate.

For each rate a real ``tpx serve`` (default settings unless ``--tpx-env``) reads a fresh stream
into a fresh schema on the local PostgreSQL. A publisher stamps each entry's ``received_at`` (epoch
ms, as the gateway does) just before its XADD, paced in 10 ms ticks, for ``--duration`` seconds.
Latency is the row's ``ingested_at`` minus its ``received_at``: ``ingested_at`` defaults to the
writing transaction's start (``now()``), so the commit itself (a millisecond or two) is not in it.

``--domain N`` runs the domain stage: the live fleet drives through a 20 km city of N geofences
(``bench_domain.city``), the CMS's tables are in the schema and TPX_DOMAIN=on. Timing records
commit in the same transaction as their positions; ``ingested_at`` is that transaction's start, so
the domain's own lag (issue 16: p99 ≤ 2 s at 5,000 rec/s) is read from tpx's
``tpx_domain_lag_seconds`` histogram (a batch's oldest record, from its XADD to the COMMIT of its
timing records), scraped from ``/metrics`` before the stop; the timing records written are counted.
With ``--defer`` too, serve only queues (TPX_DOMAIN_DEFER) and a `tpx domain` beside it writes
the timing records: the lag is its histogram (a fix from its batch's transaction to the COMMIT of
its records).

``--backlog N`` first loads N entries and starts tpx on them, then publishes at the rate while the
backlog drains: the percentiles are those of the live records only (their device ids differ).

Both ends share this machine with PostgreSQL and Redis (2 cores here): at 20,000 rec/s the
publisher itself takes a good part of one core, so read the figures with the CPU report it prints.

Usage:
    python benchmarks/bench_latency.py [--rate 1000 --rate 5000 --rate 20000] [--duration 20]
        [--devices 2000] [--backlog 0] [--tpx-env KEY=VALUE ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_domain_pipeline import queued
from benchmarks.bench_pipeline import CpuMeter, drop_schema, free_port, load_stream, start_serve, wait_up
from tpx.fleet import Fleet
from tpx.schema import migrate

#: The publisher's pacing step: entries due in each 10 ms are sent in one pipeline.
TICK_S = 0.01
#: Seconds to wait for the last live records to be written after publishing stops.
DRAIN_TIMEOUT_S = 60.0

PERCENTILES_SQL = """
SELECT count(*),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY lat),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lat),
       max(lat)
FROM (SELECT extract(epoch FROM ingested_at - received_at) * 1000 AS lat
      FROM {}.positions WHERE device_id LIKE 'L%%') AS live
"""


def live_entries(devices: int, count: int, seed: int) -> list[dict[str, str]]:
    """Entries of a live fleet whose device ids start with ``L`` (told apart from a backlog's)."""
    fleet = Fleet(devices=devices, seed=seed, start_ms=int(time.time() * 1000))
    out = []
    for entry in fleet.entries(count):
        entry["device_id"] = "L" + entry["device_id"]
        out.append(entry)
    return out


def publish(client: redis.Redis, key: str, entries: list[dict[str, str]], rate: float) -> float:
    """XADD ``entries`` at ``rate`` per second, each stamped just before it is sent; returns the rate."""
    started = time.perf_counter()
    sent = 0
    while sent < len(entries):
        due = min(len(entries), int((time.perf_counter() - started) * rate) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            now_ms = str(int(time.time() * 1000))
            for fields in entries[sent:due]:
                fields["received_at"] = now_ms
                pipe.xadd(key, fields)  # type: ignore[arg-type]
            pipe.execute()
            sent = due
        time.sleep(TICK_S)
    return sent / (time.perf_counter() - started)


def run(args: argparse.Namespace, rate: int) -> dict[str, Any]:
    client = redis.Redis.from_url(args.redis_url)
    schema = f"lat_{uuid.uuid4().hex[:8]}"
    key = f"bench:{uuid.uuid4().hex[:8]}:t"
    migrate(args.database_url, schema)
    live = (
        _domain_entries(args, schema, rate)
        if args.domain
        else live_entries(args.devices, int(rate * args.duration), seed=rate)
    )
    if args.backlog:
        fleet = Fleet(devices=args.devices, seed=7, start_ms=int(time.time() * 1000))
        load_stream(client, key, list(fleet.entries(args.backlog)))
    # the domain's own lag histogram, scraped before the stop (with --backlog, the backlog's
    # batches are in it too: read it without one)
    serve_port = free_port()
    proc = start_serve(args, schema, key, port=serve_port)
    worker = None
    port = serve_port if args.domain else None
    if args.defer:  # serve only queues; `tpx domain` writes the timing records and has the lag
        worker, port = _start_worker(args, schema, key)
    domain_lag: dict[str, Any] = {}
    try:
        # publishing starts once both are up: their start-up is neither latency nor lag
        wait_up(serve_port, proc, "tpx serve")
        if worker is not None and port is not None:
            wait_up(port, worker, "tpx domain")
        meter = CpuMeter(proc.pid)
        meter.start()
        achieved = publish(client, key, live, rate)
        cpu = meter.stop(len(live))
        _wait_done(client, key, proc, worker, args.database_url, schema)
        with psycopg.connect(args.database_url) as conn:
            row = conn.execute(sql.SQL(PERCENTILES_SQL).format(sql.Identifier(schema))).fetchone()
            timing = 0
            if args.domain:
                found = conn.execute(
                    sql.SQL("SELECT count(*) FROM {}.timing_records").format(sql.Identifier(schema))
                ).fetchone()
                timing = int(found[0]) if found else 0
        if port is not None:
            domain_lag = domain_lag_p99(port)
    finally:
        for process in (proc, worker):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
        client.delete(key, key + ":dlq")
        drop_schema(args.database_url, schema)
    assert row is not None
    count, p50, p99, worst = row
    if count != len(live):
        raise RuntimeError(f"{count} live rows, expected {len(live)}")
    return {
        "rate": rate,
        "achieved_rate": round(achieved),
        "backlog": args.backlog,
        "records": count,
        "p50_ms": round(float(p50), 1),
        "p99_ms": round(float(p99), 1),
        "max_ms": round(float(worst), 1),
        "timing_records": timing,
        **domain_lag,
        "cpu_us": cpu,
    }


def _domain_entries(args: argparse.Namespace, schema: str, rate: int) -> list[dict[str, str]]:
    """The CMS's tables with ``args.domain`` geofences, and the fleet driving through them."""
    from benchmarks.bench_domain import city
    from benchmarks.bench_domain_pipeline import cms_tables, entries_for

    cms_tables(args.database_url, schema, city(args.domain, random.Random(1)))
    rounds = -(-int(rate * args.duration) // args.devices)
    live = entries_for(args.devices, rounds, seed=rate, start_s=time.time())[: int(rate * args.duration)]
    for entry in live:
        entry["device_id"] = "L" + entry["device_id"]
    return live


def _start_worker(args: argparse.Namespace, schema: str, key: str) -> tuple[subprocess.Popen[bytes], int]:
    """A `tpx domain` beside serve, and its metrics port."""
    port = free_port()
    return start_serve(args, schema, key, ("domain",), port), port


def _wait_done(
    client: redis.Redis,
    key: str,
    proc: subprocess.Popen[bytes],
    worker: subprocess.Popen[bytes] | None,
    dsn: str,
    schema: str,
) -> None:
    """Until serve wrote every record, and the worker (if any) took every fix it queued."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not _drained(client, key):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("tpx did not write every record")
        time.sleep(0.05)
    while worker is not None and queued(dsn, schema):
        if time.monotonic() > deadline or worker.poll() is not None:
            raise RuntimeError("tpx domain did not take every fix")
        time.sleep(0.05)


def domain_lag_p99(port: int) -> dict[str, Any]:
    """From tpx's ``tpx_domain_lag_seconds`` (one observation a batch: its oldest record's age,
    from the gateway's XADD to the COMMIT of its timing records): the bucket bound the 99th
    percentile lies under, and the share of batches within 2 s."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("tpx_domain_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return {"domain_batches": 0}
    p99 = next(le for le, count in buckets if count >= 0.99 * total)
    within_2s = next((count for le, count in buckets if le == 2.0), 0.0) / total
    return {
        "domain_batches": int(total),
        "domain_lag_p99_le_s": p99,
        "domain_lag_within_2s": round(within_2s, 4),
    }


def _drained(client: redis.Redis, key: str) -> bool:
    last_id = client.xinfo_stream(key)["last-generated-id"]
    group = client.xinfo_groups(key)[0]
    return bool(group["last-delivered-id"] == last_id and group["pending"] == 0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, action="append", help="records/s (repeatable; default 1k 5k 20k)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of publishing per rate")
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=0, help="entries waiting before the live records")
    parser.add_argument("--tpx-env", action="append", default=[], help="KEY=VALUE for the tpx subprocess")
    parser.add_argument("--redis-url", default=os.environ.get("TPX_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("TPX_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument("--domain", type=int, default=0, help="geofences for the domain stage (0: off)")
    parser.add_argument(
        "--defer",
        action="store_true",
        help="with --domain: TPX_DOMAIN_DEFER, and a `tpx domain` beside serve",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.domain:
        args.tpx_env.append("TPX_DOMAIN=on")
        if args.defer:
            args.tpx_env.append("TPX_DOMAIN_DEFER=true")
    results = [run(args, rate) for rate in args.rate or [1000, 5000, 20000]]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'rate':>7} {'achieved':>9} {'backlog':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  cpu µs/record"
    )
    for r in results:
        cpu = " ".join(f"{k} {v:.1f}" for k, v in r["cpu_us"].items())
        print(
            f"{r['rate']:>8} {r['achieved_rate']:>8} {r['backlog']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8}"
            f" {r['max_ms']:>8}  {cpu}"
        )
        if "domain_lag_p99_le_s" in r:
            print(
                f"         domain lag ({'queued' if args.defer else 'XADD'} -> timing records committed),"
                f" {r['domain_batches']} {'passes' if args.defer else 'batches'}:"
                f" p99 <= {r['domain_lag_p99_le_s']:g} s, {r['domain_lag_within_2s']:.2%} within 2 s"
            )


if __name__ == "__main__":
    main()
